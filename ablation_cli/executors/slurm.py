"""``ablate run --executor slurm``: one feature job, then one job array with a task per pending cell.

The submitting process only plans: it writes experiment.json, leaves out cells that are done or
whose task is still queued or running, and submits through submitit. Feature extraction runs once
as its own job and fills the shared feature cache; the array depends on it (``afterok``) and each
task runs its cell through the local executor's code path (executors/slurm_task.py), writing the
same checkpoints. Tasks are requeued by submitit after preemption or a timeout and resume from
their run checkpoints. Each submission is recorded in ``slurm/submissions.json``; `ablate status`
reads it and asks squeue (and sacct where accounting exists) for the state of each task.

This module imports neither submitit nor torch at import time: status uses it.
"""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ablation_cli.errors import ConfigError
from ablation_cli.store import ExperimentStore, atomic_write_json, now_iso, read_json

log = logging.getLogger(__name__)

# squeue states of a job that may still run the cell (anything else has ended)
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
               "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD"}
QUERY_TIMEOUT_S = 10.0


def submissions_path(store: ExperimentStore) -> Path:
    return store.root / "slurm" / "submissions.json"


def read_submissions(store: ExperimentStore) -> list[dict[str, Any]]:
    try:
        doc = read_json(submissions_path(store))
    except (OSError, json.JSONDecodeError):
        return []
    return doc if isinstance(doc, list) else []


def cell_jobs(submissions: Iterable[dict[str, Any]]) -> dict[str, str]:
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
    jobs = cell_jobs(read_submissions(store))
    if not jobs:
        return {}
    states = squeue_states(jobs.values()) or {}
    return {cell: (job, states[job]) for cell, job in jobs.items() if states.get(job) in LIVE_STATES}


def slurm_overlay(store: ExperimentStore) -> dict[str, dict[str, Any]]:
    """For status: cell -> {"job", "state", "live"} from squeue, or sacct / "ENDED" once out of the queue."""
    subs = read_submissions(store)
    jobs = cell_jobs(subs)
    if not jobs:
        return {}
    queued = squeue_jobs(jobs.values())
    if queued is None:
        return {cell: {"job": job, "state": "UNKNOWN", "live": None} for cell, job in jobs.items()}
    ended = [job for job in jobs.values() if job not in queued]
    final = sacct_states(ended) if ended else {}
    overlay = {}
    for cell, job in jobs.items():
        state, reason = queued.get(job, (final.get(job) or "ENDED", ""))
        overlay[cell] = {"job": job, "state": state, "live": state in LIVE_STATES and job in queued}
        if reason:
            overlay[cell]["reason"] = reason
    return overlay


# -- submission ---------------------------------------------------------------------------------

def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm needs submitit, which is not installed",
                          hint="pip install 'ablate[slurm]'  (or: pip install submitit)") from None
    if shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm: sbatch is not on PATH; run this on a Slurm login node")
    return submitit


def submit(spec: Any, cfg: Any, store: ExperimentStore, cell_ids: list[str], reps: list[str],
           features_ready: bool) -> dict[str, Any]:
    """Submit the feature job (unless the cache holds everything) and the cell array; record both."""
    submitit = require_submitit()
    from ablation_cli.executors.slurm_task import CellTask, FeaturesTask

    s = cfg.executor.slurm
    folder = store.root / "slurm" / "logs"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=s.max_requeues)
    common: dict[str, Any] = {"job_name": f"ablate-{cfg.name}", "time": s.time_min, "signal_delay_s": 120,
                              "setup": list(s.setup) or None}
    if s.partition:
        common["partition"] = s.partition
    extra = dict(s.extra)
    features_job = None
    try:
        if not features_ready:
            executor.update_parameters(**common, cpus_per_task=s.features_cpus or s.cpus_per_task,
                                       mem=f"{s.features_mem_gb:g}GB" if s.features_mem_gb else None,
                                       additional_parameters=dict(extra) or None)
            features_job = executor.submit(FeaturesTask(), spec, reps)
        params: dict[str, Any] = {**common, "cpus_per_task": s.cpus_per_task, "array_parallelism": s.array_parallelism,
                                  "mem": f"{s.mem_gb:g}GB" if s.mem_gb else None}
        if s.gpus_per_task:
            params["gpus_per_node"] = s.gpus_per_task
        if features_job is not None:
            params["dependency"] = f"afterok:{features_job.job_id}"
            extra["kill-on-invalid-dep"] = "yes"  # the feature job failed: drop the tasks, don't wait forever
        executor.update_parameters(**params, additional_parameters=extra or None)
        jobs = executor.map_array(CellTask(), [spec] * len(cell_ids), cell_ids)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        raise ConfigError(f"sbatch refused the submission: {str(exc).strip().splitlines()[-1]}",
                          hint=f"check [executor.slurm] in the config; sbatch files are in {folder}") from None
    record = {
        "submitted_at": now_iso(),
        "features_job": features_job.job_id if features_job is not None else None,
        "array_job": jobs[0].job_id.split("_")[0] if jobs else None,
        "cells": {cell: job.job_id for cell, job in zip(cell_ids, jobs)},
        "logs": str(folder),
    }
    atomic_write_json(submissions_path(store), [*read_submissions(store), record])
    return record


def wait(store: ExperimentStore, record: dict[str, Any], poll_s: float = 10.0) -> None:
    """Follow the submitted jobs until none is queued or running, printing progress when it changes."""
    from ablation_cli.report import format_totals
    from ablation_cli.status import build_status

    jobs = [*record["cells"].values(), *([record["features_job"]] if record.get("features_job") else [])]
    last = ""
    warned: set[str] = set()
    while True:
        queued = squeue_jobs(jobs) or {}
        live = {j: st for j, (st, _) in queued.items() if st in LIVE_STATES}
        hopeless: dict[tuple[str, str], int] = {}
        for job, (state, reason) in queued.items():
            if state == "PENDING" and stuck(reason):
                key = (job.split("_")[0], reason)
                hopeless[key] = hopeless.get(key, 0) + 1
        for (job, reason), count in hopeless.items():
            if job not in warned:
                warned.add(job)
                log.warning("Slurm job %s (%d task(s)) is pending with reason %s: it will not start as requested; "
                            "cancel it (scancel %s), change [executor.slurm] or the flags, and rerun", job, count,
                            reason, job)
        model = build_status(store)
        by_state: dict[str, int] = {}
        for st in live.values():
            by_state[st] = by_state.get(st, 0) + 1
        queue = ", ".join(f"{n} {st.lower()}" for st, n in sorted(by_state.items()))
        line = format_totals(model) + (f"; Slurm: {queue}" if live else "")
        if line != last:
            log.info("%s", line)
            last = line
        if not live:
            return
        time.sleep(poll_s)
