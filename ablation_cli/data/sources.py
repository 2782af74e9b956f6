"""Resolve ``--dataset NAME`` through the datasets registry (configs/datasets.toml)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Required, TypedDict, cast

from ablation_cli.data.demo import DemoSource
from ablation_cli.data.folders import FolderSource
from ablation_cli.data.hf import HFDatasetSource, is_hf_folder
from ablation_cli.errors import ConfigError, DataError

if TYPE_CHECKING:  # kept light: `ablate status --dataset` imports dataset_slug from here, not numpy
    from ablation_cli.data.table import DatasetSource

class DatasetEntry(TypedDict, total=False):
    """One dataset of the registry (a datasets.toml table): its kind, where it is, how to read it."""

    kind: Required[str]  # demo, folder or hf
    path: str  # folder: the LoRA files; hf: a save_to_disk folder
    id: str  # hf: a hub id
    layout: str
    labels: str | Path
    label_field: str
    split: str
    on_mismatch: str
    drop_nonfinite: bool
    num_samples: int  # demo
    num_classes: int
    seed: int


class DatasetOptions(TypedDict, total=False):
    """Loading options given on the command line or recorded for ``--resume`` (None: the source's default)."""

    layout: str | None
    labels: Path | str | None
    label_field: str | None
    on_mismatch: str | None
    drop_nonfinite: bool | None


# Used when no datasets.toml is found beside the experiment config.
BUILTIN_DATASETS: dict[str, DatasetEntry] = {
    "demo": {"kind": "demo", "num_samples": 800, "num_classes": 10, "seed": 0},
    "1k": {"kind": "hf", "id": "jacekduszenko/lora-ws-1k"},
    "10k": {"kind": "hf", "id": "jacekduszenko/lora-ws-10k"},
    "50k": {"kind": "hf", "id": "jacekduszenko/lora-ws-50k"},
    "100k": {"kind": "hf", "id": "jacekduszenko/lora-ws-100k"},
}


def load_registry(path: Path | None) -> dict[str, DatasetEntry]:
    if path is None or not path.exists():
        return dict(BUILTIN_DATASETS)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read datasets registry {path}: {exc}") from None
    for name, entry in data.items():
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ConfigError(f"{path}: dataset '{name}' needs a table with a 'kind' key (demo, folder or hf)")
    return cast(dict[str, DatasetEntry], data)  # each a table with a kind: checked above


def resolve(name: str, registry: Mapping[str, DatasetEntry], options: DatasetOptions | None = None,
            base: Path | None = None, cache_dir: Path | None = None) -> DatasetSource:
    """A registry name, or a path to a folder of LoRAs (layout detected unless ``options['layout']``)."""
    given: dict[str, Any] = {k: v for k, v in (options or {}).items() if v is not None}
    entry = registry.get(name)
    if entry is None:
        path = Path(name).expanduser()
        if given.get("layout") == "hf" or is_hf_folder(path):
            return HFDatasetSource(path, **{k: v for k, v in given.items() if k not in ("layout", "labels")})
        if path.exists() or "/" in name or name.startswith("."):
            return FolderSource(path, **given)
        known = ", ".join(sorted(registry))
        raise DataError(f"unknown dataset '{name}'; known datasets: {known} (or give a folder path)")
    kind = entry["kind"]
    if kind == "folder":
        params = _keywords(entry, "kind", "path")
        if "path" not in entry:
            raise ConfigError(f"dataset '{name}': kind 'folder' needs a 'path' (a folder of LoRA files)")
        folder = _relative_to(Path(entry["path"]).expanduser(), base)
        if is_hf_folder(folder):
            raise ConfigError(f"dataset '{name}': {folder} looks like a Hugging Face save_to_disk folder "
                              "(dataset_info.json), not a folder of LoRA files",
                              hint=f'declare it as kind = "hf" with path = "{entry["path"]}"')
        if "labels" in params:
            params["labels"] = Path(params["labels"])
        return FolderSource(folder, name=name, **{**params, **given})
    if kind == "demo":
        params = _keywords(entry, "kind")
        try:
            return DemoSource(name=name, cache_dir=cache_dir, **params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dataset '{name}': bad demo parameters: {exc}") from None
    if kind == "hf":
        ref = entry.get("id") or entry.get("path")
        if not ref:
            raise ConfigError(f"dataset '{name}': kind 'hf' needs an 'id' (hub id) or a 'path' (save_to_disk folder)")
        if entry.get("path") and not entry.get("id"):
            folder = _relative_to(Path(str(ref)).expanduser(), base)
            if not folder.exists() and Path(str(ref)).expanduser().exists():
                folder = Path(str(ref)).expanduser()  # relative to the working folder, as before
            if folder.is_dir() and not is_hf_folder(folder):
                raise ConfigError(f"dataset '{name}': {folder} is not a Hugging Face save_to_disk folder (no "
                                  "dataset_info.json)" + (", it looks like a folder of LoRA files" if
                                                           _has_lora_files(folder) else ""),
                                  hint=f'a folder of LoRA files is kind = "folder" with path = "{entry["path"]}"')
            ref = str(folder)
        params = {k: v for k, v in entry.items() if k in ("label_field", "split")}
        extra = {k: v for k, v in given.items() if k in ("label_field", "drop_nonfinite")}
        return HFDatasetSource(ref, name=name, **{**params, **extra})
    raise ConfigError(f"dataset '{name}': unknown kind '{kind}' (allowed: demo, folder, hf)")


def _keywords(entry: DatasetEntry, *drop: str) -> dict[str, Any]:
    """A registry entry's keys but ``drop``, as a source's keyword arguments."""
    return {k: v for k, v in entry.items() if k not in drop}


def _relative_to(path: Path, base: Path | None) -> Path:
    """A registry entry's path: relative ones are relative to the datasets.toml that names them."""
    return base / path if not path.is_absolute() and base is not None else path


def _has_lora_files(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*/*.safetensors"))
