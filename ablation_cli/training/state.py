"""A run's training state between two epochs, as ``runs/<cell>/.state_<k>.pt`` holds it (torch.save of
these very dicts: a TypedDict is a plain dict, so the files read and write as they always did)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from ablation_cli.training.results import LearningCurve

if TYPE_CHECKING:  # torch loads where cells train
    import torch
    from torch.optim.optimizer import StateDict


class TrainingState(TypedDict):
    """Everything a run's next epoch depends on (trainer._Run.state): tensors and plain values only."""

    seed: int
    epoch: int  # epochs trained
    model: dict[str, torch.Tensor]
    opt: StateDict
    sched: StateDict
    rng: torch.Tensor  # the run's dropout stream
    cuda_rng: torch.Tensor | None
    shuffle: torch.Tensor  # the generator of its batches' order
    curve: LearningCurve
    best_acc: float
    best_epoch: int
    since_best: int
    best_state: dict[str, torch.Tensor]  # a copy of the best epoch's weights
    time_s: float
    scaler: StateDict | None  # fp16's loss scaling


class SavedState(TypedDict):
    """A state file: the state, and what it is valid for (the cell's fingerprint, the run's seed)."""

    fingerprint: str  # the cell's fingerprint digest
    seed: int
    state: TrainingState
