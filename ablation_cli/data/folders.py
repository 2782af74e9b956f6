"""LoRAs stored as safetensors files in a folder, in three layouts:

- ``diffusers``: ``<root>/<sample>/pytorch_lora_weights.safetensors`` beside ``metadata.json``
  (what the diffusers DreamBooth LoRA script writes);
- ``peft``: ``<root>/<sample>/adapter_model.safetensors`` beside ``metadata.json``;
- ``flat``: ``<root>/<sample>.safetensors`` plus a labels file.

Labels come from each sample's metadata.json (field ``label_field``) or from a labels
file (``labels.csv`` with columns ``file,label`` or ``labels.json``) at the root or given
explicitly. Only safetensors is read: pickle files are refused, never loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli.data.keys import ParsedKey, key_style, parse_key
from ablation_cli.data.table import DatasetInfo, LoraTable
from ablation_cli.errors import DataError

log = logging.getLogger(__name__)

LAYOUT_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "peft": "adapter_model.safetensors"}
LAYOUTS = ("diffusers", "peft", "flat", "hf")
HEADER_SAMPLE = 5  # files whose headers decide the expected layer set
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
CONVERT_HINT = ("convert each file once with: python -c \"import torch, safetensors.torch as st; "
                "st.save_file(torch.load('in.pt', weights_only=True), 'out.safetensors')\"")


def _few(items: Iterable[Any], n: int = 3) -> str:
    items = [str(i) for i in items]
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


@dataclass(frozen=True)
class Sample:
    sample_id: str
    path: Path
    label: Any


def refuse_pickles(root: Path) -> None:
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if found:
        rel = [p.relative_to(root) for p in found]
        raise DataError(
            f"refusing to read {len(found)} pickle file(s) in {root}: {_few(rel)}; unpickling runs arbitrary "
            "code, so ablate reads only safetensors", hint=CONVERT_HINT)


def detect_layout(root: Path) -> str:
    for layout, filename in LAYOUT_FILES.items():
        if any(root.glob(f"*/{filename}")):
            return layout
    if any(root.glob("*.safetensors")):
        return "flat"
    raise DataError(f"no LoRA files found in {root}: expected */pytorch_lora_weights.safetensors (diffusers), "
                    "*/adapter_model.safetensors (peft) or *.safetensors (flat)")


def read_labels_file(path: Path) -> dict[str, Any]:
    """``file -> label`` from labels.csv (columns file,label) or labels.json (object or list of records)."""
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            if rows and not {"file", "label"} <= set(rows[0]):
                raise DataError(f"{path}: a labels CSV needs the columns file,label (found {', '.join(rows[0])})")
            return {row["file"]: row["label"] for row in rows}
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable labels file ({exc})") from None
    if isinstance(doc, dict):
        return dict(doc)
    if isinstance(doc, list) and all(isinstance(r, dict) and {"file", "label"} <= set(r) for r in doc):
        return {r["file"]: r["label"] for r in doc}
    raise DataError(f"{path}: labels JSON must be an object file -> label, or a list of {{file, label}} records")


def _lookup(labels: dict[str, Any], sample_id: str, path: Path, root: Path) -> Any:
    for key in (sample_id, path.name, str(path.relative_to(root))):
        if key in labels:
            return labels[key]
    return None


class FolderSource:
    def __init__(self, root: Path, name: str | None = None, layout: str | None = None,
                 labels: Path | None = None, label_field: str = "category_label",
                 on_mismatch: str = "error", drop_nonfinite: bool = False) -> None:
        if layout is not None and layout not in LAYOUTS:
            raise DataError(f"--format {layout}: unknown layout (allowed: {', '.join(LAYOUTS)})")
        if on_mismatch not in ("error", "skip"):
            raise DataError(f"--on-mismatch {on_mismatch}: allowed: error, skip")
        self.root = root
        self.name = name or root.name
        self.forced_layout = layout
        self.labels_path = labels
        self.label_field = label_field
        self.on_mismatch = on_mismatch
        self.drop_nonfinite = drop_nonfinite

    # -- scanning (cheap) -------------------------------------------------------------
    @cached_property
    def layout(self) -> str:
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        refuse_pickles(self.root)
        return self.forced_layout or detect_layout(self.root)

    @cached_property
    def samples(self) -> list[Sample]:
        layout = self.layout
        if layout == "flat":
            files = sorted(self.root.glob("*.safetensors"))
            ids = [p.stem for p in files]
        else:
            files = sorted(self.root.glob(f"*/{LAYOUT_FILES[layout]}"))
            ids = [p.parent.name for p in files]
        if not files:
            raise DataError(f"empty dataset: no {layout} LoRA files in {self.root}")
        labels_file = self.labels_path or next(
            (p for p in (self.root / "labels.csv", self.root / "labels.json") if p.exists()), None)
        table = read_labels_file(labels_file) if labels_file else {}
        samples, missing = [], []
        for sample_id, path in zip(ids, files):
            label = _lookup(table, sample_id, path, self.root)
            if label is None and layout != "flat":
                label = self._metadata_label(path.parent / "metadata.json")
            if label is None:
                missing.append(path.relative_to(self.root))
            samples.append(Sample(sample_id, path, label))
        if missing:
            where = (f"labels file {labels_file}" if labels_file else
                     f"metadata.json field '{self.label_field}'" if layout != "flat" else "a labels file")
            raise DataError(f"missing labels for {len(missing)} of {len(files)} LoRAs in {self.root} "
                            f"(looked in {where}): {_few(missing)}",
                            hint="add labels.csv (file,label) at the dataset root or pass --labels")
        return samples

    def _metadata_label(self, path: Path) -> Any:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return doc.get(self.label_field) if isinstance(doc, dict) else None

    def _fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.layout}|{self.label_field}".encode())
        for s in self.samples:
            st = s.path.stat()
            h.update(f"{s.path.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}|{s.label}\n".encode())
        return h.hexdigest()[:16]

    @cached_property
    def _header(self) -> tuple[list[str], str]:
        """The layer set shared by most of the first few files (headers only: cheap)."""
        sets: list[tuple[str, ...]] = []
        style = "unknown"
        for sample in self.samples[:HEADER_SAMPLE]:
            keys = _read_keys(sample.path)
            sets.append(tuple(sorted({p.layer for k in keys if (p := parse_key(k)) and p.kind != "alpha"})))
            style = key_style(keys) if style == "unknown" else style
        layers = max(sets, key=sets.count)
        if not layers:
            path = self.samples[0].path
            raise DataError(f"no LoRA tensors found in {path} (keys such as {_few(_read_keys(path))}); "
                            "expected UNet attention LoRA keys in diffusers, kohya-ss or PEFT spelling")
        return list(layers), style

    def describe(self) -> DatasetInfo:
        layers, style = self._header
        return DatasetInfo(name=self.name, kind=f"folder:{self.layout}", fingerprint=self._fingerprint(),
                           layers=tuple(layers), num_samples=len(self.samples),
                           details={"path": str(self.root), "layout": self.layout, "key_style": style,
                                    "label_field": self.label_field})

    # -- loading --------------------------------------------------------------------
    def load(self) -> LoraTable:
        info = self.describe()
        samples = self.samples
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            loaded = list(_progress(pool.map(_read_lora, (s.path for s in samples)), len(samples)))
        reference = set(info.layers)
        layer_ok = [set(t) == reference for t, _ in loaded]
        signatures = [tuple(t[layer].shape for layer in info.layers) if ok else None
                      for (t, _), ok in zip(loaded, layer_ok)]
        valid = [sig for sig in signatures if sig is not None]
        usual = max(set(valid), key=valid.count) if valid else None  # the majority's shapes
        keep, mismatched, bad_shape, nonfinite = [], [], [], []
        for sample, (tensors, _), sig in zip(samples, loaded, signatures):
            rel = sample.path.relative_to(self.root)
            if sig is None:
                mismatched.append(rel)
            elif sig != usual:
                bad_shape.append(rel)
            elif not all(np.isfinite(t).all() for t in tensors.values()):
                nonfinite.append(rel)
            else:
                keep.append(sample)
        if mismatched:
            msg = f"{len(mismatched)} of {len(samples)} LoRAs have a different layer set than {samples[0].path.name}"
            if self.on_mismatch == "error":
                raise DataError(f"{msg}: {_few(mismatched)}", hint="drop them with --on-mismatch skip")
            log.warning("%s; skipped (--on-mismatch skip): %s", msg, _few(mismatched))
        if bad_shape:
            raise DataError(f"{len(bad_shape)} LoRAs have matrix shapes (ranks) unlike the others: {_few(bad_shape)}")
        if nonfinite:
            if not self.drop_nonfinite:
                raise DataError(f"{len(nonfinite)} LoRAs contain NaN or Inf weights: {_few(nonfinite)}",
                                hint="fix or remove them, or drop them with --drop-nonfinite")
            log.warning("dropped %d LoRAs with NaN/Inf weights: %s", len(nonfinite), _few(nonfinite))
        if not keep:
            raise DataError(f"empty dataset: no usable LoRAs in {self.root}")
        by_path = {s.path: t for s, t in zip(samples, loaded)}
        weights = {layer: np.stack([by_path[s.path][0][layer] for s in keep]) for layer in info.layers}
        alphas = {m: np.array([by_path[s.path][1].get(m, np.nan) for s in keep], dtype=np.float32)
                  for m in sorted({m for s in keep for m in by_path[s.path][1]})}
        names = sorted({s.label for s in keep}, key=lambda v: (isinstance(v, str), v))
        index = {v: i for i, v in enumerate(names)}
        labels = np.array([index[s.label] for s in keep], dtype=np.int64)
        kept_info = DatasetInfo(info.name, info.kind, info.fingerprint, info.layers, len(keep), info.details)
        return LoraTable(info=kept_info, weights=weights, labels=labels, label_names=tuple(str(n) for n in names),
                         sample_ids=tuple(s.sample_id for s in keep), alphas=alphas)


def _read_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise DataError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _read_lora(path: Path) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Canonical layer -> float32 matrix, and module -> alpha (kohya), from one file."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                parsed: ParsedKey | None = parse_key(key)
                if parsed is None:
                    continue
                value = fh.get_tensor(key).float().numpy()
                if parsed.kind == "alpha":
                    alphas[parsed.module] = float(value.reshape(-1)[0])
                else:
                    tensors[parsed.layer] = value.reshape(value.shape[0], -1)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, alphas


def _progress(items: Iterable[Any], total: int) -> Iterable[Any]:
    step = max(1, total // 10)
    for i, item in enumerate(items, start=1):
        if i % step == 0 or i == total:
            log.info("  read %d/%d LoRA files", i, total)
        yield item
