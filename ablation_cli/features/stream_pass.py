"""The streamed feature pass: one read of a dataset, chunk of rows by chunk, computing every
representation asked for on each chunk.

Memory holds the feature outputs plus one chunk (``STREAM_BYTES`` of weights), whatever the number of
LoRAs; an output of ``SPILL_BYTES`` or more (flat_vec) is written through a memory map straight into its
cache entry. The dataset's checks (NaN/Inf, layer sets, shapes, labels) end the pass, before anything
is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli.data.table import STREAM_BYTES, DatasetSource, LoraChunk, LoraTable
from ablation_cli.durable import crash_point
from ablation_cli.errors import DataError, PluginError, environment_failure
from ablation_cli.features.cache import FeatureCache
from ablation_cli.features.matrix import compute_many
from ablation_cli.features.registry import Representation

log = logging.getLogger(__name__)

SPILL_BYTES = 1 << 30  # a representation this large is written to the cache through a memory map

Layout = tuple[dict[str, slice], int]  # each unit's columns in the full (N, D) array, and D
Computes = dict[str, Callable[..., np.ndarray]]  # representation -> its compute function


def module_of(layer: str) -> str:
    return layer.rsplit(".", 1)[0]


def units(rep: Representation, layers: Sequence[str]) -> list[str]:
    """The columns' units for ``layers``: the layers, or the modules whose two factors are both selected."""
    if rep.unit == "matrix":
        return sorted(layers)
    chosen = set(layers)
    return sorted({module_of(la) for la in layers if {module_of(la) + ".down", module_of(la) + ".up"} <= chosen})


def layout(rep: Representation, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """Column slice of every unit of a dataset with these layer shapes in the full (N, D) array, and D."""
    columns, offset = {}, 0
    for unit in units(rep, sorted(shapes)):
        width = rep.unit_dim(unit, shapes)
        columns[unit] = slice(offset, offset + width)
        offset += width
    return columns, offset


@dataclass(frozen=True)
class PassResult:
    """What a pass read: the dataset's rows (no weights), how many rows it streamed, and the features of
    every representation that did not fail, one row per streamed row."""

    table: LoraTable
    rows: int
    arrays: dict[str, np.ndarray]


class FeaturePass:
    """One pass over ``source``. A representation that fails (an exception, non-finite features) is
    dropped from the pass and recorded in ``failed``; a bad dataset (NaN/Inf weights, mismatched files,
    missing labels) raises when the pass ends, before anything is stored."""

    def __init__(self, source: DatasetSource, capacity: int, cache: FeatureCache | None, key: str,
                 device: Any, failed: dict[str, Exception]) -> None:
        self.source, self.capacity = source, capacity  # capacity: the rows the source says it holds
        self.cache, self.key = cache, key
        self.device = device  # a CUDA torch device, or None: numpy on CPU
        self.failed = failed

    def run(self, reps: list[Representation]) -> PassResult:
        started = time.perf_counter()
        stream = self.source.stream(STREAM_BYTES)
        capacity = self.capacity
        out: dict[str, np.ndarray] = {}
        layouts: dict[str, Layout] = {}
        row = 0
        try:
            for chunk in stream:
                if not layouts:  # the first chunk tells the shapes
                    shapes = {layer: tuple(w.shape[1:]) for layer, w in chunk.weights.items()}
                    layouts = {rep.name: layout(rep, shapes) for rep in reps}
                    out = {rep.name: self._output(rep, capacity, layouts[rep.name][1]) for rep in reps}
                size = chunk.num_rows
                if row + size > capacity:  # more rows than described: grow (rare; sources say their size)
                    capacity = max(2 * capacity, row + size)
                    out = {name: np.resize(arr, (capacity, arr.shape[1])) for name, arr in out.items()}
                live = [rep for rep in reps if rep.name not in self.failed]
                self._chunk_features(chunk, live, layouts, {name: arr[row : row + size] for name, arr in out.items()})
                row += size
                del chunk  # let it go before the next is read
            table = stream.table()  # the dataset's verdict: a DataError here leaves the cache untouched
        except BaseException:
            _discard(*out.values())
            raise
        _discard(*(arr for name, arr in out.items() if name in self.failed))
        log.info("Loaded dataset %s: %d LoRAs, %d layers, %d classes (%.1fs)", table.info.name, table.num_samples,
                 len(table.layers), table.num_classes, time.perf_counter() - started)
        return PassResult(table, row, {rep.name: out[rep.name][:row] for rep in reps if rep.name not in self.failed})

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
                        layouts: dict[str, Layout], out: dict[str, np.ndarray]) -> None:
        """The features of one chunk of rows into ``out`` (each rep's rows of this chunk)."""
        matrix = {rep.name: rep.compute for rep in reps if rep.unit == "matrix"}
        for layer in sorted(chunk.weights):
            crash_point("features")

            def stack(fns: Computes, x: np.ndarray = chunk.weights[layer]) -> dict[str, np.ndarray]:
                return compute_many(x, fns, self.device)

            for name, block in self._attempt(stack, matrix, layer).items():
                out[name][:, layouts[name][0][layer]] = block
        for rep in reps:
            if rep.unit != "module":
                continue
            for unit, cols in layouts[rep.name][0].items():
                down, up = chunk.weights[unit + ".down"], chunk.weights[unit + ".up"]
                alpha = chunk.alphas.get(unit)
                scale = np.where(np.isfinite(alpha), alpha / down.shape[1], 1.0) if alpha is not None else 1.0

                extra = {"unit": unit} if rep.named_unit else {}  # a sketch is seeded by its module's name

                def one(fns: Computes, down: np.ndarray = down, up: np.ndarray = up, scale: Any = scale,
                        extra: dict[str, str] = extra) -> dict[str, np.ndarray]:
                    return {name: fn(down, up, scale, **extra) for name, fn in fns.items()}

                for name, block in self._attempt(one, {rep.name: rep.compute}, unit).items():
                    out[name][:, cols] = block

    def _attempt(self, run: Callable[[Computes], Mapping[str, np.ndarray]], fns: Computes,
                 unit: str) -> dict[str, np.ndarray]:
        """``run(fns)`` for the representations not failed yet; on an error, each alone, to find which
        failed (recorded in ``failed``, warned once, dropped from the rest of the pass)."""
        fns = {name: fn for name, fn in fns.items() if name not in self.failed}
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
                self.failed[name] = exc
                log.warning("Features %s failed (%s: %s); its cells will report it", name, type(exc).__name__, exc)
                return {}
        good: dict[str, np.ndarray] = {}
        for name, fn in fns.items():
            good.update(self._attempt(run, {name: fn}, unit))
        return good


def _discard(*arrays: np.ndarray) -> None:
    """Remove the staged cache files of outputs written through a memory map (a pass that failed)."""
    for arr in arrays:
        if isinstance(arr, np.memmap) and arr.filename:
            Path(arr.filename).unlink(missing_ok=True)


def _check_finite(block: np.ndarray, rep: str, unit: str) -> None:
    if not np.isfinite(block).all():
        bad = int((~np.isfinite(block)).any(axis=1).sum())
        raise DataError(f"representation {rep}: non-finite features in layer {unit} for {bad} LoRA(s)")
