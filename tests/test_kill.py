"""SIGKILL a real `ablate run` at random moments, restart it, and demand identical results."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from ablation_cli.status import build_status
from ablation_cli.store import ExperimentStore, verify
from tests.conftest import ablate_in_process, ablate_popen, load_json, strip_timing, write_project

KILLS = 4  # random moments; tests/test_kill_phases.py kills once in each named phase


def _runs_on_disk(exp: Path) -> int:
    return len(list((exp / "checkpoints/runs").glob("*/run_*.json")))


def _all_checkpoints_valid(exp: Path) -> int:
    checked = 0
    for path in (exp / "checkpoints").rglob("*.json"):
        if ".quarantine" in path.parts or ".superseded" in path.parts:
            continue
        kind = "run" if path.parent.parent.name == "runs" else "cell"
        verdict = verify(path, kind, None)
        assert verdict.state == "ok", f"{path}: {verdict.reason}"
        checked += 1
    return checked


@pytest.mark.slow
def test_sigkill_at_random_moments_then_identical_results(tmp_path: Path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    for folder in (reference, victim):
        write_project(folder, training="[training]\nmax_epochs = 12\npatience = 6\nbatch_size = 32\n")
    ref = ablate_in_process("run", "--config", "exp.toml", "--num-runs", "3", cwd=reference)
    assert ref.returncode == 0, ref.stderr

    rng = random.Random(1234)
    exp = victim / "results/tiny_tinydemo"
    kills = starts = 0
    while kills < KILLS:
        starts += 1
        assert starts <= 4 * KILLS, "the victim never lived long enough to be killed"
        before = _runs_on_disk(exp)
        proc = ablate_popen("run", "--config", "exp.toml", "--num-runs", "3", cwd=victim)
        # a random moment (start-up, loading, features, training), but no later than just after the
        # next finished run: however fast the machine, each life ends with the grid still unfinished
        deadline = time.monotonic() + rng.uniform(0.3, 4.0)
        while time.monotonic() < deadline and proc.poll() is None and _runs_on_disk(exp) == before:
            time.sleep(0.01)
        if _runs_on_disk(exp) > before:
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:  # finished anyway: start over on a fresh folder, keep killing
            assert proc.returncode == 0
            shutil.rmtree(exp)
            continue
        proc.kill()
        proc.wait()
        kills += 1
        if exp.exists():
            _all_checkpoints_valid(exp)
    final = ablate_in_process("run", "--config", "exp.toml", "--num-runs", "3", cwd=victim)
    assert final.returncode == 0, final.stderr
    assert _all_checkpoints_valid(exp) == 4 + 4 * 3
    assert build_status(ExperimentStore(exp))["done"] == 4
    expected = strip_timing(load_json(reference / "results/tiny_tinydemo/results.json"))
    got = strip_timing(load_json(exp / "results.json"))
    assert got == expected, first_difference(got, expected)


def first_difference(a, b, path="") -> str:
    """Where two JSON values first differ (a readable failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} != {b!r}"
