"""One canonical name for every spelling of a LoRA tensor key.

Spellings seen in the wild for the same matrix (``down`` = A, shape (r, in); ``up`` = B, (out, r)):

- diffusers, older:  ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight``
- diffusers attention processors: ``down_blocks.0....attn1.processor.to_q_lora.down.weight``
- diffusers / PEFT, newer: ``unet.down_blocks.0....attn1.to_q.lora_A.weight`` (``lora_B`` = up)
- PEFT adapter files: ``base_model.model.down_blocks.0....attn1.to_q.lora_A.weight``
- kohya-ss: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``,
  plus a scalar ``...to_q.alpha`` per module

The canonical layer name is the diffusers UNet module path plus the factor:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.down``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A diffusers UNet attention module path, written with dots.
_MODULE = (r"(?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
           r"\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)")
_PREFIXES = r"(?:base_model\.model\.)?(?:unet\.)?"

_DOTTED = [
    (re.compile(rf"^{_PREFIXES}({_MODULE})\.lora\.(down|up)\.weight$"), "diffusers_old"),
    (re.compile(rf"^{_PREFIXES}({_MODULE})\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$"), "peft"),
]
_PROCESSOR = re.compile(
    rf"^{_PREFIXES}((?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
    r"\.transformer_blocks\.\d+\.attn[12])\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)
_KOHYA = re.compile(r"^lora_unet_([a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_MODULE = re.compile(
    r"^(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)$"
    r"|^mid_block_attentions_(\d+)_transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)$"
)
NON_UNET_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_")


@dataclass(frozen=True)
class ParsedKey:
    module: str  # canonical module path, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    kind: str  # "down", "up" or "alpha"
    style: str  # diffusers_old, diffusers_processor, peft (also newer diffusers), kohya

    @property
    def layer(self) -> str:
        return f"{self.module}.{self.kind}"


def _kohya_module(flat: str) -> str | None:
    m = _KOHYA_MODULE.match(flat)
    if m is None:
        return None
    if m.group(1):
        block, i, j, t, attn, target = m.group(1, 2, 3, 4, 5, 6)
        prefix = f"{block}.{i}.attentions.{j}"
    else:
        j, t, attn, target = m.group(7, 8, 9, 10)
        prefix = f"mid_block.attentions.{j}"
    return f"{prefix}.transformer_blocks.{t}.{attn}.{target.replace('to_out_0', 'to_out.0')}"


def parse_key(key: str) -> ParsedKey | None:
    """The canonical form of a UNet LoRA key, or None for anything else (text encoder, metadata)."""
    for pattern, style in _DOTTED:
        m = pattern.match(key)
        if m:
            factor = m.group(2)
            kind = "down" if factor in ("down", "A") else "up"
            # newer diffusers files (``unet.`` + lora_A) and PEFT files share a spelling
            return ParsedKey(m.group(1), kind, style)
    m = _PROCESSOR.match(key)
    if m:
        target = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return ParsedKey(f"{m.group(1)}.{target}", m.group(3), "diffusers_processor")
    m = _KOHYA.match(key)
    if m:
        module = _kohya_module(m.group(1))
        if module is None:
            return None
        kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)]
        return ParsedKey(module, kind, "kohya")
    return None


def key_style(keys: list[str]) -> str:
    """The dominant spelling of a file's keys (``mixed`` or ``unknown`` when there is none)."""
    styles = {p.style for k in keys if (p := parse_key(k)) is not None and p.kind != "alpha"}
    if not styles:
        return "unknown"
    if len(styles) > 1:
        return "mixed"
    style = styles.pop()
    if style == "peft":
        return "peft" if any(k.startswith("base_model.model.") for k in keys) else "diffusers"
    return style
