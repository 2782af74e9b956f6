"""Status model: every state, from files only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablation_cli.data.demo import DemoSource
from ablation_cli.grid import expand
from ablation_cli.orchestrator import experiment_record
from ablation_cli.report import format_status_plain
from ablation_cli.status import build_status
from ablation_cli.store import ExperimentStore
from tests.conftest import TINY_DEMO, tiny_config

STATE_OF = {
    "all_layers_simple_stats": "done",
    "all_layers_stats": "running",
    "all_layers_spectral": "interrupted",
    "visual_only_simple_stats": "failed",
    "visual_only_stats": "stale",
    "visual_only_spectral": "pending",
}


def _meta(cell, fingerprint=None):
    fp = {"fingerprint": fingerprint or cell.fingerprint.digest, **cell.fingerprint.parts}
    return {**fp, "created_at": "2026-01-01T00:00:00+00:00"}


def make_experiment(root: Path) -> ExperimentStore:
    """A 6-cell experiment with one cell in each state (no training involved)."""
    cfg = tiny_config(representations=["simple_stats", "stats", "spectral"])
    info = DemoSource(name="tinydemo", **TINY_DEMO).describe()
    cells = {c.id: c for c in expand(cfg, info)}
    store = ExperimentStore(root)
    store.write_experiment(experiment_record(cfg, info, list(cells.values()), None))

    def run(cid, k):
        store.write_run(cid, k, {"cell": cid, "run": k, "seed": 41 + k, "metrics": {"test_acc": 0.5},
                                 "train_time_s": 10.0, "meta": _meta(cells[cid])})

    done = cells["all_layers_simple_stats"]
    for k in (1, 2):
        run(done.id, k)
    store.write_cell(done.id, {"representation": "simple_stats", "layer_config": "all_layers", "num_runs": 2,
                               "per_run_results": [], "test_acc_mean": 0.625, "test_acc_std": 0.125,
                               "test_f1_macro_mean": 0.6, "test_f1_macro_std": 0.1, "num_layers": 128,
                               "feature_dim": 640,
                               "duration_s": 20.0, "meta": _meta(done)})
    run("all_layers_stats", 1)
    store.heartbeat("all_layers_stats", {"cell": "all_layers_stats", "run": 2, "num_runs": 2, "epoch": 5})
    run("all_layers_spectral", 1)
    store.write_failure("visual_only_simple_stats", {"type": "RuntimeError", "message": "boom", "traceback": ""})
    stale = cells["visual_only_stats"]
    meta = _meta(stale, fingerprint="0000")
    meta["config"] = {**meta["config"], "dropout": 0.3}
    store.write_cell(stale.id, {"representation": "stats", "layer_config": "visual_only", "num_runs": 2,
                                "per_run_results": [], "meta": meta})
    return store


def test_every_state(tmp_path: Path):
    store = make_experiment(tmp_path)
    model = build_status(store)
    assert {c["id"]: c["state"] for c in model["cells"]} == STATE_OF
    by = {c["id"]: c for c in model["cells"]}
    assert by["all_layers_simple_stats"]["test_acc_mean"] == 0.625
    assert by["all_layers_stats"]["runs_done"] == 1 and by["all_layers_stats"]["current_run"] == 2
    assert by["all_layers_stats"]["pid"] == os.getpid()
    assert by["visual_only_simple_stats"]["error"] == "RuntimeError: boom"
    assert by["visual_only_stats"]["error"] == "configuration changed: dropout: 0.3 -> 0.2"
    assert model["total"] == 6 and model["done"] == 1
    assert model["runs_done"] == 4 and model["runs_total"] == 12
    assert model["eta_s"] == 10.0 * 8  # mean run time x runs left in the 5 unfinished cells
    keys = {"id", "layer_config", "representation", "state", "runs_done", "runs_total", "test_acc_mean",
            "test_acc_std", "duration_s", "error"}
    assert all(keys <= set(c) for c in model["cells"])
    assert {"experiment", "dataset", "total", "done", "eta_s", "cells"} <= set(model)
    json.dumps(model)  # serialisable as is


def test_dead_heartbeat_is_interrupted(tmp_path: Path):
    store = make_experiment(tmp_path)
    beat = store.progress_path("all_layers_stats")
    doc = json.loads(beat.read_text())
    doc["pid"] = 2**22 + 12345  # no such process
    beat.write_text(json.dumps(doc))
    states = {c["id"]: c["state"] for c in build_status(store)["cells"]}
    assert states["all_layers_stats"] == "interrupted"


def test_plain_status_table(tmp_path: Path):
    text = format_status_plain(build_status(make_experiment(tmp_path)))
    lines = text.splitlines()
    assert lines[1].split() == ["representation", "all_layers", "visual_only"]
    assert lines[3].startswith("simple_stats") and "done 0.625±0.125 (20s)" in lines[3] and "failed" in lines[3]
    assert "running 1/2 (run 2, epoch 5)" in lines[4] and "stale" in lines[4]
    assert "interrupted 1/2" in lines[5] and lines[5].rstrip().endswith("pending")
    assert "Total: 1/6 cells done (16.7%), 1 running, 1 failed, 1 stale, 1 interrupted; runs 4/12; ETA 1m20s" in text
