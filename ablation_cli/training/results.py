"""What a run's training hands back, and the checkpoint kept of it (docs/outputs.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NotRequired, TypedDict


class PerClass(TypedDict):
    """One split's precision, recall, F1 and support, each a list in class order."""

    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]


class SplitDetails(TypedDict):
    """One split's per-class scores and confusion matrix (rows: true class, columns: predicted)."""

    per_class: PerClass
    confusion_matrix: list[list[int]]


class LearningCurve(TypedDict):
    """One value per epoch trained; empty for an estimator, which has no epochs."""

    train_loss: list[float]
    val_loss: list[float]
    val_acc: list[float]
    lr: list[float]


class _Scores(TypedDict):
    """Its metrics, and of val and test: the confusion matrix and per-class scores."""

    metrics: dict[str, float]
    confusion_matrices: dict[str, list[list[int]]]
    per_class: dict[str, PerClass]


class Evaluation(_Scores):
    """A trained model scored on the three splits."""

    test_pred: list[int]  # the predicted class of each test row, in the split's order


class _Training(TypedDict):
    """How the run trained."""

    learning_curve: LearningCurve
    best_epoch: int
    epochs_run: int
    train_time_s: float
    feature_dim: int
    device: str
    deterministic: NotRequired[bool]  # an estimator's only: True when every run is the same fit


class RunResult(Evaluation, _Training):
    """One run's result as the trainer (or an estimator) hands it to ``on_done``."""


RunDoneCallback = Callable[[int, RunResult], None]  # (run position, its result)


class CheckpointMeta(TypedDict):
    """A run or cell checkpoint's ``meta``: the cell's fingerprint record, where, when and with what it was made."""

    fingerprint: str
    config: dict[str, object]
    dataset: dict[str, object]
    code: dict[str, object]
    created_at: str
    host: str
    pid: int
    duration_s: float
    device: str
    versions: dict[str, str]  # trainer.library_versions()
    schema_version: NotRequired[int]  # these two: stamped as it is written (durable.seal)
    checksum: NotRequired[str]


class RunCheckpoint(_Scores, _Training):
    """A run's checkpoint, ``runs/<cell>/run_<k>.json`` (executors/cell.py): its result without
    ``test_pred``, which ``predictions`` holds packed, and what identifies the run."""

    cell: str
    run: int
    seed: int
    predictions: dict[str, str]  # RunPredictions.to_json()
    split_sizes: dict[str, int]
    label_names: list[str]
    meta: CheckpointMeta
