"""Experiment tracking in MLflow: a view of the checkpoints, never their source of truth.

Mapping: one MLflow experiment per experiment folder (named after it); one parent run per cell
(tags: layer config, representation, fingerprints, ablate version, git commit, host, device; the
cell's aggregate metrics once it is complete); one child run per training run (hyperparameters as
params, its metrics, the learning curves as step metrics with epoch = step, the confusion matrices
and per-class scores as JSON artifacts); one ``results`` run per merge with results.* and plots/.

Modules: ``uri`` (where to log), ``ledger`` (what is on disk and what was logged of it; no mlflow,
``ablate status`` reads it), ``template`` (new SQLite stores), ``sync`` (the MLflow logging, mlflow
imported only when tracking is on), ``background`` (the grid's queue: never costs a run).
"""

from __future__ import annotations

from ablation_cli.tracking.background import catch_up, flush, notify_cell, notify_merge
from ablation_cli.tracking.ledger import CellOnDisk, LedgerEntry, cells_on_disk, untracked_runs
from ablation_cli.tracking.sync import SyncReport, Tracker, require_mlflow, supersede_reset, sync_failure
from ablation_cli.tracking.template import schema_template
from ablation_cli.tracking.uri import absolute_uri, configured_uri

__all__ = [
    "CellOnDisk",
    "LedgerEntry",
    "SyncReport",
    "Tracker",
    "absolute_uri",
    "catch_up",
    "cells_on_disk",
    "configured_uri",
    "flush",
    "notify_cell",
    "notify_merge",
    "require_mlflow",
    "schema_template",
    "supersede_reset",
    "sync_failure",
    "untracked_runs",
]
