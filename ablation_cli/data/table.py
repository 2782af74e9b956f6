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
    """Rows with class labels: ``labels`` (N,) int64 indices into ``label_names`` (sorted order)."""

    labels: np.ndarray
    label_names: tuple[str, ...]

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

    @property
    def layers(self) -> tuple[str, ...]:
        return self.info.layers


class DatasetSource(Protocol):
    """A dataset the grid can run on: cheap to describe, expensive to load."""

    def describe(self) -> DatasetInfo: ...

    def load(self) -> LoraTable: ...
