"""Walk the grid: decide what is pending, hand it to an executor, report progress.

The orchestrator receives its collaborators (the workspace over the dataset, the experiment store,
the executor) and owns the decisions between them: which cells are done, which are stale, which a
Slurm task still holds, when the data is loaded and checked, and when features are computed.
"""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from ablation_cli import __version__, superseded, tracking
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetInfo
from ablation_cli.durable import now_iso
from ablation_cli.executors.base import Batch, Executor, Outcome
from ablation_cli.executors.local import LocalExecutor
from ablation_cli.executors.slurm_queue import live_cells
from ablation_cli.grid import Cell, expand
from ablation_cli.progress import Reporter
from ablation_cli.records import Fingerprint, Sources
from ablation_cli.store import ExperimentStore
from ablation_cli.workspace import Workspace

log = logging.getLogger(__name__)


def dataset_record(info: DatasetInfo) -> dict[str, object]:
    """experiment.json's ``dataset``: what a later run compares to know it is the same dataset."""
    return {"name": info.name, "kind": info.kind, "fingerprint": info.fingerprint,
            "num_samples": info.num_samples, "num_layers": len(info.layers), "details": dict(info.details)}


def experiment_record(cfg: ExperimentConfig, info: DatasetInfo, cells: list[Cell],
                      previous: Mapping[str, object] | None, sources: Sources | None = None) -> dict[str, object]:
    """experiment.json: resolved config, where it came from (``sources``: what ``ablate run --resume``
    replays), dataset summary, and each cell's expected fingerprint."""
    layer_configs: dict[str, dict[str, object]] = {}
    for cell in cells:
        layer_configs.setdefault(cell.layer_config, {"num_layers": len(cell.layers), "layers": list(cell.layers),
                                                     **({"derived": dict(cell.derivation)} if cell.derivation else {})})
    return {
        "schema_version": 1,
        "experiment": cfg.name,
        "dataset": dataset_record(info),
        "num_runs": cfg.num_runs,
        "config": cfg.model_dump(mode="json"),
        **({"sources": sources.to_json()} if sources else {}),
        "layer_configs": layer_configs,
        "cells": [
            {"id": c.id, "layer_config": c.layer_config, "representation": c.representation,
             **({"classifier": c.classifier} if c.classifier is not None else {}),
             **({"axes": dict(c.settings)} if c.settings else {}),
             "num_layers": len(c.layers), **c.fingerprint.record}
            for c in cells
        ],
        "ablate_version": __version__,
        "created_at": (previous or {}).get("created_at", now_iso()),
        "updated_at": now_iso(),
        "host": socket.gethostname(),
    }


class Orchestrator:
    def __init__(self, cfg: ExperimentConfig, workspace: Workspace, store: ExperimentStore,
                 executor: Executor | None = None, reporter: Reporter | None = None,
                 restart_stale: bool = False, sources: Sources | None = None) -> None:
        self.cfg = cfg
        self.restart_stale = restart_stale
        self.sources = sources
        self.workspace = workspace
        self.store = store
        self.executor: Executor = executor or LocalExecutor()
        self.reporter = reporter or Reporter()

    def is_done(self, cell: Cell, move_bad: bool = False) -> bool:
        return self.store.cell_state(cell.id, cell.fingerprint.record, self.cfg.num_runs, move_bad).state == "ok"

    def record(self, info: DatasetInfo, cells: list[Cell]) -> None:
        """Write experiment.json and clear temp files: only once the data has been checked."""
        previous = None
        if self.store.exists():
            try:
                previous = self.store.read_experiment()
            except Exception:  # a damaged record is simply rewritten
                previous = None
        self.store.write_experiment(experiment_record(self.cfg, info, cells, previous, self.sources))
        if removed := self.store.remove_temp_files():
            log.info("Removed %d temp file(s) left by an interrupted write", removed)

    def plan(self, load_data: bool) -> tuple[list[Cell], list[Cell], list[Cell]]:
        """Cells, those done, those pending; experiment.json written and bad files moved aside. With
        ``load_data`` the data is loaded and checked first: a bad dataset is exit 2 and touches nothing."""
        info = self.workspace.info
        cells = expand(self.cfg, info)
        log.info("ablate %s: experiment %s on dataset %s, %d cells x %d runs, device %s", __version__,
                 self.cfg.name, info.name, len(cells), self.cfg.num_runs, self.workspace.device)
        if self.sources:
            log.info("Config: %s; datasets: %s", self.sources.config or "built-in defaults",
                     self.sources.datasets or "built-in list")
        expected = {c.id: Fingerprint.from_json(c.fingerprint.record) for c in cells}
        stale = superseded.stale_work(self.store, expected)
        refused = superseded.refuse(self.store, stale) if stale and not self.restart_stale else None
        if refused is not None and not any(s.data for s in stale):
            raise refused  # a changed setting: before the data is read, anything computed or written
        done = [c for c in cells if self.is_done(c)]
        pending = [c for c in cells if c not in done]
        if pending and load_data:  # one pass over the data: checked, and every feature still needed computed
            self.check_space(len(pending), list(dict.fromkeys(c.representation for c in pending)))
            self.workspace.prepare([c.representation for c in pending])
            _ = self.workspace.split
        if refused is not None:
            raise refused  # changed data: once it is checked (a damaged file says so first), nothing written
        self.record(info, cells)
        if stale:
            moved = superseded.supersede(self.store, stale, expected)
            log.warning("--restart-stale: %d file(s) of %d cell(s) made under other settings moved to %s; "
                        "`ablate restore` brings them back", moved, len(stale),
                        self.store.superseded_dir.relative_to(self.store.root))
        for c in pending:
            self.is_done(c, move_bad=True)  # move corrupt / stale files aside
        _log_summary(cells, done, self.cfg)
        for c in done:
            log.info("Skipping %s (already completed)", c.id)
        return cells, done, pending

    def _leave_to_slurm(self, pending: list[Cell]) -> list[Cell]:
        """The pending cells minus those a queued or running Slurm task of this experiment will run."""
        live = live_cells(self.store)
        for c in pending:
            if c.id in live:
                log.info("Leaving %s to Slurm job %s (%s)", c.id, *live[c.id])
        return [c for c in pending if c.id not in live]

    def run(self, fail_fast: bool = False) -> Outcome:
        here = self.executor.in_process
        cells, done, pending = self.plan(load_data=here)
        tracking.catch_up(self.cfg.tracking.mlflow, self.store, [c.id for c in done])
        todo = self._leave_to_slurm(pending)
        outcome = Outcome(skipped=[c.id for c in done], left_to_slurm=[c.id for c in pending if c not in todo])
        if not todo:
            if not here:
                log.info("Nothing to submit.")
            elif not pending:
                log.info("Nothing to do: all %d cells are complete.", len(cells))
            else:
                log.info("Nothing to do here: %d of %d cells are complete, the others are queued or running in "
                         "Slurm.", len(done), len(cells))
            return outcome
        batch = Batch(todo, self.cfg, self.store, self.workspace, self.reporter)
        if not here:
            part = self.executor.run(batch, fail_fast)
            outcome.submission = part.submission
            return outcome
        self.reporter.start(len(cells), len(done))
        try:
            outcome.add(self.executor.run(batch, fail_fast))
        finally:
            self.reporter.close()
        return outcome


    def check_space(self, cells: int, reps: list[str]) -> None:
        """Before a long run: warn (not refuse: estimates are rough) when a disk looks too small for what
        the run will write, the checkpoints and merge outputs, and the feature cache."""
        cache = self.workspace.cache
        needs = [(self.store.root, cells * (CELL_BYTES + self.cfg.num_runs * RUN_BYTES) + MERGE_BYTES)]
        if cache is not None:
            needs.append((cache.root, self.workspace.cache_bytes_to_write(reps)))
        by_disk: dict[int, tuple[Path, int, int]] = {}
        for path, need in needs:
            where = next(p for p in (path, *path.parents) if p.exists())
            disk = where.stat().st_dev
            _, total, free = by_disk.get(disk, (path, 0, shutil.disk_usage(where).free))
            by_disk[disk] = (path, total + need, free)
        for path, need, free in by_disk.values():
            if need > free:
                log.warning("%s: %s free on its disk, but this run will write about %s there. Free space now, "
                            "or the run stops (exit 4) when the disk is full and the same command resumes it",
                            path, _size(free), _size(need))


CELL_BYTES, RUN_BYTES, MERGE_BYTES = 64 << 10, 32 << 10, 4 << 20  # generous: 10 classes, 100 epochs, plots


def _size(n: int) -> str:
    if n < 1 << 20:
        return f"{n >> 10} KB"
    return f"{n / (1 << 20):.0f} MB" if n < 10 << 30 else f"{n / (1 << 30):.1f} GB"


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
