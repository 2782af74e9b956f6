"""What the orchestrator hands an executor, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ablation_cli.config import ExperimentConfig
    from ablation_cli.grid import Cell
    from ablation_cli.progress import Reporter
    from ablation_cli.records import Submission
    from ablation_cli.store import ExperimentStore
    from ablation_cli.workspace import Workspace


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> one-line error
    left_to_slurm: list[str] = field(default_factory=list)  # queued or running in a Slurm job
    submission: Submission | None = None  # what a submitting executor sent (slurm/submissions.json entry)

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, other: Outcome) -> None:
        self.done.extend(other.done)
        self.skipped.extend(other.skipped)
        self.failed.update(other.failed)


@dataclass(frozen=True)
class Batch:
    """The pending cells of one experiment and everything needed to run them here."""

    cells: list[Cell]
    cfg: ExperimentConfig
    store: ExperimentStore
    workspace: Workspace
    reporter: Reporter


class Executor(Protocol):
    # True: the orchestrator loads and checks the data and computes every feature in this process
    # before handing the cells over (local, workers); False: the executor arranges that itself
    # (Slurm's feature job), and the data is only described, never read, here.
    in_process: bool

    def run(self, batch: Batch, fail_fast: bool = False) -> Outcome: ...
