"""Lazily read dataset, split and features for one process, backed by the feature cache.

The data is streamed: one pass reads it chunk of rows by chunk (``STREAM_BYTES`` of weights at a time)
and computes every representation still missing for every unit of the chunk (factor matrix, or module
for ``module`` representations), so memory holds the feature outputs plus one chunk, whatever the
number of LoRAs; an output of ``SPILL_BYTES`` or more (flat_vec) is written through a memory map
straight into its cache entry. The dataset's checks (NaN/Inf, layer sets, shapes, labels) end the
pass, before anything is stored. A layer config is then a column selection: ``visual_only`` reuses
what ``all_layers`` computed, and a composite (ensemble) concatenates its parts' columns per layer.
When the cache already holds the dataset's index (labels, ids, layers) and the features a cell
needs, the LoRA weights are not read.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli import features
from ablation_cli.config import SplitConfig
from ablation_cli.data.table import STREAM_BYTES, DatasetInfo, DatasetSource, Labelled, LoraChunk, LoraTable
from ablation_cli.durable import crash_point
from ablation_cli.errors import DataError, PluginError, environment_failure
from ablation_cli.features.cache import FeatureCache, dataset_key
from ablation_cli.features.matrix import compute_many
from ablation_cli.features.registry import Representation
from ablation_cli.training.columns import ColumnView
from ablation_cli.training.split import Split, make_split, original_split

log = logging.getLogger(__name__)

SPILL_BYTES = 1 << 30  # a representation this large is written to the cache through a memory map


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
                for name in rep.feature_names(self.index.unit_shape(unit))]

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
        return sum(n * _layout(rep, shapes)[1] * 4 for rep in self._uncached(rep_names))

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

    def _entry_info(self, rep_name: str) -> dict[str, Any]:
        return {"dataset": self.info.name, "units": list(self._layout(features.get(rep_name))[0])}

    def _layout(self, rep: Representation) -> tuple[dict[str, slice], int]:
        return _layout(rep, self.index.shapes)

    def _computed(self, rep: Representation) -> tuple[np.ndarray, dict[str, slice]]:
        if rep.name not in self._full and rep.name not in self._failed:
            self.prepare([rep.name])
        if rep.name in self._failed:
            raise self._failed[rep.name]
        return self._full[rep.name]

    def _read(self, reps: list[Representation]) -> dict[str, np.ndarray]:
        """One pass over the data, chunk of rows by chunk: the index, and the features of ``reps``.

        Memory holds the outputs plus one chunk. A representation that fails (an exception, non-finite
        features) is dropped from the pass and recorded in ``_failed``; a bad dataset (NaN/Inf weights,
        mismatched files, missing labels) raises when the pass ends, before anything is stored."""
        started = time.perf_counter()
        stream = self.source.stream(STREAM_BYTES)
        capacity = self.info.num_samples or 0
        out: dict[str, np.ndarray] = {}
        layouts: dict[str, tuple[dict[str, slice], int]] = {}
        row = 0
        try:
            for chunk in stream:
                if not layouts:  # the first chunk tells the shapes
                    shapes = {layer: tuple(w.shape[1:]) for layer, w in chunk.weights.items()}
                    layouts = {rep.name: _layout(rep, shapes) for rep in reps}
                    out = {rep.name: self._output(rep, capacity, layouts[rep.name][1]) for rep in reps}
                size = chunk.num_rows
                if row + size > capacity:  # more rows than described: grow (rare; sources say their size)
                    capacity = max(2 * capacity, row + size)
                    out = {name: np.resize(arr, (capacity, arr.shape[1])) for name, arr in out.items()}
                live = [rep for rep in reps if rep.name not in self._failed]
                self._chunk_features(chunk, live, layouts, {name: arr[row : row + size] for name, arr in out.items()})
                row += size
                del chunk  # let it go before the next is read
            table = stream.table()  # the dataset's verdict: a DataError here leaves the cache untouched
        except BaseException:
            _discard(*out.values())
            raise
        _discard(*(arr for name, arr in out.items() if name in self._failed))
        log.info("Loaded dataset %s: %d LoRAs, %d layers, %d classes (%.1fs)", table.info.name, table.num_samples,
                 len(table.layers), table.num_classes, time.perf_counter() - started)
        if self._index is None:
            self._index = DatasetIndex.from_table(table)
            if self.cache is not None:
                self.cache.save_index(self.key, self._index.to_json(self.info))
        if row != table.num_samples:
            raise DataError(f"dataset {self.info.name}: read {row} rows, expected {table.num_samples}")
        done = {rep.name: out[rep.name][:row] for rep in reps if rep.name not in self._failed}
        if done:
            log.info("Features %s: %d LoRAs in one pass on %s (%.1fs)", ", ".join(done), row,
                     self.feature_device or "cpu", time.perf_counter() - started)
        return done

    def _output(self, rep: Representation, rows: int, width: int) -> np.ndarray:
        """Where the pass writes a representation: memory, or for one of SPILL_BYTES or more (flat_vec) a
        memory-mapped file in the feature cache that becomes its entry (never held in memory twice)."""
        if self.cache is not None and rep.cacheable and rows * width * 4 >= SPILL_BYTES:
            try:
                return self.cache.spill(self.key, rep.name, rep.cache_version, (rows, width))
            except OSError as exc:
                if environment_failure(exc) is None:
                    raise
                log.warning("feature cache: cannot stage %s in %s (%s); computing it in memory",
                            rep.name, self.cache.root, exc)
        return np.empty((rows, width), dtype=np.float32)

    def _chunk_features(self, chunk: LoraChunk, reps: list[Representation],
                        layouts: dict[str, tuple[dict[str, slice], int]], out: dict[str, np.ndarray]) -> None:
        """The features of one chunk of rows into ``out`` (each rep's rows of this chunk)."""
        matrix = {rep.name: rep.compute for rep in reps if rep.unit == "matrix"}
        for layer in sorted(chunk.weights):
            crash_point("features")
            for name, block in self._attempt(lambda fns, x=chunk.weights[layer]: compute_many(x, fns,
                                             self.feature_device), matrix, layer).items():
                out[name][:, layouts[name][0][layer]] = block
        for rep in reps:
            if rep.unit != "module":
                continue
            for unit, cols in layouts[rep.name][0].items():
                down, up = chunk.weights[unit + ".down"], chunk.weights[unit + ".up"]
                alpha = chunk.alphas.get(unit)
                scale = np.where(np.isfinite(alpha), alpha / down.shape[1], 1.0) if alpha is not None else 1.0

                def one(fns: dict[str, Any], down: np.ndarray = down, up: np.ndarray = up,
                        scale: Any = scale) -> dict[str, np.ndarray]:
                    return {name: fn(down, up, scale) for name, fn in fns.items()}

                for name, block in self._attempt(one, {rep.name: rep.compute}, unit).items():
                    out[name][:, cols] = block

    def _attempt(self, run: Any, fns: dict[str, Any], unit: str) -> dict[str, np.ndarray]:
        """``run(fns)`` for the representations not failed yet; on an error, each alone, to find which
        failed (recorded in ``_failed``, warned once, dropped from the rest of the pass)."""
        fns = {name: fn for name, fn in fns.items() if name not in self._failed}
        if not fns:
            return {}
        try:
            blocks = run(fns)
            for name, block in blocks.items():
                _check_finite(block, name, unit)
            return dict(blocks)
        except Exception as exc:
            if isinstance(exc, PluginError) or (isinstance(exc, OSError) and environment_failure(exc) is not None):
                raise  # a plugin's bad output: exit 2 before anything of the pass is stored
            if len(fns) == 1:
                name = next(iter(fns))
                self._failed[name] = exc
                log.warning("Features %s failed (%s: %s); its cells will report it", name, type(exc).__name__, exc)
                return {}
        good: dict[str, np.ndarray] = {}
        for name, fn in fns.items():
            good.update(self._attempt(run, {name: fn}, unit))
        return good


def _may_have_cuda() -> bool:
    """False only where there is surely no NVIDIA GPU (Linux without its driver): the feature pass then
    skips importing torch just to ask (over a second of every `ablate features` on a CPU machine)."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return True
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def _discard(*arrays: np.ndarray) -> None:
    """Remove the staged cache files of outputs written through a memory map (a pass that failed)."""
    for arr in arrays:
        if isinstance(arr, np.memmap) and arr.filename:
            Path(arr.filename).unlink(missing_ok=True)


def _layout(rep: Representation, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, slice], int]:
    """Column slice of every unit of a dataset with these layer shapes in the full (N, D) array, and D."""
    columns, offset = {}, 0
    for unit in units(rep, sorted(shapes)):
        width = rep.dim(shapes.get(unit) or shapes[unit + ".down"])
        columns[unit] = slice(offset, offset + width)
        offset += width
    return columns, offset


def _check_finite(block: np.ndarray, rep: str, unit: str) -> None:
    if not np.isfinite(block).all():
        bad = int((~np.isfinite(block)).any(axis=1).sum())
        raise DataError(f"representation {rep}: non-finite features in layer {unit} for {bad} LoRA(s)")
