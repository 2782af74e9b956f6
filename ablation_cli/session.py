"""What ``ablate run`` does around the orchestrator: the experiment lock, stop signals, the run log,
merging once the grid is complete, and following Slurm jobs to the end.

Each entry point returns the process's exit code; the CLI only parses, calls and renders.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ablation_cli import logs, runtime, tracking
from ablation_cli.config import (
    ExperimentConfig,
    config_from_data,
    dataset_path,
    dataset_source,
    datasets_registry_path,
)
from ablation_cli.data.sources import DatasetOptions
from ablation_cli.durable import read_json_object
from ablation_cli.errors import (
    EXIT_FAILED_CELLS,
    EXIT_OK,
    AblateError,
    ConfigError,
    ExperimentError,
    Stopped,
    environment_failure,
)
from ablation_cli.executors.base import Executor
from ablation_cli.executors.local import LocalExecutor
from ablation_cli.executors.slurm import SlurmExecutor, recover_submissions, require_submitit
from ablation_cli.executors.slurm_queue import LIVE_STATES, cell_jobs, squeue_jobs, status_with_queue, stuck
from ablation_cli.executors.spec import JobSpec
from ablation_cli.executors.workers import WorkersExecutor
from ablation_cli.features.cache import FeatureCache
from ablation_cli.orchestrator import Orchestrator, dataset_record
from ablation_cli.progress import Reporter
from ablation_cli.records import Sources, describe_record, same_dataset
from ablation_cli.reports.merge import write_merge
from ablation_cli.reports.status_view import format_totals
from ablation_cli.status import results_up_to_date
from ablation_cli.store import ExperimentStore
from ablation_cli.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """One ``ablate run``: the resolved config, its experiment folder, the workspace over its dataset,
    and the JobSpec from which child processes rebuild all three."""

    cfg: ExperimentConfig
    store: ExperimentStore
    workspace: Workspace
    spec: JobSpec
    sources: Sources
    restart_stale: bool = False

    @classmethod
    def open(cls, cfg: ExperimentConfig, cfg_path: Path | None, options: DatasetOptions, output_dir: Path,
             cache_dir: Path, use_cache: bool = True, threads: int | None = None, restart_stale: bool = False,
             root: Path | None = None) -> Session:
        """The session of ``cfg``'s experiment under ``output_dir``, or in the folder ``root`` (``--resume``)."""
        source = dataset_source(cfg, cfg_path, options, cache_dir)
        cache = FeatureCache.under(cache_dir) if use_cache else None
        workspace = Workspace(source, cfg.split, cache, cfg.device)
        where = getattr(source, "root", None) or getattr(source, "ref", None)  # a folder, a save_to_disk or hub id
        place = {"name": getattr(source, "name", cfg.dataset),
                 "details": {"path": str(where)} if where is not None else {}}
        path = dataset_path(cfg, cfg_path)
        if root is None:
            store = ExperimentStore.for_dataset(output_dir, cfg.name, cfg.dataset, path, place,
                                                lambda: dataset_record(workspace.info))
        else:
            store = ExperimentStore(root)
            recorded, current = store.recorded_dataset(), dataset_record(workspace.info)
            if recorded is not None and not (same_dataset(recorded, place) or same_dataset(recorded, current)):
                raise ExperimentError(f"{root} holds dataset {describe_record(recorded)}, not "
                                      f"{describe_record(current)}; nothing was changed")
        registry = datasets_registry_path(cfg, cfg_path)
        sources = Sources(str(cfg_path.resolve()) if cfg_path else None, str(registry.resolve()) if registry else None,
                          str(path.resolve()) if path is not None else None,
                          {k: str(v) if isinstance(v, Path) else v for k, v in options.items()})
        spec = JobSpec(config=cfg.model_dump(mode="json"), config_path=str(cfg_path.resolve()) if cfg_path else None,
                       dataset_options=options, cache_dir=str(cache_dir.resolve()), use_cache=use_cache,
                       root=str(store.root.resolve()), device=cfg.device, threads=threads,
                       env=dict(runtime.REPRODUCIBLE_ENV))
        runtime.set_threads(threads)
        return cls(cfg, store, workspace, spec, sources, restart_stale)

    def orchestrator(self, executor: Executor, reporter: Reporter | None = None) -> Orchestrator:
        return Orchestrator(self.cfg, self.workspace, self.store, executor, reporter,
                            restart_stale=self.restart_stale, sources=self.sources)

    def executor(self, workers: int = 1) -> Executor:
        """Cells in this process, or in ``workers`` processes on this machine."""
        return WorkersExecutor(self.spec, workers) if workers > 1 else LocalExecutor()

    def run(self, executor: Executor, reporter: Reporter, fail_fast: bool = False) -> int:
        """Run the pending cells here; merge when the grid is complete. Exit 0, or 1 if a cell failed."""
        store = self.store
        store.check_runnable()
        with store.lock(purpose="run"):
            logs.add_file_log(store.log_file)
            runtime.stop_on()
            started = time.perf_counter()
            try:
                outcome = self.orchestrator(executor, reporter).run(fail_fast=fail_fast)
            except Stopped as exc:
                log.warning("%s", exc)
                raise
            except AblateError:
                raise
            except Exception as exc:
                if isinstance(exc, OSError) and (failure := environment_failure(exc)) is not None:
                    raise failure from exc
                log.exception("internal error (a bug in ablate; please report it with run.log)")
                raise
            elapsed = time.perf_counter() - started
            if outcome.failed:
                log.error("%d cell(s) failed: %s. Fix and rerun the same command: finished cells are kept.",
                          len(outcome.failed), ", ".join(outcome.failed))
                log.info("Merge what exists with: ablate merge --output-dir %s --experiment %s --partial",
                         store.root.parent, store.root.name)
                return EXIT_FAILED_CELLS
            if outcome.left_to_slurm:
                log.info("%d cell(s) are queued or running in Slurm; merge when they finish (ablate merge).",
                         len(outcome.left_to_slurm))
                return EXIT_OK
            if busy := _unfinished(store):  # claimed by another process (a Slurm task) while this one ran
                log.info("%d cell(s) are being trained by another process: %s; merge when they finish "
                         "(ablate merge).", len(busy), ", ".join(busy))
                return EXIT_OK
            if not outcome.done and results_up_to_date(store) and not _reports_changed(store, self.cfg):
                log.info("Results are up to date in %s (`ablate merge` rewrites them).", store.root)
                # a run killed after its merge, before the merge reached MLflow: log it now (once)
                tracking.notify_merge(self.cfg.tracking.mlflow, store)
                return EXIT_OK  # nothing new: a finished experiment answers at once, no re-plotting
            results, paths = write_merge(store)
            n_plots = sum(p.suffix == ".png" for p in paths)
            log.info("All cells complete (%.1fs this session). Results in %s: results.json/.md/.csv/.tex%s", elapsed,
                     store.root, f" and {n_plots} plots" if n_plots else "")
            _log_findings(results)
        return EXIT_OK

    def submit(self, wait: bool = False) -> int:
        """Submit the pending cells to Slurm; with ``wait``, follow the jobs and merge at the end."""
        require_submitit()  # before anything is written
        executor = SlurmExecutor(self.spec)
        store = self.store
        store.check_runnable()
        with store.lock(purpose="slurm submission"):
            logs.add_file_log(store.log_file)
            recover_submissions(store)
            record = self.orchestrator(executor).run().submission
        if record is not None:
            feat = f"feature job {record['features_job']}, then " if record["features_job"] else ""
            log.info("Submitted %s%d cell task(s) as array job %s (logs: %s)", feat, len(record["cells"]),
                     record["array_job"], record["logs"])
            for cell, job in record["cells"].items():
                log.info("  %s: job %s", cell, job)
        if not wait:
            if record is not None:
                log.info("Watch with: ablate status --output-dir %s --experiment %s --watch   (or rerun with --wait)",
                         store.root.parent, store.root.name)
            return EXIT_OK
        # follow what was just submitted, or the earlier submissions still in the queue
        follow(store, record or {"cells": cell_jobs(store.read_submissions()), "features_job": None})
        model = status_with_queue(store)
        if model["done"] < model["total"]:
            bad = [c["id"] for c in model["cells"] if c["state"] != "done"]
            log.error("%d cell(s) did not finish: %s. Rerun the same command to submit them again.", len(bad),
                      ", ".join(bad))
            return EXIT_FAILED_CELLS
        with store.lock(purpose="merge"):
            results, paths = write_merge(store)
        log.info("All cells complete. Results in %s: results.json/.md/.csv/.tex%s", store.root,
                 f" and {sum(p.suffix == '.png' for p in paths)} plots" if paths else "")
        _log_findings(results)
        return EXIT_OK


def _unfinished(store: ExperimentStore) -> list[str]:
    """The experiment's cells without a valid, complete checkpoint."""
    record = store.experiment()
    return [spec.id for spec in record.cells
            if store.cell_state(spec.id, spec.expected, record.num_runs).state != "ok"]


def _reports_changed(store: ExperimentStore, cfg: ExperimentConfig) -> bool:
    """Whether results.json was made under other ``[reports]`` settings (comparisons, bootstrap): they
    change no cell, only what the merge writes."""
    merged = read_json_object(store.results_file) or {}
    return ((merged.get("config") or {}).get("reports") or {}) != cfg.reports.model_dump(mode="json")


def _log_findings(results: Mapping[str, Any]) -> None:
    text = (results.get("findings") or {}).get("text")
    if text:
        log.info("Findings (results.md has the tables behind them): %s", text)
    for warning in results.get("warnings", []):
        log.warning("%s", warning)


def follow(store: ExperimentStore, record: Mapping[str, Any], poll_s: float = 10.0) -> None:
    """Follow submitted Slurm jobs until none is queued or running, logging progress when it changes
    and warning once per job about pending reasons that never clear. The queue is asked every second
    at first, then less often, up to every ``poll_s`` seconds."""
    wait_s = 1.0
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
        by_state: dict[str, int] = {}
        for st in live.values():
            by_state[st] = by_state.get(st, 0) + 1
        queue = ", ".join(f"{n} {st.lower()}" for st, n in sorted(by_state.items()))
        line = format_totals(status_with_queue(store)) + (f"; Slurm: {queue}" if live else "")
        if line != last:
            log.info("%s", line)
            last = line
        if not live:
            return
        time.sleep(wait_s)
        wait_s = min(poll_s, wait_s * 1.5)


@dataclass(frozen=True)
class Recorded:
    """What ``ablate run --resume DIR`` replays: the experiment's recorded config and dataset options."""

    cfg: ExperimentConfig
    config_path: Path | None
    options: DatasetOptions
    root: Path


def recorded_settings(folder: Path, overrides: dict[str, Any], options: DatasetOptions,
                      doing: str = "Resuming") -> Recorded:
    """The settings experiment.json of ``folder`` (an experiment folder, or an output folder holding one)
    records, with the flags given beside ``--resume`` (``overrides``, ``options``: None keeps the record's)."""
    store = ExperimentStore.find(folder)
    doc = store.read_experiment()
    store.check_runnable()
    data = doc.get("config")
    if not isinstance(data, dict):
        raise ExperimentError(f"{store.experiment_file} records no config",
                              hint="resume with the command that started the experiment")
    sources = Sources.from_json(doc.get("sources"))
    data = dict(data)
    if sources.dataset:
        data["dataset"] = sources.dataset  # absolute: the same data from any folder
    if sources.datasets:
        data["datasets_file"] = sources.datasets
    if overrides.get("dataset") is not None:
        raise ConfigError("--resume replays the recorded dataset; drop --dataset (or start another experiment "
                          "without --resume)")
    cfg = config_from_data(data, overrides, f"{store.experiment_file} (recorded config)")
    config_file = Path(sources.config) if sources.config else None
    given = {k: v for k, v in options.items() if v is not None}
    merged = cast(DatasetOptions, {**sources.dataset_options, **given})  # as Session.open recorded them
    if isinstance(labels := merged.get("labels"), str):
        merged["labels"] = Path(labels)
    log.info("%s %s with its recorded settings%s", doing, store.root,
             f" (config {config_file})" if config_file else "")
    return Recorded(cfg, config_file if config_file is not None and config_file.exists() else None, merged,
                    store.root)
