"""The in-memory form of a dataset: per-layer weight stacks plus labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, cast

import numpy as np


class RowOptions(TypedDict, total=False):
    """Loading options that decide which rows and labels are read (a source's defaults, or those changed)."""

    label_field: str
    split: str
    on_mismatch: str
    drop_nonfinite: bool


def changed_options(values: RowOptions, defaults: RowOptions) -> RowOptions:
    """The options in ``values`` not at their ``defaults``, in ``values``' order."""
    return cast(RowOptions, {k: v for k, v in values.items() if v != defaults.get(k)})


@dataclass(frozen=True)
class DatasetInfo:
    """What can be known about a dataset without reading its weights (cheap)."""

    name: str
    kind: str
    fingerprint: str
    layers: tuple[str, ...]
    num_samples: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # layer -> (out, in) when cheap to know
    # Loading options that change which rows or labels are read and that ``fingerprint`` does not cover,
    # only those not at their defaults (so the cells of a dataset read as before keep their fingerprints):
    # the cell fingerprint's data part and the feature cache's dataset key carry them.
    options: Mapping[str, Any] = field(default_factory=dict)


class Labelled:
    """Rows with class labels: ``labels`` (N,) int64 indices into ``label_names`` (sorted order).

    ``positions`` maps each row to its row in the dataset as stored (before LoRAs were dropped by
    ``--drop-nonfinite`` or ``--on-mismatch skip``), out of ``stored_rows``; None: nothing was dropped.
    The original script's split is defined on stored rows.
    """

    labels: np.ndarray
    label_names: tuple[str, ...]
    positions: np.ndarray | None
    stored_rows: int | None

    def stored(self) -> tuple[np.ndarray, int]:
        """(positions, stored_rows), the identity when nothing was dropped."""
        n = self.num_samples
        positions = self.positions if self.positions is not None else np.arange(n, dtype=np.int64)
        return positions, self.stored_rows if self.stored_rows is not None else n

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def label_mapping(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


@dataclass(frozen=True)
class LoraTable(Labelled):
    """N LoRAs: ``weights[layer]`` is an (N, out, in) float32 stack, rows in dataset order."""

    info: DatasetInfo
    weights: Mapping[str, np.ndarray]
    labels: np.ndarray  # (N,) int64 class indices
    label_names: tuple[str, ...]  # class index -> name (sorted order)
    sample_ids: tuple[str, ...]
    # module -> (N,) alpha (kohya .alpha, PEFT config, diffusers metadata: data/alphas.py), NaN if absent
    alphas: Mapping[str, np.ndarray] = field(default_factory=dict)
    positions: np.ndarray | None = None  # (N,) row in the stored dataset; None: no row was dropped
    stored_rows: int | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.info.layers


STREAM_BYTES = 256 << 20  # weights per chunk of rows read: what a pass over a dataset holds of it at once


@dataclass(frozen=True)
class LoraChunk:
    """Consecutive kept rows of a dataset: ``weights[layer]`` (n, out, in) float32, ``alphas[module]`` (n,)."""

    weights: Mapping[str, np.ndarray]
    alphas: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(next(iter(self.weights.values())).shape[0]) if self.weights else 0


class LoraStream:
    """A dataset read in chunks of rows, so that memory holds one chunk, not the dataset.

    Iterate it once for the chunks (the kept rows, in order); then :meth:`table` gives the rows'
    labels, ids and positions, and the layers' shapes (``weights`` of 0 rows), or raises the
    DataError of a bad dataset (NaN/Inf, mismatched layer sets or shapes, missing labels): a consumer
    commits nothing before :meth:`table` returned.
    """

    def __init__(self, chunks: Iterator[LoraChunk], finish: Callable[[], LoraTable]) -> None:
        self._chunks = chunks
        self._finish = finish

    @classmethod
    def of(cls, table: LoraTable) -> LoraStream:
        """A table already in memory, as one chunk."""
        shapes = {layer: tuple(w.shape[1:]) for layer, w in table.weights.items()}
        done = dataclasses.replace(table, weights=empty_weights(shapes))
        return cls(iter([LoraChunk(table.weights, table.alphas)]), lambda: done)

    def __iter__(self) -> Iterator[LoraChunk]:
        return self._chunks

    def table(self) -> LoraTable:
        for _ in self._chunks:  # whatever the consumer left unread
            pass
        return self._finish()


def collect(stream: LoraStream) -> LoraTable:
    """The whole dataset in memory: every chunk concatenated (small datasets, tests, ``inspect``)."""
    chunks = list(stream)
    table = stream.table()
    weights = {layer: chunks[0].weights[layer] if len(chunks) == 1 else
               np.concatenate([empty, *(c.weights[layer] for c in chunks)]) for layer, empty in table.weights.items()}
    return LoraTable(info=table.info, weights=weights, labels=table.labels, label_names=table.label_names,
                     sample_ids=table.sample_ids, alphas=table.alphas, positions=table.positions,
                     stored_rows=table.stored_rows)


def empty_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Each layer's shape as a 0-row stack (what :meth:`LoraStream.table` carries instead of weights)."""
    return {layer: np.empty((0, *shape), dtype=np.float32) for layer, shape in shapes.items()}


class DatasetSource(Protocol):
    """A dataset the grid can run on: cheap to describe, read in chunks of rows."""

    def describe(self) -> DatasetInfo: ...

    def stream(self, chunk_bytes: int) -> LoraStream: ...

    def load(self) -> LoraTable: ...
