"""``ablate run --executor slurm``: one feature job, then one job array with a task per pending cell.

The submitting process only plans: the orchestrator writes experiment.json and leaves out cells
that are done or whose task is still queued or running (``slurm_queue``); this executor submits the
rest through submitit. Feature extraction runs once as its own job and fills the shared feature
cache; the array depends on it (``afterok``) and each task runs its cell through the local cell
loop (``slurm_task``), writing the same checkpoints. Tasks are requeued by submitit after
preemption or a timeout and resume from their run checkpoints. Each submission is recorded in the
store (``slurm/submissions.json``); `ablate status` reads it and asks the queue for each task.

submitit is imported only when submitting (``require_submitit``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from ablation_cli.config import ExperimentConfig
from ablation_cli.durable import now_iso
from ablation_cli.errors import ConfigError
from ablation_cli.executors.base import Batch, Outcome
from ablation_cli.executors.spec import JobSpec
from ablation_cli.records import Submission

if TYPE_CHECKING:
    from ablation_cli.store import ExperimentStore

log = logging.getLogger(__name__)


def require_submitit() -> Any:
    try:
        import submitit  # an optional extra: ablate[slurm]
    except ImportError:
        raise ConfigError("--executor slurm needs submitit, which is not installed",
                          hint="pip install 'ablate[slurm]'  (or: pip install submitit)") from None
    if shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm: sbatch is not on PATH; run this on a Slurm login node")
    return submitit


class SbatchParameters(TypedDict, total=False):
    """submitit ``SlurmExecutor.update_parameters`` keywords, as ablate sets them."""

    job_name: str
    time: int
    signal_delay_s: int
    setup: list[str] | None
    partition: str
    cpus_per_task: int
    array_parallelism: int
    mem: str | None
    gpus_per_node: int
    dependency: str
    additional_parameters: dict[str, str | int | bool] | None


def sbatch_parameters(cfg: ExperimentConfig, job: str, after: str | None = None) -> SbatchParameters:
    """submitit ``SlurmExecutor.update_parameters`` keywords for the feature job (``job="features"``)
    or the cell array (``job="cells"``, after the feature job ``after`` when there is one). Pure."""
    s = cfg.executor.slurm
    # Slurm's warning signal (USR2, on which submitit requeues the task): 2 minutes before the limit, or a
    # quarter of a short limit, so that a task of a few minutes is not warned as it starts
    warn_s = min(120, max(10, s.time_min * 60 // 4))
    params: SbatchParameters = {"job_name": f"ablate-{cfg.name}", "time": s.time_min, "signal_delay_s": warn_s,
                                "setup": list(s.setup) or None}
    if s.partition:
        params["partition"] = s.partition
    extra = dict(s.extra)
    if job == "features":
        params["cpus_per_task"] = s.features_cpus or s.cpus_per_task
        params["mem"] = f"{s.features_mem_gb:g}GB" if s.features_mem_gb else None
    elif job == "cells":
        params["cpus_per_task"] = s.cpus_per_task
        params["array_parallelism"] = s.array_parallelism
        params["mem"] = f"{s.mem_gb:g}GB" if s.mem_gb else None
        if s.gpus_per_task:
            params["gpus_per_node"] = s.gpus_per_task
        if after is not None:
            params["dependency"] = f"afterok:{after}"
            extra["kill-on-invalid-dep"] = "yes"  # the feature job failed: drop the tasks, don't wait forever
    else:
        raise ValueError(f"job must be 'features' or 'cells', not {job!r}")
    params["additional_parameters"] = extra or None
    return params


class SlurmExecutor:
    """Submit the batch's cells (and, unless the cache holds them, their features) to Slurm."""

    in_process = False

    def __init__(self, spec: JobSpec) -> None:
        if not spec.use_cache:
            raise ConfigError("--executor slurm shares the features between jobs through the feature cache",
                              hint="drop --no-cache-features, and put --cache-dir on a filesystem every node sees")
        self.spec = spec

    def run(self, batch: Batch, fail_fast: bool = False) -> Outcome:
        reps = list(dict.fromkeys(c.representation for c in batch.cells))
        ready = batch.workspace.features_cached(reps)
        record = submit(self.spec, batch.cfg, batch.store, [c.id for c in batch.cells], reps, ready)
        return Outcome(submission=record)


def submit(spec: JobSpec, cfg: ExperimentConfig, store: ExperimentStore, cell_ids: list[str], reps: list[str],
           features_ready: bool) -> Submission:
    """Submit the feature job (unless the cache holds everything) and the cell array; record both."""
    submitit = require_submitit()
    from ablation_cli.executors.slurm_task import CellTask, FeaturesTask  # imports submitit

    folder = store.slurm_logs_dir
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.executor.slurm.max_requeues)
    features_job = None
    # the intent first: if this process dies between sbatch and the record, the next submission finds
    # the jobs it queued (recover_submissions) instead of queueing every cell twice
    store.add_submission({"submitting": {"cells": cell_ids, "since": time.time()}, "cells": {}, "logs": str(folder)})
    try:
        if not features_ready:
            executor.update_parameters(**sbatch_parameters(cfg, "features"))
            features_job = executor.submit(FeaturesTask(), spec, reps)
        after = features_job.job_id if features_job is not None else None
        executor.update_parameters(**sbatch_parameters(cfg, "cells", after=after))
        jobs = executor.map_array(CellTask(), [spec] * len(cell_ids), cell_ids)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        store.write_submissions([r for r in store.read_submissions() if "submitting" not in r])
        raise ConfigError(f"sbatch refused the submission: {str(exc).strip().splitlines()[-1]}",
                          hint=f"check [executor.slurm] in the config; sbatch files are in {folder}") from None
    record = _record(features_job.job_id if features_job is not None else None,
                     {cell: job.job_id for cell, job in zip(cell_ids, jobs)}, folder)
    store.write_submissions([*(r for r in store.read_submissions() if "submitting" not in r), record])
    return record


def _record(features_job: str | None, cells: dict[str, str], folder: Path) -> Submission:
    return {"submitted_at": now_iso(), "features_job": features_job,
            "array_job": next(iter(cells.values())).split("_")[0] if cells else None, "cells": cells,
            "logs": str(folder)}


_SUBMITTED = re.compile(r"^(\d+)(?:_(\d+))?_submitted\.pkl$")  # submitit's record of each job it queued


def recover_submissions(store: ExperimentStore) -> None:
    """Complete the record of a submission whose process died between sbatch and writing it (call with
    the experiment lock held): its jobs are those submitit recorded in the logs folder since the intent."""
    records = store.read_submissions()
    if not any("submitting" in r for r in records):
        return
    known = {job for r in records for job in (*r.get("cells", {}).values(), r.get("features_job")) if job}
    done = []
    for r in records:
        if "submitting" not in r:
            done.append(r)
            continue
        intent = r["submitting"]
        features_job, cells = None, {}
        for path in sorted(store.slurm_logs_dir.glob("*_submitted.pkl")):
            m = _SUBMITTED.match(path.name)
            if m is None or path.stat().st_mtime < intent["since"] - 1:
                continue
            job = m.group(0).removesuffix("_submitted.pkl")
            if job in known:
                continue
            if m.group(2) is None:
                features_job = job
            elif int(m.group(2)) < len(intent["cells"]):
                cells[intent["cells"][int(m.group(2))]] = job
        if features_job or cells:
            log.warning("An earlier submission was interrupted after sbatch; recorded its jobs from %s: %s",
                        store.slurm_logs_dir, ", ".join(sorted({j.split("_")[0] for j in
                                                                (*cells.values(), features_job) if j})))
            done.append(_record(features_job, dict(sorted(cells.items(), key=lambda kv: intent["cells"].index(kv[0]))),
                                store.slurm_logs_dir))
    store.write_submissions(done)
