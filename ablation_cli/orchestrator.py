"""Walk the grid: decide what is pending, run it, isolate failures, report progress."""

from __future__ import annotations

import logging
import socket
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ablation_cli import __version__
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetInfo, DatasetSource
from ablation_cli.errors import Stopped
from ablation_cli.features.cache import FeatureCache

if TYPE_CHECKING:
    from ablation_cli.executors.spec import JobSpec
    from ablation_cli.executors.workspace import Workspace
from ablation_cli.grid import Cell, expand
from ablation_cli.progress import Reporter
from ablation_cli.store import ExperimentStore, now_iso, verify

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> one-line error
    left_to_slurm: list[str] = field(default_factory=list)  # queued or running in a Slurm job

    @property
    def ok(self) -> bool:
        return not self.failed


def experiment_record(cfg: ExperimentConfig, info: DatasetInfo, cells: list[Cell],
                      previous: dict[str, Any] | None) -> dict[str, Any]:
    """experiment.json: resolved config, dataset summary, and each cell's expected fingerprint."""
    layer_configs: dict[str, Any] = {}
    for cell in cells:
        layer_configs.setdefault(cell.layer_config, {"num_layers": len(cell.layers), "layers": list(cell.layers)})
    return {
        "schema_version": 1,
        "experiment": cfg.name,
        "dataset": {"name": info.name, "kind": info.kind, "fingerprint": info.fingerprint,
                    "num_samples": info.num_samples, "num_layers": len(info.layers),
                    "details": dict(info.details)},
        "num_runs": cfg.num_runs,
        "config": cfg.model_dump(mode="json"),
        "layer_configs": layer_configs,
        "cells": [
            {"id": c.id, "layer_config": c.layer_config, "representation": c.representation,
             "num_layers": len(c.layers), "fingerprint": c.fingerprint.digest, **c.fingerprint.parts}
            for c in cells
        ],
        "ablate_version": __version__,
        "created_at": (previous or {}).get("created_at", now_iso()),
        "updated_at": now_iso(),
        "host": socket.gethostname(),
    }


def cell_is_done(store: ExperimentStore, cell: Cell, num_runs: int, move_bad: bool = False) -> bool:
    """A valid cell checkpoint with exactly ``num_runs`` runs; with ``move_bad``, a corrupt one goes
    to .quarantine/ and a stale one to .superseded/ (only once the data is known to be good)."""
    if not store.cell_path(cell.id).exists():
        return False
    from ablation_cli.executors.local import fingerprint_record

    check = store.load_verified if move_bad else verify
    verdict = check(store.cell_path(cell.id), "cell", fingerprint_record(cell))
    return verdict.state == "ok" and verdict.doc is not None and verdict.doc["num_runs"] == num_runs


class Orchestrator:
    def __init__(self, cfg: ExperimentConfig, source: DatasetSource, store: ExperimentStore,
                 reporter: Reporter | None = None, device: str | None = None,
                 cache: FeatureCache | None = None, spec: JobSpec | None = None, workers: int = 1) -> None:
        self.cfg = cfg
        self.cache = cache
        self.spec = spec
        self.workers = workers
        self.source = source
        self.store = store
        self.reporter = reporter or Reporter()
        self.device = device or cfg.device

    def record(self, info: DatasetInfo, cells: list[Cell]) -> None:
        """Write experiment.json and clear temp files: only once the data has been checked."""
        previous = None
        if self.store.exists():
            try:
                previous = self.store.read_experiment()
            except Exception:  # a damaged record is simply rewritten
                previous = None
        self.store.write_experiment(experiment_record(self.cfg, info, cells, previous))
        if removed := self.store.remove_temp_files():
            log.info("Removed %d temp file(s) left by an interrupted write", removed)

    def plan(self, load_data: bool) -> tuple[list[Cell], list[Cell], list[Cell], Workspace | None]:
        """Cells, those done, those pending; experiment.json written and bad files moved aside. With
        ``load_data`` the data is loaded and checked first: a bad dataset is exit 2 and touches nothing."""
        info = self.source.describe()
        cells = expand(self.cfg, info)
        log.info("ablate %s: experiment %s on dataset %s, %d cells x %d runs, device %s", __version__,
                 self.cfg.name, info.name, len(cells), self.cfg.num_runs, self.device)
        done = [c for c in cells if cell_is_done(self.store, c, self.cfg.num_runs)]
        pending = [c for c in cells if c not in done]
        workspace = None
        if pending:
            from ablation_cli.executors.workspace import Workspace

            workspace = Workspace(self.source, self.cfg.split, self.cache, self.device)
            if load_data:
                _ = workspace.split
        self.record(info, cells)
        for c in pending:
            cell_is_done(self.store, c, self.cfg.num_runs, move_bad=True)  # move corrupt / stale files aside
        _log_summary(cells, done, self.cfg)
        for c in done:
            log.info("Skipping %s (already completed)", c.id)
        return cells, done, pending, workspace

    def _leave_to_slurm(self, pending: list[Cell]) -> list[Cell]:
        """The pending cells minus those a queued or running Slurm task of this experiment will run."""
        from ablation_cli.executors.slurm import live_cells

        live = live_cells(self.store)
        for c in pending:
            if c.id in live:
                log.info("Leaving %s to Slurm job %s (%s)", c.id, *live[c.id])
        return [c for c in pending if c.id not in live]

    def run(self, fail_fast: bool = False) -> Outcome:
        cells, done, pending, workspace = self.plan(load_data=True)
        outcome = Outcome(skipped=[c.id for c in done])
        mine = self._leave_to_slurm(pending)
        outcome.left_to_slurm = [c.id for c in pending if c not in mine]
        pending = mine
        if workspace is None:
            log.info("Nothing to do: all %d cells are complete.", len(cells))
            return outcome
        if not pending:
            log.info("Nothing to do here: %d of %d cells are complete, the others are queued or running in Slurm.",
                     len(done), len(cells))
            return outcome

        self.reporter.start(len(cells), len(done))
        try:
            reps = list(dict.fromkeys(c.representation for c in pending))
            try:  # every representation still needed, in one pass over the data
                workspace.prepare(reps)
            except Exception as exc:  # a failing representation is reported by its cells, one by one
                log.warning("Computing all features in one pass failed (%s: %s); computing them cell by cell",
                            type(exc).__name__, exc)
            if self.workers > 1 and self.spec is not None:
                from ablation_cli.executors.workers import run_workers

                part = run_workers(self.spec, [c.id for c in pending], self.workers, fail_fast)
                outcome.done.extend(part.done)
                outcome.failed.update(part.failed)
            else:
                run_cells(pending, self.cfg, self.store, workspace, self.reporter, self.device, outcome, fail_fast)
        finally:
            self.reporter.close()
        return outcome

    def submit_slurm(self) -> dict[str, Any] | None:
        """Plan (without loading the data) and submit what is neither done nor queued in Slurm."""
        from ablation_cli.errors import ConfigError
        from ablation_cli.executors.slurm import submit

        if self.cache is None or self.spec is None:
            raise ConfigError("--executor slurm shares the features between jobs through the feature cache",
                              hint="drop --no-cache-features, and put --cache-dir on a filesystem every node sees")
        _, _, pending, workspace = self.plan(load_data=False)
        todo = self._leave_to_slurm(pending)
        if workspace is None or not todo:
            log.info("Nothing to submit.")
            return None
        reps = list(dict.fromkeys(c.representation for c in todo))
        return submit(self.spec, self.cfg, self.store, [c.id for c in todo], reps, workspace.features_cached(reps))


def run_cells(cells: list[Cell], cfg: ExperimentConfig, store: ExperimentStore, workspace: Any,
              reporter: Reporter, device: str, outcome: Outcome, fail_fast: bool = False) -> Outcome:
    """Run ``cells`` one by one in this process: the code path of every executor (local, workers,
    Slurm tasks). A cell another process has claimed is left to it; one finished meanwhile is
    skipped; a failing cell is recorded and the others go on."""
    from ablation_cli.executors.local import run_cell

    for cell in cells:
        with store.claim(cell.id) as mine:
            if not mine:
                log.info("Skipping %s (another process is running it)", cell.id)
                outcome.skipped.append(cell.id)
                continue
            if cell_is_done(store, cell, cfg.num_runs):
                log.info("Skipping %s (completed by another process)", cell.id)
                outcome.skipped.append(cell.id)
                continue
            try:
                run_cell(cell, cfg, store, workspace, reporter, device)
                outcome.done.append(cell.id)
            except Stopped:
                raise
            except Exception as exc:  # isolate the cell: record, report, go on
                outcome.failed[cell.id] = f"{type(exc).__name__}: {exc}"
                record_failure(store, cell, exc)
                if fail_fast:
                    log.error("Stopping at the first failure (--fail-fast)")
                    break
    return outcome


def record_failure(store: ExperimentStore, cell: Cell, exc: Exception) -> None:
    tb = traceback.format_exc()
    store.write_failure(cell.id, {
        "cell": cell.id, "type": type(exc).__name__, "message": str(exc), "traceback": tb,
        "failed_at": now_iso(), "host": socket.gethostname(),
    })
    store.clear_heartbeat(cell.id)
    log.error("Cell %s FAILED: %s: %s (recorded in failures/%s.json; the grid goes on)\n%s",
              cell.id, type(exc).__name__, exc, cell.id, tb.rstrip())


def _log_summary(cells: list[Cell], done: list[Cell], cfg: ExperimentConfig) -> None:
    done_ids = {c.id for c in done}
    if done:
        log.info("Found %d existing checkpoints", len(done))
        for c in done:
            log.info("  done: %s", c.id)
    log.info("PROGRESS SUMMARY")
    for lc in cfg.layer_configs:
        in_lc = [c for c in cells if c.layer_config == lc]
        n_done = sum(c.id in done_ids for c in in_lc)
        log.info("  %-20s %d/%d completed, %d remaining", lc + ":", n_done, len(in_lc), len(in_lc) - n_done)
    pct = 100.0 * len(done) / len(cells) if cells else 100.0
    log.info("  %-20s %d/%d (%.1f%%)", "Total progress:", len(done), len(cells), pct)
    remaining = len(cells) - len(done)
    if done and remaining:
        log.info("Resuming from checkpoints. Will run %d remaining...", remaining)
    elif remaining:
        log.info("Will run %d cells...", remaining)
