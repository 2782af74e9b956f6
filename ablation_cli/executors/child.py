"""The start of a child process that runs cells (a ``--workers`` process or a Slurm task): the
same environment, stop signals, logging and threads as the parent, and the experiment rebuilt
from its JobSpec."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from dataclasses import dataclass

from ablation_cli import logs, runtime
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetSource
from ablation_cli.executors.base import Batch
from ablation_cli.executors.spec import JobSpec
from ablation_cli.grid import Cell, expand
from ablation_cli.progress import PlainReporter
from ablation_cli.store import ExperimentStore


@dataclass(frozen=True)
class Child:
    spec: JobSpec
    cfg: ExperimentConfig
    source: DatasetSource
    store: ExperimentStore

    def cells(self, ids: Iterable[str]) -> list[Cell]:
        """The grid's cells with these ids, in the order given."""
        by_id = {c.id: c for c in expand(self.cfg, self.source.describe())}
        unknown = [c for c in ids if c not in by_id]
        if unknown:
            raise RuntimeError(f"cell {unknown[0]} is not in the grid of this config")
        return [by_id[c] for c in ids]

    def batch(self, cell_ids: Iterable[str], device: str | None = None) -> Batch:
        """The cells to run here, with a workspace on ``device`` and plain progress lines."""
        return Batch(self.cells(cell_ids), self.cfg, self.store, self.spec.workspace(self.source, device),
                     PlainReporter())


def start(spec: JobSpec, log_prefix: str, threads: int | None,
          stop_signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
          stop_note: str | None = None) -> Child:
    """Environment first (before torch is imported), then the exit, signals, logging and threads."""
    runtime.apply_env(spec.env)
    runtime.skip_the_last_collection()
    runtime.stop_on(stop_signals, stop_note)
    store = spec.store()
    logs.setup_child(log_prefix, store.log_file)
    runtime.set_threads(threads)
    return Child(spec, spec.cfg(), spec.source(), store)
