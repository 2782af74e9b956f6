"""Each LoRA module's alpha as the adapter's own library applies it, so that its update is
dW = alpha / r * up @ down with r the module's rank (``down.shape[0]``):

- kohya-ss files: a scalar ``<module>.alpha`` tensor per module (read with the tensors);
- PEFT folders: ``adapter_config.json`` beside ``adapter_model.safetensors``: ``lora_alpha`` / ``r``,
  per module ``rank_pattern`` / ``alpha_pattern`` (module-name patterns matched as peft matches them),
  and ``use_rslora`` (scale lora_alpha / sqrt(r));
- diffusers files: the LoRA config that ``save_lora_weights`` writes as JSON into the safetensors
  metadata (``lora_adapter_metadata``, its keys prefixed ``unet.``), read as diffusers reads it;
- none of these: no alpha (NaN), which is scale 1 (alpha = r), as diffusers and peft load such files.

A config's scale is stored as the alpha that gives it with the file's own rank: scale * r.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation_cli.errors import DataError, environment_or

PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_PREFIX = "unet."  # what diffusers strips from the metadata's keys before it builds the UNet's config
_DEFAULT_R = _DEFAULT_ALPHA = 8  # peft's LoraConfig defaults, for a config that leaves them out
_PEFT_DOWN = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$")

Patterns = tuple[tuple[str, float], ...]


def _number(value: Any, name: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a number")
    if positive and value <= 0:
        raise ValueError(f"{name} is {value!r}, not positive")
    return float(value)


def _patterns(value: Any, name: str, positive: bool) -> Patterns:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError(f"{name} is {type(value).__name__}, not an object of module pattern -> value")
    for pattern in value:
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as exc:
            raise ValueError(f"{name} pattern {pattern!r} is not a regular expression ({exc})") from None
    return tuple((str(k), _number(v, f"{name}[{k!r}]", positive)) for k, v in value.items())


def _match(patterns: Patterns, key: str, default: float) -> float:
    """The value of the first pattern that matches ``key`` as peft matches them (``get_pattern_key``:
    the pattern matches the whole module name or a suffix of it after a dot), else ``default``."""
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


@dataclass(frozen=True)
class AlphaConfig:
    """The alpha-relevant part of a peft LoraConfig."""

    r: float = _DEFAULT_R
    lora_alpha: float = _DEFAULT_ALPHA
    rank_pattern: Patterns = ()
    alpha_pattern: Patterns = ()
    use_rslora: bool = False

    @classmethod
    def parse(cls, doc: Any) -> AlphaConfig:
        """A LoraConfig's fields (a JSON object); ValueError says what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        rslora = doc.get("use_rslora") or False
        if not isinstance(rslora, bool):
            raise ValueError(f"use_rslora is {rslora!r}, not true or false")
        return cls(r=_number(doc.get("r", _DEFAULT_R), "r"),
                   lora_alpha=_number(doc.get("lora_alpha", _DEFAULT_ALPHA), "lora_alpha", positive=False),
                   rank_pattern=_patterns(doc.get("rank_pattern"), "rank_pattern", positive=True),
                   alpha_pattern=_patterns(doc.get("alpha_pattern"), "alpha_pattern", positive=False),
                   use_rslora=rslora)

    @property
    def is_identity(self) -> bool:
        """Scale 1 for every module (alpha = r everywhere): what a file without any alpha gives."""
        return self.lora_alpha == self.r and self.alpha_pattern == self.rank_pattern and not self.use_rslora

    def digest(self) -> str:
        return json.dumps([self.r, self.lora_alpha, self.rank_pattern, self.alpha_pattern, self.use_rslora])

    def alpha(self, key: str, rank: int) -> float:
        """The alpha of the module peft names ``key``, of rank ``rank``: alpha / rank is peft's scaling."""
        r = _match(self.rank_pattern, key, self.r)
        lora_alpha = _match(self.alpha_pattern, key, self.lora_alpha)
        return (lora_alpha / math.sqrt(r) if self.use_rslora else lora_alpha / r) * rank


def module_alphas(config: AlphaConfig, downs: list[tuple[str, str, int]], peft_keys: bool) -> dict[str, float]:
    """module -> alpha for the ``downs`` of a file, (tensor key, canonical module, rank) each. ``peft_keys``:
    match the patterns against the module names peft gives the file's keys (an adapter_config.json); else
    against the canonical UNet module path (diffusers' metadata, its keys relative to the UNet)."""
    out = {}
    for key, module, rank in downs:
        name = module
        if peft_keys and (m := _PEFT_DOWN.match(key)) is not None:
            name = m.group(1)
        out[module] = config.alpha(name, rank)
    return out


def metadata_config(metadata: Any) -> AlphaConfig | None:
    """The UNet's LoRA config in a safetensors file's ``__metadata__`` (diffusers' ``save_lora_weights``:
    keys prefixed ``unet.``; a model's ``save_lora_adapter``: not prefixed), or None; ValueError if bad."""
    if not isinstance(metadata, Mapping) or not metadata.get(METADATA_KEY):
        return None
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{METADATA_KEY} in its metadata is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{METADATA_KEY} in its metadata is not a JSON object")
    unet = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in doc.items() if k.startswith(DIFFUSERS_PREFIX)}
    if not unet and any("." in k for k in doc):
        return None  # the config of another model (a text encoder) only
    try:
        return AlphaConfig.parse(unet or doc)
    except ValueError as exc:
        raise ValueError(f"{METADATA_KEY} in its metadata: {exc}") from None


_CONFIGS: dict[bytes, AlphaConfig] = {}  # configs by content: the adapters of one dataset share a few


def read_adapter_config(path: Path) -> AlphaConfig | None:
    """A PEFT adapter's ``adapter_config.json`` (None if there is none); a bad one is a DataError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise environment_or(exc, DataError(f"{path}: unreadable adapter config ({exc})")) from None
    if (known := _CONFIGS.get(data)) is not None:
        return known
    try:
        config = AlphaConfig.parse(json.loads(data))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: bad adapter config: {reason}",
                        hint="fix it, or remove it to read the LoRA with scale 1") from None
    if len(_CONFIGS) > 256:
        _CONFIGS.clear()
    _CONFIGS[data] = config
    return config
