"""What runs inside a Slurm job (imported there, and only where submitit is installed)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import submitit

from ablation_cli.executors.spec import JobSpec, set_threads, setup_child_logging

log = logging.getLogger("ablation_cli")


def _stop(signum: int, _frame: object) -> None:
    from ablation_cli.errors import EXIT_SIGTERM, Stopped

    log.warning("SIGTERM (scancel or preemption): stopping; finished runs are kept and the next submission "
                "resumes from them")
    raise Stopped("SIGTERM", EXIT_SIGTERM)


def _context(spec: JobSpec, label: str) -> tuple[Any, Any, Any]:
    for key, value in spec.env.items():
        os.environ.setdefault(key, value)
    # submitit ignores SIGTERM (it requeues on the timeout signal, USR2, which stays its own); a
    # cancelled or preempted task stops at once instead of training on for Slurm's KillWait
    signal.signal(signal.SIGTERM, _stop)
    store = spec.store()
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "?")
    setup_child_logging(f"[slurm {job_id} {label}] ", store.log_file)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    set_threads(spec.threads or (int(cpus) if cpus and cpus.isdigit() else None))
    cfg = spec.cfg()
    return cfg, spec.source(), store


class FeaturesTask(submitit.helpers.Checkpointable):
    """Load and check the data once and fill the feature cache with every representation needed."""

    def __call__(self, spec: JobSpec, reps: list[str]) -> str:
        from ablation_cli.executors.workspace import Workspace

        cfg, source, _store = _context(spec, "features")
        workspace = Workspace(source, cfg.split, spec.cache(), spec.device)
        _ = workspace.split  # reads and validates the data when the cache has no index yet
        workspace.prepare(reps)
        log.info("features ready: %s", ", ".join(reps))
        return "ok"


class CellTask(submitit.helpers.Checkpointable):
    """One cell, through the local executor's code path; requeued after preemption or a timeout,
    it resumes from the cell's run checkpoints."""

    def __call__(self, spec: JobSpec, cell_id: str) -> dict[str, Any]:
        from ablation_cli.executors.workspace import Workspace
        from ablation_cli.grid import expand
        from ablation_cli.orchestrator import Outcome, run_cells
        from ablation_cli.progress import PlainReporter

        cfg, source, store = _context(spec, cell_id)
        cells = [c for c in expand(cfg, source.describe()) if c.id == cell_id]
        if not cells:
            raise RuntimeError(f"cell {cell_id} is not in the grid of this config")
        workspace = Workspace(source, cfg.split, spec.cache(), spec.device)
        outcome = run_cells(cells, cfg, store, workspace, PlainReporter(), spec.device, Outcome())
        if outcome.failed:
            raise RuntimeError(f"cell {cell_id} failed: {outcome.failed[cell_id]}")
        return {"done": outcome.done, "skipped": outcome.skipped}
