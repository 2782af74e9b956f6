"""The in-memory form of a dataset: per-layer weight stacks plus labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """What can be known about a dataset without reading its weights (cheap)."""

    name: str
    kind: str
    fingerprint: str
    layers: tuple[str, ...]
    num_samples: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


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
    alphas: Mapping[str, np.ndarray] = field(default_factory=dict)  # module -> (N,) kohya alpha, NaN if absent
    positions: np.ndarray | None = None  # (N,) row in the stored dataset; None: no row was dropped
    stored_rows: int | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.info.layers


class DatasetSource(Protocol):
    """A dataset the grid can run on: cheap to describe, expensive to load."""

    def describe(self) -> DatasetInfo: ...

    def load(self) -> LoraTable: ...
