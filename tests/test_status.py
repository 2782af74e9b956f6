"""Status model: every state, from files only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablation_cli.reports.status_view import format_status_plain
from ablation_cli.status import build_status
from tests.conftest import make_experiment

STATE_OF = {
    "all_layers_simple_stats": "done",
    "all_layers_stats": "running",
    "all_layers_spectral": "interrupted",
    "visual_only_simple_stats": "failed",
    "visual_only_stats": "stale",
    "visual_only_spectral": "pending",
}


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
