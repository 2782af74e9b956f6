"""results.json's ``statistics`` (and ``pivot``) documents, typed: what :mod:`statistics` computes."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class StatisticsSettings(TypedDict):
    bootstrap_resamples: int
    bootstrap_seed: int
    alpha: float
    split: str  # "resampled per run" or "fixed"
    paired_test: str
    correction: str


class CellStatistics(TypedDict):
    test_acc: float
    test_acc_ci95_rows_runs: list[float]
    n_test: int
    majority_rate: float


class VsBest(TypedDict):
    """A layer config's cells compared with its best one on validation accuracy."""

    best: str
    best_row: str
    best_val_acc: float
    best_test_acc: float
    best_has_predictions: bool
    comparisons: list[dict[str, object]]
    not_compared: list[str]


# one declared pair of layer configs, row by row ("from" is a keyword: the functional form)
LayerEffect = TypedDict("LayerEffect", {"from": str, "to": str, "rows": list[dict[str, object]]})


class Chance(TypedDict):
    majority_rate: float
    p: float
    p_holm: float
    above: bool


class MainEffect(TypedDict):
    """One axis of a sweep: each value's mean test accuracy over the other axes, and its paired difference
    from the axis's first value over the cells that differ only in this axis."""

    axis: str
    baseline: object
    values: list[dict[str, object]]


class Statistics(TypedDict):
    """results.json's ``statistics``."""

    settings: StatisticsSettings
    split_sizes: object
    without_predictions: list[str]
    cells: dict[str, CellStatistics]
    vs_best: dict[str, VsBest]
    layer_effects: list[LayerEffect]
    chance: dict[str, Chance]
    main_effects: NotRequired[list[MainEffect]]
    comparisons_corrected: int


class Pivot(TypedDict):
    """results.json's ``pivot``: mean test accuracy by two axes, each entry over the other axes."""

    rows_axis: str
    cols_axis: str
    rows: list[object]
    cols: list[object]
    mean_test_acc: list[list[float | None]]
    cells: list[list[int]]
