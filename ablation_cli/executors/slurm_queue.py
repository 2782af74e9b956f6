"""What the Slurm queue says about an experiment's tasks: squeue and sacct reads, the cells still
queued or running, and the overlay `ablate status` shows. No submitit and no torch: status uses it.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from collections.abc import Iterable
from typing import NotRequired, TypedDict

from ablation_cli.records import Submission
from ablation_cli.status import StatusModel, build_status
from ablation_cli.store import ExperimentStore

# squeue states of a job that may still run the cell (anything else has ended)
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
               "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD"}
QUERY_TIMEOUT_S = 10.0


def cell_jobs(submissions: Iterable[Submission]) -> dict[str, str]:
    """cell id -> the Slurm job id (``array_task``) of its latest submission."""
    jobs: dict[str, str] = {}
    for sub in submissions:
        jobs.update(sub.get("cells", {}))
    return jobs


def squeue_jobs(job_ids: Iterable[str]) -> dict[str, tuple[str, str]] | None:
    """Job id -> (squeue state, reason) for those of ``job_ids`` still in the queue; None when squeue
    is absent or fails."""
    wanted = set(job_ids)
    if shutil.which("squeue") is None:
        return None
    if not wanted:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job in wanted:
            jobs[job] = (state, "" if reason in ("None", "(null)") else reason)
    return jobs


def squeue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    jobs = squeue_jobs(job_ids)
    return None if jobs is None else {job: state for job, (state, _) in jobs.items()}


# Pending reasons that never clear by waiting: the request exceeds what the partition or the
# account allows, or the job it depends on failed.
HOPELESS_REASONS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "DependencyNeverSatisfied",
                    "BadConstraints", "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
                    "QOSMaxMemoryPerJob", "AssocMaxCpuPerJobLimit", "AssocMaxMemPerJob", "MaxCpuPerAccount")


def stuck(reason: str) -> bool:
    return any(reason.startswith(r) for r in HOPELESS_REASONS)


def sacct_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Final states (TIMEOUT, OUT_OF_MEMORY, CANCELLED, FAILED, PREEMPTED, ...) where accounting exists."""
    ids = sorted(set(job_ids))
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job in ids:
            states[job] = state.split()[0] if state else state  # "CANCELLED by 0" -> CANCELLED
    return states


def live_cells(store: ExperimentStore) -> dict[str, tuple[str, str]]:
    """Cells whose latest Slurm task is still queued or running: cell -> (job id, state)."""
    jobs = cell_jobs(store.read_submissions())
    if not jobs:
        return {}
    states = squeue_states(jobs.values()) or {}
    return {cell: (job, states[job]) for cell, job in jobs.items() if states.get(job) in LIVE_STATES}


class QueueState(TypedDict):
    """A submitted cell's job as the queue (or accounting) sees it."""

    job: str
    state: str
    live: bool | None  # None: the queue could not be asked
    reason: NotRequired[str]  # why a pending job waits


def slurm_overlay(store: ExperimentStore) -> dict[str, QueueState]:
    """For status: cell -> {"job", "state", "live"} from squeue, or sacct / "ENDED" once out of the queue."""
    jobs = cell_jobs(store.read_submissions())
    if not jobs:
        return {}
    queued = squeue_jobs(jobs.values())
    if queued is None:
        return {cell: {"job": job, "state": "UNKNOWN", "live": None} for cell, job in jobs.items()}
    ended = [job for job in jobs.values() if job not in queued]
    final = sacct_states(ended) if ended else {}
    overlay: dict[str, QueueState] = {}
    for cell, job in jobs.items():
        state, reason = queued.get(job, (final.get(job) or "ENDED", ""))
        overlay[cell] = {"job": job, "state": state, "live": state in LIVE_STATES and job in queued}
        if reason:
            overlay[cell]["reason"] = reason
    return overlay


def status_with_queue(store: ExperimentStore) -> StatusModel:
    """The status model of ``store``, with the Slurm queue's view of any submitted cells."""
    return build_status(store, slurm_overlay(store) if store.has_submissions() else None)
