"""kill -9 in every phase, at a chosen point: ``ABLATE_CRASH_AT=<point>[@<n>]`` makes the real process
SIGKILL itself the n-th time it passes the point (durable.crash_point). After each kill the folder
holds only valid files, `ablate status` reads it, and the same command carries on; the results at
the end equal an uninterrupted run's.

One experiment is killed once per phase, in the order a run goes through them (each restart passes
the earlier phases again): loading, the feature pass, the feature cache write, training, a run
checkpoint write, the merge's plots, the merge's results.json. The import and the Slurm submission
have their own tests.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from ablation_cli.data.demo import DemoSource
from ablation_cli.store import path_slug, verify
from tests.conftest import (
    TINY_DEMO,
    ablate,
    ablate_in_process,
    load_json,
    strip_timing,
    write_original_folder,
    write_project,
)
from tests.lora_files import write_dataset

KILLED = -signal.SIGKILL

PHASES = [  # (crash point, what must hold after the kill)
    ("load@40", "no experiment output yet"),
    ("features@3", "features not cached"),
    ("write:*.npy", "a cache entry's temp file complete, not renamed"),
    ("epoch@3", "no run finished"),
    ("write:run_*.json@2", "one run on disk"),
    ("write:*.png@3", "all cells done, results.json not written"),
    ("write:results.json", "tables and plots written, results.json not"),
]


def _valid_checkpoints(exp: Path) -> int:
    checked = 0
    for path in (exp / "checkpoints").rglob("*.json"):
        kind = "run" if path.parent.parent.name == "runs" else "cell"
        assert verify(path, kind, None).state == "ok", path
        checked += 1
    return checked


@pytest.mark.slow
def test_a_kill_in_each_phase_then_the_same_command_finishes_with_identical_results(tmp_path):
    write_project(tmp_path)
    loras = write_dataset(DemoSource(name="tinydemo", **TINY_DEMO).load(), tmp_path / "loras", "peft")
    args = ["run", "-c", "exp.toml", "--dataset", str(loras), "--num-runs", "1"]
    ref = ablate_in_process(*args, "-o", "ref", "--cache-dir", "refcache", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    exp = tmp_path / "out" / f"tiny_{path_slug(loras)}"
    victim = [*args, "-o", "out", "--cache-dir", "cache"]

    for point, after in PHASES:
        res = ablate(*victim, cwd=tmp_path, env={"ABLATE_CRASH_AT": point})
        assert res.returncode == KILLED, f"{point}: not killed there (exit {res.returncode})\n{res.stderr}"
        if point.startswith("load"):
            assert not exp.exists() or not (exp / "checkpoints").exists()
        if point == "write:*.npy":
            assert list((tmp_path / "cache").rglob(".*.npy.*.tmp")), after
        if point == "epoch@3":
            assert not list(exp.rglob("run_*.json")), after
        if point == "write:run_*.json@2":
            assert len(list(exp.rglob("run_*.json"))) == 1, after
        if point.startswith("write:*.png"):
            assert (exp / "results.md").exists() and not (exp / "results.json").exists(), after
        if point == "write:results.json":
            assert len(list((exp / "plots").glob("*.png"))) == 5 and not (exp / "results.json").exists(), after
        if (exp / "experiment.json").exists():  # written once the data is loaded and checked
            _valid_checkpoints(exp)
        if point == "write:run_*.json@2":  # status reads a folder a kill left behind
            status = ablate_in_process("status", "-o", "out", "--json", cwd=tmp_path)
            assert status.returncode == 0, f"{point}: {status.stderr}"
            assert json.loads(status.stdout)["cells"][0]["runs_done"] == 1

    final = ablate_in_process(*victim, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert _valid_checkpoints(exp) == 4 + 4
    assert not list(exp.rglob(".*.tmp"))  # a killed writer's temp files are gone
    expected = strip_timing(load_json(tmp_path / "ref" / exp.name / "results.json"))
    assert strip_timing(load_json(exp / "results.json")) == expected
    assert sorted(p.name for p in (exp / "plots").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ref" / exp.name / "plots").iterdir())
    again = ablate_in_process(*victim, cwd=tmp_path)  # merged: nothing to redo
    assert again.returncode == 0 and "Results are up to date" in again.stderr, again.stderr


@pytest.mark.slow
def test_a_killed_import_leaves_no_half_folder_and_the_same_command_finishes_it(tmp_path):
    src = write_original_folder(tmp_path / "results_10k" / "visual_ablation_10k")
    clean = ablate_in_process("import", str(src), "-o", "clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    target = tmp_path / "out" / "visual_ablation_10k"
    for point in ("write:*.json@5", "write:*.png@2"):  # among the cells, then in its merge
        res = ablate("import", str(src), "-o", "out", cwd=tmp_path, env={"ABLATE_CRASH_AT": point})
        assert res.returncode == KILLED, res.stderr
        assert not target.exists()  # nothing half-imported where the user looks
        assert len(list((tmp_path / "out").glob(".visual_ablation_10k.*.tmp"))) == 1  # the stage
    res = ablate_in_process("import", str(src), "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["visual_ablation_10k"]  # stages removed
    got, expected = (strip_timing(load_json(d / "visual_ablation_10k/results.json"))
                     for d in (tmp_path / "out", tmp_path / "clean"))
    for doc in (got, expected):
        doc["imported"].pop("imported_at")
    assert got == expected
