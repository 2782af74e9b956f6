"""What runs inside a Slurm job (imported there, and only where submitit is installed)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import submitit

from ablation_cli.executors import child
from ablation_cli.executors.local import run_cells
from ablation_cli.executors.spec import JobSpec

log = logging.getLogger("ablation_cli")

# submitit ignores SIGTERM (it requeues on the timeout signal, USR2, which stays its own); a
# cancelled or preempted task stops at once instead of training on for Slurm's KillWait
STOP_NOTE = ("SIGTERM (scancel or preemption): stopping; finished runs are kept and the next submission "
             "resumes from them")


def _start(spec: JobSpec, label: str) -> child.Child:
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "?")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    threads = spec.threads or (int(cpus) if cpus and cpus.isdigit() else None)
    return child.start(spec, f"[slurm {job_id} {label}] ", threads, (signal.SIGTERM,), STOP_NOTE)


class FeaturesTask(submitit.helpers.Checkpointable):
    """Load and check the data once and fill the feature cache with every representation needed."""

    def __call__(self, spec: JobSpec, reps: list[str]) -> str:
        me = _start(spec, "features")
        workspace = spec.workspace(me.source)
        workspace.prepare(reps)  # one pass over the data, checked, when the cache lacks the features
        _ = workspace.split
        log.info("features ready: %s", ", ".join(reps))
        return "ok"


class CellTask(submitit.helpers.Checkpointable):
    """One cell, through the local cell loop; requeued after preemption or a timeout, it resumes
    from the cell's run checkpoints."""

    def __call__(self, spec: JobSpec, cell_id: str) -> dict[str, Any]:
        outcome = run_cells(_start(spec, cell_id).batch([cell_id]))
        if outcome.failed:
            raise RuntimeError(f"cell {cell_id} failed: {outcome.failed[cell_id]}")
        return {"done": outcome.done, "skipped": outcome.skipped}
