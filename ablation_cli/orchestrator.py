"""Walk the grid: decide what is pending, run it, isolate failures, report progress."""

from __future__ import annotations

import logging
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any

from ablation_cli import __version__
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetInfo, DatasetSource
from ablation_cli.errors import Stopped
from ablation_cli.features.cache import FeatureCache
from ablation_cli.grid import Cell, expand
from ablation_cli.progress import Reporter
from ablation_cli.store import ExperimentStore, now_iso, verify

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> one-line error

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
                 cache: FeatureCache | None = None) -> None:
        self.cfg = cfg
        self.cache = cache
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

    def run(self, fail_fast: bool = False) -> Outcome:
        info = self.source.describe()
        cells = expand(self.cfg, info)
        log.info("ablate %s: experiment %s on dataset %s, %d cells x %d runs, device %s", __version__,
                 self.cfg.name, info.name, len(cells), self.cfg.num_runs, self.device)
        done = [c for c in cells if cell_is_done(self.store, c, self.cfg.num_runs)]
        pending = [c for c in cells if c not in done]
        workspace = None
        if pending:
            from ablation_cli.executors.workspace import Workspace

            workspace = Workspace(self.source, self.cfg.split, self.cache)
            _ = workspace.split  # load and check the data first: a bad dataset is exit 2 and touches nothing
        self.record(info, cells)
        for c in pending:
            cell_is_done(self.store, c, self.cfg.num_runs, move_bad=True)  # move corrupt / stale files aside
        _log_summary(cells, done, self.cfg)
        outcome = Outcome(skipped=[c.id for c in done])
        for c in done:
            log.info("Skipping %s (already completed)", c.id)
        if workspace is None:
            log.info("Nothing to do: all %d cells are complete.", len(cells))
            return outcome

        from ablation_cli.executors.local import run_cell

        self.reporter.start(len(cells), len(done))
        try:
            reps = list(dict.fromkeys(c.representation for c in pending))
            try:  # every representation still needed, in one pass over the data
                workspace.prepare(reps)
            except Exception as exc:  # a failing representation is reported by its cells, one by one
                log.warning("Computing all features in one pass failed (%s: %s); computing them cell by cell",
                            type(exc).__name__, exc)
            for cell in pending:
                try:
                    run_cell(cell, self.cfg, self.store, workspace, self.reporter, self.device)
                    outcome.done.append(cell.id)
                except Stopped:
                    raise
                except Exception as exc:  # isolate the cell: record, report, go on
                    outcome.failed[cell.id] = f"{type(exc).__name__}: {exc}"
                    self._record_failure(cell, exc)
                    if fail_fast:
                        log.error("Stopping at the first failure (--fail-fast)")
                        break
        finally:
            self.reporter.close()
        return outcome

    def _record_failure(self, cell: Cell, exc: Exception) -> None:
        tb = traceback.format_exc()
        self.store.write_failure(cell.id, {
            "cell": cell.id, "type": type(exc).__name__, "message": str(exc), "traceback": tb,
            "failed_at": now_iso(), "host": socket.gethostname(),
        })
        self.store.clear_heartbeat(cell.id)
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
