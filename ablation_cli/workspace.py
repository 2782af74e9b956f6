"""Lazily loaded dataset, split and features for one process, backed by the feature cache.

Each representation is computed once per dataset, for every unit (factor matrix, or module for
``module`` representations) in sorted order, and kept in memory and in the feature cache. A layer
config is then a column selection: ``visual_only`` reuses what ``all_layers`` computed, and a
composite (ensemble) concatenates its parts' columns per layer. When the cache already holds the
dataset's index (labels, ids, layers) and the features a cell needs, the LoRA weights are not read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ablation_cli import features
from ablation_cli.config import SplitConfig
from ablation_cli.data.table import DatasetInfo, DatasetSource, Labelled, LoraTable
from ablation_cli.durable import crash_point
from ablation_cli.errors import DataError
from ablation_cli.features.cache import FeatureCache, dataset_key
from ablation_cli.features.matrix import compute_many
from ablation_cli.features.registry import Representation
from ablation_cli.training.split import Split, make_split, original_split

log = logging.getLogger(__name__)

ROW_CHUNK = 4096  # LoRAs per feature batch: bounds the float64 temporaries (~40 MB per 1,280-entry layer)


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

    def unit_shape(self, unit: str) -> tuple[int, ...]:
        """A layer's shape; a module's is its down factor's."""
        return self.shapes.get(unit) or self.shapes[unit + ".down"]

    @classmethod
    def from_table(cls, table: LoraTable) -> DatasetIndex:
        layers = tuple(sorted(table.weights))
        return cls(table.labels.astype(np.int64), tuple(table.label_names), tuple(table.sample_ids), layers,
                   {layer: tuple(table.weights[layer].shape[1:]) for layer in layers}, table.positions,
                   table.stored()[1])

    def to_json(self, info: DatasetInfo) -> dict[str, Any]:
        return {"dataset": info.name, "fingerprint": info.fingerprint, "labels": self.labels.tolist(),
                "label_names": list(self.label_names), "sample_ids": list(self.sample_ids),
                "layers": list(self.layers), "shapes": {k: list(v) for k, v in self.shapes.items()},
                "positions": None if self.positions is None else self.positions.tolist(),
                "stored_rows": self.stored()[1]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DatasetIndex:
        positions = doc["positions"]  # a KeyError for an index written before row positions: rebuilt
        return cls(np.asarray(doc["labels"], dtype=np.int64), tuple(doc["label_names"]), tuple(doc["sample_ids"]),
                   tuple(doc["layers"]), {k: tuple(v) for k, v in doc["shapes"].items()},
                   None if positions is None else np.asarray(positions, dtype=np.int64), int(doc["stored_rows"]))


def module_of(layer: str) -> str:
    return layer.rsplit(".", 1)[0]


def units(rep: Representation, layers: Sequence[str]) -> list[str]:
    """The columns' units for ``layers``: the layers, or the modules whose two factors are both selected."""
    if rep.unit == "matrix":
        return sorted(layers)
    chosen = set(layers)
    return sorted({module_of(la) for la in layers if {module_of(la) + ".down", module_of(la) + ".up"} <= chosen})


class Workspace:
    def __init__(self, source: DatasetSource, split: SplitConfig, cache: FeatureCache | None = None,
                 device: str = "cpu") -> None:
        self.source = source
        self.split_cfg = split
        self.cache = cache
        self.device = device  # features are computed with torch on a CUDA device, with numpy otherwise
        self._full: dict[str, tuple[np.ndarray, dict[str, slice]]] = {}  # rep -> (N, D), unit -> columns

    @cached_property
    def feature_device(self) -> Any:
        """A CUDA torch device when ``device`` names one (or is auto and one exists); None: numpy on CPU."""
        if self.device == "cpu":
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

    @cached_property
    def table(self) -> LoraTable:
        started = time.perf_counter()
        table = self.source.load()
        log.info("Loaded dataset %s: %d LoRAs, %d layers, %d classes (%.1fs)", table.info.name,
                 table.num_samples, len(table.layers), table.num_classes, time.perf_counter() - started)
        return table

    @cached_property
    def index(self) -> DatasetIndex:
        if self.cache is not None and (doc := self.cache.load_index(self.key)) is not None:
            if "stored_rows" not in doc:
                log.info("feature cache: the index of %s was written by an earlier ablate (no stored row "
                         "positions); reading the data once to rebuild it", self.info.name)
            else:
                try:
                    return DatasetIndex.from_json(doc)
                except (KeyError, TypeError, ValueError):
                    log.warning("feature cache: unreadable index for %s; reading the data", self.info.name)
        index = DatasetIndex.from_table(self.table)
        if self.cache is not None:
            self.cache.save_index(self.key, index.to_json(self.info))
        return index

    @cached_property
    def split(self) -> Split:
        s, index = self.split_cfg, self.index
        if s.method == "original":
            return original_split(*index.stored(), s.seed)
        return make_split(index.labels, s.train, s.val, s.test, s.seed, s.stratify, index.label_names)

    # -- features ---------------------------------------------------------------------------
    def features(self, rep_name: str, layers: Sequence[str]) -> np.ndarray:
        """(N, F) float32: the units selected by ``layers`` in sorted order, each unit's features in order."""
        rep = features.get(rep_name)
        chosen = units(rep, layers)
        if not chosen:
            raise DataError(f"representation {rep_name}: the layer selection holds no "
                            f"{'module with both factors' if rep.unit == 'module' else 'layer'}")
        blocks = []
        for unit in chosen:
            for part in rep.base:
                arr, columns = self._computed(part)
                blocks.append(arr[:, columns[unit]])
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)

    def columns(self, rep_name: str, layers: Sequence[str]) -> list[str]:
        """Column names ``<unit>/<feature>``, in the order of :meth:`features`."""
        rep = features.get(rep_name)
        return [f"{unit}/{name}" for unit in units(rep, layers)
                for name in rep.feature_names(self.index.unit_shape(unit))]

    def features_cached(self, rep_names: Sequence[str]) -> bool:
        """Whether the cache holds the dataset's index and every cacheable representation needed
        (meta files only: cheap; a corrupt entry is still detected, and recomputed, when read)."""
        if self.cache is None or not self.cache.has_index(self.key):
            return False
        return not self._uncached(rep_names)

    def cache_bytes_to_write(self, rep_names: Sequence[str]) -> int:
        """About how many bytes the feature cache will gain from computing ``rep_names`` (0 without a cache)."""
        n = len(self.index.labels) if self.cache is not None else 0
        return sum(n * self._layout(rep)[1] * 4 for rep in self._uncached(rep_names))

    def _uncached(self, rep_names: Sequence[str]) -> list[Representation]:
        """The cacheable parts of ``rep_names`` the cache does not hold (none without a cache)."""
        if self.cache is None:
            return []
        needed = {part.name: part for name in rep_names for part in features.get(name).base if part.cacheable}
        return [r for r in needed.values() if not self.cache.has(self.key, r.name, r.version)]

    def prepare(self, rep_names: Sequence[str]) -> None:
        """Make every representation in ``rep_names`` (composites: their parts) available, computing
        all missing per-matrix ones in a single pass over the data (each stack read once, shared
        intermediates), and filling the cache."""
        base: list[Representation] = []
        for name in rep_names:
            for part in features.get(name).base:
                if part.name not in self._full and part not in base:
                    base.append(part)
        if not base:
            return
        layouts = {rep.name: self._layout(rep) for rep in base}
        together = [r.name for r in base if r.unit == "matrix" and r.cacheable]
        if together:
            versions = {name: features.get(name).version for name in together}

            def compute(names: list[str]) -> dict[str, np.ndarray]:
                return self._compute_matrix_reps(names, layouts)

            if self.cache is not None:
                arrays = self.cache.get_or_compute_many(self.key, versions, compute,
                                                        {"dataset": self.info.name, "units": list(self.index.layers)})
            else:
                arrays = compute(together)
            for name in together:
                self._full[name] = (arrays[name], layouts[name][0])
        for rep in base:
            if rep.name in together:
                continue
            columns = layouts[rep.name][0]

            def compute_one(names: list[str], rep: Representation = rep) -> dict[str, np.ndarray]:
                return {rep.name: self._compute_other(rep, layouts[rep.name])}

            if self.cache is not None and rep.cacheable:
                arr = self.cache.get_or_compute_many(self.key, {rep.name: rep.version}, compute_one,
                                                     {"dataset": self.info.name, "units": list(columns)})[rep.name]
            else:
                arr = compute_one([rep.name])[rep.name]
            self._full[rep.name] = (arr, columns)

    def _layout(self, rep: Representation) -> tuple[dict[str, slice], int]:
        """Column slice of every unit of the dataset in the full (N, D) array, and D."""
        columns, offset = {}, 0
        for unit in units(rep, self.index.layers):
            width = rep.dim(self.index.unit_shape(unit))
            columns[unit] = slice(offset, offset + width)
            offset += width
        return columns, offset

    def _computed(self, rep: Representation) -> tuple[np.ndarray, dict[str, slice]]:
        if rep.name not in self._full:
            self.prepare([rep.name])
        return self._full[rep.name]

    def _compute_matrix_reps(self, names: list[str],
                             layouts: dict[str, tuple[dict[str, slice], int]]) -> dict[str, np.ndarray]:
        """Per-matrix representations, all in one pass: each layer's stack is read once, in row chunks
        (bounded temporaries), and its sorted entries, moments, SVD and FFT are shared."""
        table = self.table
        n = table.num_samples
        started = time.perf_counter()
        out = {name: np.empty((n, layouts[name][1]), dtype=np.float32) for name in names}
        computes = {name: features.get(name).compute for name in names}
        for layer in self.index.layers:
            crash_point("features")
            for lo in range(0, n, ROW_CHUNK):
                blocks = compute_many(table.weights[layer][lo : lo + ROW_CHUNK], computes, self.feature_device)
                for name, block in blocks.items():
                    _check_finite(block, name, layer)
                    out[name][lo : lo + ROW_CHUNK, layouts[name][0][layer]] = block
        log.info("Features %s: %d LoRAs in one pass on %s (%.1fs)", ", ".join(names), n,
                 self.feature_device or "cpu", time.perf_counter() - started)
        return out

    def _compute_other(self, rep: Representation, layout: tuple[dict[str, slice], int]) -> np.ndarray:
        """A module representation, or one that is not cached (flat_vec)."""
        table = self.table
        started = time.perf_counter()
        columns, width = layout
        out = np.empty((table.num_samples, width), dtype=np.float32)
        for unit, cols in columns.items():
            if rep.unit == "module":
                down, up = table.weights[unit + ".down"], table.weights[unit + ".up"]
                alpha = table.alphas.get(unit)
                rank = down.shape[1]
                scale = np.where(np.isfinite(alpha), alpha / rank, 1.0) if alpha is not None else 1.0
                block = rep.compute(down, up, scale)
            else:
                block = rep.compute(table.weights[unit])
            _check_finite(block, rep.name, unit)
            out[:, cols] = block
        log.info("Features %s: %d LoRAs x %d (%.1fs)", rep.name, table.num_samples, width,
                 time.perf_counter() - started)
        return out


def _check_finite(block: np.ndarray, rep: str, unit: str) -> None:
    if not np.isfinite(block).all():
        bad = int((~np.isfinite(block)).any(axis=1).sum())
        raise DataError(f"representation {rep}: non-finite features in layer {unit} for {bad} LoRA(s)")
