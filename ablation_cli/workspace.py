"""Lazily read dataset, split and features for one process, backed by the feature cache.

Features missing from the cache are computed by one streamed pass over the data
(features/stream_pass.py). A layer config is then a column selection: ``visual_only`` reuses what
``all_layers`` computed, and a composite (ensemble) concatenates its parts' columns per layer. When the
cache already holds the dataset's index (labels, ids, layers) and the features a cell needs, the LoRA
weights are not read.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli import features
from ablation_cli.config import SplitConfig
from ablation_cli.data.table import DatasetInfo, DatasetSource, Labelled, LoraTable
from ablation_cli.errors import DataError
from ablation_cli.features.cache import FeatureCache, dataset_key
from ablation_cli.features.cache_docs import EntryInfo, IndexDoc
from ablation_cli.features.registry import Representation
from ablation_cli.features.stream_pass import FeaturePass, Layout, layout, units
from ablation_cli.training.columns import ColumnView
from ablation_cli.training.split import Split, make_split, original_split

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DatasetIndex(Labelled):
    """Everything but the weights: enough to split, label and name feature columns."""

    labels: np.ndarray  # (N,) int64
    label_names: tuple[str, ...]
    sample_ids: tuple[str, ...]
    layers: tuple[str, ...]  # canonical, sorted
    shapes: dict[str, tuple[int, ...]]  # layer -> (out, in)
    positions: np.ndarray | None = None
    stored_rows: int | None = None

    @classmethod
    def from_table(cls, table: LoraTable) -> DatasetIndex:
        layers = tuple(sorted(table.weights))
        return cls(table.labels.astype(np.int64), tuple(table.label_names), tuple(table.sample_ids), layers,
                   {layer: tuple(table.weights[layer].shape[1:]) for layer in layers}, table.positions,
                   table.stored()[1])

    def to_json(self, info: DatasetInfo) -> IndexDoc:
        return {"dataset": info.name, "fingerprint": info.fingerprint, "labels": self.labels.tolist(),
                "label_names": list(self.label_names), "sample_ids": list(self.sample_ids),
                "layers": list(self.layers), "shapes": {k: list(v) for k, v in self.shapes.items()},
                "positions": None if self.positions is None else self.positions.tolist(),
                "stored_rows": self.stored()[1]}

    @classmethod
    def from_json(cls, doc: IndexDoc) -> DatasetIndex:
        positions = doc["positions"]  # a KeyError for an index written before row positions: rebuilt
        return cls(np.asarray(doc["labels"], dtype=np.int64), tuple(doc["label_names"]), tuple(doc["sample_ids"]),
                   tuple(doc["layers"]), {k: tuple(v) for k, v in doc["shapes"].items()},
                   None if positions is None else np.asarray(positions, dtype=np.int64), int(doc["stored_rows"]))


class Workspace:
    def __init__(self, source: DatasetSource, split: SplitConfig, cache: FeatureCache | None = None,
                 device: str = "cpu") -> None:
        self.source = source
        self.split_cfg = split
        self.cache = cache
        self.device = device  # features are computed with torch on a CUDA device, with numpy otherwise
        self._full: dict[str, tuple[np.ndarray, dict[str, slice]]] = {}  # rep -> (N, D), unit -> columns
        self._failed: dict[str, Exception] = {}  # rep -> why computing it failed (its cells report it)
        self._index: DatasetIndex | None = None

    @cached_property
    def feature_device(self) -> Any:
        """A CUDA torch device when ``device`` names one (or is auto and one exists); None: numpy on CPU."""
        if self.device == "cpu" or (self.device == "auto" and not _may_have_cuda()):
            return None
        import torch  # only to look for a GPU; the CPU path is numpy

        if not torch.cuda.is_available():
            return None
        return torch.device("cuda" if self.device == "auto" else self.device)

    @cached_property
    def info(self) -> DatasetInfo:
        return self.source.describe()

    @cached_property
    def key(self) -> str:
        return dataset_key(self.info)

    @property
    def index(self) -> DatasetIndex:
        """Labels, ids, layers and shapes: from the cache, else from a pass over the data (which checks it).
        Call :meth:`prepare` first when features are needed too: its pass gives the index as well
        (``info.layers`` names the layers without reading anything)."""
        if self._index is None:
            self._index = self._cached_index()
        if self._index is None:
            self._read([])
        assert self._index is not None
        return self._index

    def _cached_index(self) -> DatasetIndex | None:
        if self.cache is None or (doc := self.cache.load_index(self.key)) is None:
            return None
        if "stored_rows" not in doc:
            log.info("feature cache: the index of %s was written by an earlier ablate (no stored row "
                     "positions); reading the data once to rebuild it", self.info.name)
            return None
        try:
            return DatasetIndex.from_json(doc)
        except (KeyError, TypeError, ValueError):
            log.warning("feature cache: unreadable index for %s; reading the data", self.info.name)
            return None

    @cached_property
    def split(self) -> Split:
        s, index = self.split_cfg, self.index
        if s.method == "original":
            return original_split(*index.stored(), s.seed)
        return make_split(index.labels, s.train, s.val, s.test, s.seed, s.stratify, index.label_names)

    # -- features ---------------------------------------------------------------------------
    def features(self, rep_name: str, layers: Sequence[str]) -> np.ndarray:
        """(N, F) float32: the units selected by ``layers`` in sorted order, each unit's features in order."""
        return self.feature_view(rep_name, layers).array()

    def feature_view(self, rep_name: str, layers: Sequence[str]) -> ColumnView:
        """The columns of :meth:`features` as a view of the computed arrays, nothing copied: a layer
        selection, or a composite's parts, gathered only for the rows (and columns) asked for."""
        rep = features.get(rep_name)
        chosen = units(rep, layers)
        if not chosen:
            raise DataError(f"representation {rep_name}: the layer selection holds no "
                            f"{'module with both factors' if rep.unit == 'module' else 'layer'}")
        sources: dict[str, tuple[np.ndarray, list[int], list[int]]] = {}  # part -> (array, columns, positions)
        width = 0
        for unit in chosen:
            for part in rep.base:
                arr, columns = self._computed(part)
                cols = columns[unit]
                _, src, dst = sources.setdefault(part.name, (arr, [], []))
                src.extend(range(cols.start, cols.stop))
                dst.extend(range(width, width + cols.stop - cols.start))
                width += cols.stop - cols.start
        return ColumnView([(arr, np.asarray(src, dtype=np.intp), np.asarray(dst, dtype=np.intp))
                           for arr, src, dst in sources.values()], width)

    def columns(self, rep_name: str, layers: Sequence[str]) -> list[str]:
        """Column names ``<unit>/<feature>``, in the order of :meth:`features`."""
        rep = features.get(rep_name)
        return [f"{unit}/{name}" for unit in units(rep, layers)
                for name in rep.unit_names(unit, self.index.shapes)]

    def features_cached(self, rep_names: Sequence[str]) -> bool:
        """Whether the cache holds the dataset's index and every cacheable representation needed
        (meta files only: cheap; a corrupt entry is still detected, and recomputed, when read)."""
        if self.cache is None or not self.cache.has_index(self.key):
            return False
        return not self._uncached(rep_names)

    def cache_bytes_to_write(self, rep_names: Sequence[str]) -> int:
        """About how many bytes the feature cache will gain from computing ``rep_names`` (0 without a cache,
        or when the layers' shapes are not known before reading the data)."""
        shapes = self._index.shapes if self._index is not None else self.info.shapes
        if self.cache is None or not shapes:
            return 0
        n = self.info.num_samples or 0
        return sum(n * layout(rep, shapes)[1] * 4 for rep in self._uncached(rep_names))

    def _uncached(self, rep_names: Sequence[str]) -> list[Representation]:
        """The cacheable parts of ``rep_names`` the cache does not hold (none without a cache)."""
        if self.cache is None:
            return []
        needed = {part.name: part for name in rep_names for part in features.get(name).base if part.cacheable}
        return [r for r in needed.values() if not self.cache.has(self.key, r.name, r.cache_version)]

    def prepare(self, rep_names: Sequence[str]) -> None:
        """Make every representation in ``rep_names`` (composites: their parts) available: those the cache
        lacks are computed together in one pass over the data (each chunk of rows read once, shared
        intermediates), and stored in the cache. A representation whose computation fails is left out
        (its cells report the error); a bad dataset raises its DataError before anything is stored."""
        base: list[Representation] = []
        for name in rep_names:
            for part in features.get(name).base:
                if part.name not in self._full and part.name not in self._failed and part not in base:
                    base.append(part)
        if not base:
            return
        uncacheable = [r for r in base if self.cache is None or not r.cacheable]
        arrays: dict[str, np.ndarray] = {}
        if self.cache is not None and (cacheable := {r.name: r.cache_version for r in base if r.cacheable}):
            def compute(names: list[str]) -> dict[str, np.ndarray]:
                computed = self._read([features.get(n) for n in names] + uncacheable)
                arrays.update(computed)
                return computed

            arrays.update(self.cache.get_or_compute_many(self.key, cacheable, compute, self._entry_info))
        if missing := [r for r in uncacheable if r.name not in arrays]:
            arrays.update(self._read(missing))
        for rep in base:
            if rep.name in arrays:
                self._full[rep.name] = (arrays[rep.name], self._layout(rep)[0])

    def _entry_info(self, rep_name: str) -> EntryInfo:
        return {"dataset": self.info.name, "units": list(self._layout(features.get(rep_name))[0])}

    def _layout(self, rep: Representation) -> Layout:
        return layout(rep, self.index.shapes)

    def _computed(self, rep: Representation) -> tuple[np.ndarray, dict[str, slice]]:
        if rep.name not in self._full and rep.name not in self._failed:
            self.prepare([rep.name])
        if rep.name in self._failed:
            raise self._failed[rep.name]
        return self._full[rep.name]

    def _read(self, reps: list[Representation]) -> dict[str, np.ndarray]:
        """One pass over the data (:class:`FeaturePass`): the index, and the features of ``reps`` that did
        not fail (those that did are recorded in ``_failed``)."""
        started = time.perf_counter()
        device = self.feature_device if reps else None  # the index alone: leave torch unimported
        read = FeaturePass(self.source, self.info.num_samples or 0, self.cache, self.key, device,
                           self._failed).run(reps)
        if self._index is None:
            self._index = DatasetIndex.from_table(read.table)
            if self.cache is not None:
                self.cache.save_index(self.key, self._index.to_json(self.info))
        if read.rows != read.table.num_samples:
            raise DataError(f"dataset {self.info.name}: read {read.rows} rows, expected {read.table.num_samples}")
        if read.arrays:
            log.info("Features %s: %d LoRAs in one pass on %s (%.1fs)", ", ".join(read.arrays), read.rows,
                     self.feature_device or "cpu", time.perf_counter() - started)
        return read.arrays


def _may_have_cuda() -> bool:
    """False only where there is surely no NVIDIA GPU (Linux without its driver): the feature pass then
    skips importing torch just to ask (over a second of every `ablate features` on a CPU machine)."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return True
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()
