"""LoRAs stored as safetensors files in a folder, in three layouts:

- ``diffusers``: ``<root>/<sample>/pytorch_lora_weights.safetensors`` beside ``metadata.json``
  (what the diffusers DreamBooth LoRA script writes);
- ``peft``: ``<root>/<sample>/adapter_model.safetensors`` beside ``metadata.json`` (and PEFT's
  ``adapter_config.json``, whose alphas are read: ``data/alphas.py``);
- ``flat``: ``<root>/<sample>.safetensors`` plus a labels file.

Labels come from each sample's metadata.json (field ``label_field``) or from a labels
file (``labels.csv`` with columns ``file,label`` or ``labels.json``) at the root or given
explicitly. Only safetensors is read: pickle files are refused, never loaded.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli.data.alphas import PEFT_CONFIG, AlphaConfig, read_adapter_config
from ablation_cli.data.keys import key_style
from ablation_cli.data.safetensors_reader import (
    NONFINITE,
    OK,
    OTHER_LAYERS,
    OTHER_SHAPES,
    SafetensorsReader,
    read_header,
)
from ablation_cli.data.table import (
    STREAM_BYTES,
    DatasetInfo,
    LoraStream,
    LoraTable,
    RowOptions,
    changed_options,
    collect,
    empty_weights,
)
from ablation_cli.errors import DataError, environment_or

log = logging.getLogger(__name__)

LAYOUT_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "peft": "adapter_model.safetensors"}
LAYOUTS = ("diffusers", "peft", "flat", "hf")
HEADER_SAMPLE = 5  # files whose headers decide the expected layer set
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
CONVERT_HINT = ("convert each file once with: python -c \"import torch, safetensors.torch as st; "
                "st.save_file(torch.load('in.pt', weights_only=True), 'out.safetensors')\"")


# The defaults of the options that decide which rows are kept (``DatasetInfo.options``).
ROW_OPTION_DEFAULTS: RowOptions = {"on_mismatch": "error", "drop_nonfinite": False}


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
        raise environment_or(exc, DataError(f"{path}: unreadable labels file ({exc})")) from None
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

    @cached_property
    def _configs(self) -> list[AlphaConfig | None] | None:
        """Each PEFT adapter's config (None where it has none), whose alphas apply to its LoRA."""
        if self.layout != "peft":
            return None
        return [read_adapter_config(s.path.parent / PEFT_CONFIG) for s in self.samples]

    def _fingerprint(self) -> str:
        """A LoRA file's size and mtime stand for its tensors and metadata; a PEFT config's alphas are
        hashed where they are not scale 1 (those read as a LoRA without one: their fingerprint is kept)."""
        h = hashlib.sha256(f"{self.layout}|{self.label_field}".encode())
        configs = self._configs
        for i, s in enumerate(self.samples):
            st = s.path.stat()
            h.update(f"{s.path.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}|{s.label}\n".encode())
            if configs is not None and (config := configs[i]) is not None and not config.is_identity:
                h.update(f"alpha|{config.digest()}\n".encode())
        return h.hexdigest()[:16]

    @cached_property
    def _header(self) -> tuple[dict[str, tuple[int, ...]], str]:
        """Layer -> shape shared by most of the first few files (headers only: cheap), and the key style."""
        found: list[tuple[tuple[str, tuple[int, ...]], ...]] = []
        style, first_keys = "unknown", list[str]()
        for sample in self.samples[:HEADER_SAMPLE]:
            shapes, keys = read_header(sample.path)
            found.append(tuple(sorted(shapes.items())))
            first_keys = first_keys or keys
            style = key_style(keys) if style == "unknown" else style
        usual = max(found, key=found.count)
        if not usual:
            path = self.samples[0].path
            raise DataError(f"no LoRA tensors found in {path} (keys such as {_few(first_keys)}); "
                            "expected UNet attention LoRA keys in diffusers, kohya-ss or PEFT spelling")
        return dict(usual), style

    @property
    def options(self) -> RowOptions:
        """The row options not at their defaults that the fingerprint does not cover: it hashes the label
        field and every sample's label (whether from metadata.json or a labels file), not what is dropped."""
        return changed_options({"on_mismatch": self.on_mismatch, "drop_nonfinite": self.drop_nonfinite},
                               ROW_OPTION_DEFAULTS)

    def describe(self) -> DatasetInfo:
        shapes, style = self._header
        return DatasetInfo(name=self.name, kind=f"folder:{self.layout}", fingerprint=self._fingerprint(),
                           layers=tuple(shapes), num_samples=len(self.samples),
                           details={"path": str(self.root), "layout": self.layout, "key_style": style,
                                    "label_field": self.label_field, "on_mismatch": self.on_mismatch,
                                    "drop_nonfinite": self.drop_nonfinite}, shapes=shapes, options=self.options)

    # -- loading --------------------------------------------------------------------
    def load(self) -> LoraTable:
        """The whole dataset in memory (one chunk)."""
        return collect(self.stream(None))

    def stream(self, chunk_bytes: int | None = STREAM_BYTES) -> LoraStream:
        """Files read in chunks of rows (about ``chunk_bytes`` of weights; None: one chunk), each file once,
        straight into the chunk's preallocated (rows, out, in) arrays by a few reader threads."""
        info = self.describe()
        shapes = self._header[0]
        reader = SafetensorsReader([s.path for s in self.samples], shapes, self._configs)
        return LoraStream(reader.chunks(reader.rows_per_chunk(chunk_bytes)),
                          lambda: self._checked(info, reader.status, shapes, reader.alphas))

    def _checked(self, info: DatasetInfo, status: np.ndarray, shapes: dict[str, tuple[int, ...]],
                 alphas: dict[str, np.ndarray]) -> LoraTable:
        """After every file was read: the dataset's verdict (a DataError) or its rows (no weights)."""
        samples, n = self.samples, len(self.samples)
        rel = [s.path.relative_to(self.root) for s in samples]
        mismatched, bad_shape, nonfinite = ([rel[i] for i in np.flatnonzero(status == c)] for c in
                                          (OTHER_LAYERS, OTHER_SHAPES, NONFINITE))
        if mismatched:
            msg = f"{len(mismatched)} of {n} LoRAs have a different layer set than {samples[0].path.name}"
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
        ok = status == OK
        if not ok.any():
            raise DataError(f"empty dataset: no usable LoRAs in {self.root}")
        keep = [s for s, good in zip(samples, ok) if good]
        names = sorted({s.label for s in keep}, key=lambda v: (isinstance(v, str), v))
        index = {v: i for i, v in enumerate(names)}
        labels = np.array([index[s.label] for s in keep], dtype=np.int64)
        kept_info = dataclasses.replace(info, num_samples=len(keep))
        return LoraTable(info=kept_info, weights=empty_weights(shapes), labels=labels,
                         label_names=tuple(str(n) for n in names), sample_ids=tuple(s.sample_id for s in keep),
                         alphas={m: a[ok] for m, a in sorted(alphas.items())},
                         positions=None if ok.all() else np.flatnonzero(ok), stored_rows=n)
