"""The cell loop, the code path of every executor (in this process, in a worker, in a Slurm task),
and LocalExecutor, which runs it here."""

from __future__ import annotations

import logging
import socket
import traceback

from ablation_cli import runtime, tracking
from ablation_cli.durable import now_iso
from ablation_cli.errors import Stopped, environment_failure
from ablation_cli.executors.base import Batch, Outcome
from ablation_cli.executors.cell import TrainRuns, run_cell
from ablation_cli.grid import Cell
from ablation_cli.store import ExperimentStore

log = logging.getLogger(__name__)


def run_cells(batch: Batch, fail_fast: bool = False, train_runs: TrainRuns | None = None) -> Outcome:
    """Run ``batch.cells`` one by one in this process. A cell another process has claimed is left to
    it; one finished meanwhile is skipped; a failing cell is recorded and the others go on."""
    store, cfg = batch.store, batch.cfg
    outcome = Outcome()
    for cell in batch.cells:
        runtime.raise_if_stopped()
        with store.claim(cell.id) as mine:
            if not mine:
                log.info("Skipping %s (another process is running it)", cell.id)
                outcome.skipped.append(cell.id)
                continue
            if store.cell_state(cell.id, cell.fingerprint.record, cfg.num_runs).state == "ok":
                log.info("Skipping %s (completed by another process)", cell.id)
                outcome.skipped.append(cell.id)
                continue
            try:
                run_cell(cell, cfg, store, batch.workspace, batch.reporter, train_runs)
                outcome.done.append(cell.id)
            except Stopped:
                raise
            except Exception as exc:  # isolate the cell: record, report, go on
                if isinstance(exc, OSError) and (failure := environment_failure(exc)) is not None:
                    raise failure from exc  # the machine's fault, not the cell's: every next cell would hit it too
                outcome.failed[cell.id] = f"{type(exc).__name__}: {exc}"
                record_failure(store, cell, exc)
                if fail_fast:
                    log.error("Stopping at the first failure (--fail-fast)")
                    break
    tracking.flush()  # a worker or a Slurm task ends without atexit: its queued MLflow logging first
    return outcome


def record_failure(store: ExperimentStore, cell: Cell, exc: Exception) -> None:
    tb = traceback.format_exc()
    store.write_failure(cell.id, {
        "cell": cell.id, "type": type(exc).__name__, "message": str(exc), "traceback": tb,
        "failed_at": now_iso(), "host": socket.gethostname(),
    })
    store.clear_heartbeat(cell.id)
    log.error("Cell %s FAILED: %s: %s (recorded in %s; the grid goes on)\n%s",
              cell.id, type(exc).__name__, exc, store.failure_path(cell.id).relative_to(store.root), tb.rstrip())


class LocalExecutor:
    """Cells one by one in this process. ``train_runs`` replaces the trainer (a seam for tests)."""

    in_process = True

    def __init__(self, train_runs: TrainRuns | None = None) -> None:
        self.train_runs = train_runs

    def run(self, batch: Batch, fail_fast: bool = False) -> Outcome:
        return run_cells(batch, fail_fast, self.train_runs)
