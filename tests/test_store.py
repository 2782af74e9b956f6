import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ablation_cli.durable import seal
from ablation_cli.errors import LockHeldError
from ablation_cli.store import ExperimentStore, diff_parts, experiment_lock, verify

FP = {"fingerprint": "abc", "config": {"dropout": 0.5}, "dataset": {"name": "d"}, "code": {"v": 1}}


def run_doc(fp=FP):
    return seal({"run": 1, "seed": 42, "metrics": {"test_acc": 0.5},
                 "meta": {**fp, "created_at": "now"}})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "unreadable JSON"),
        (json.dumps(run_doc())[:40], "unreadable JSON"),  # truncated
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"run": 1}), "wrong schema"),
        (json.dumps({**run_doc(), "metrics": {"test_acc": 0.99}}), "checksum mismatch"),
        (json.dumps({**run_doc(), "meta": {**run_doc()["meta"], "schema_version": 99}}), "schema_version"),
    ],
    ids=["garbage", "truncated", "array", "wrong-schema", "tampered", "future-schema"],
)
def test_verify_detects_corruption(tmp_path: Path, content: str, reason: str):
    path = tmp_path / "run_1.json"
    path.write_text(content)
    verdict = verify(path, "run", FP)
    assert verdict.state == "corrupt"
    assert reason in verdict.reason


def test_verify_ok_missing_and_stale(tmp_path: Path):
    path = tmp_path / "run_1.json"
    assert verify(path, "run", FP).state == "missing"
    path.write_text(json.dumps(run_doc()))
    assert verify(path, "run", FP).state == "ok"
    new = {**FP, "fingerprint": "def", "config": {"dropout": 0.3}}
    verdict = verify(path, "run", new)
    assert verdict.state == "stale"
    assert verdict.changes == ["dropout: 0.5 -> 0.3"]


def test_diff_parts_names_every_changed_field():
    old = {"config": {"dropout": 0.3, "lr": 0.001}, "dataset": {"fp": "a"}, "code": {"v": 1}}
    new = {"config": {"dropout": 0.5, "lr": 0.001}, "dataset": {"fp": "b"}, "code": {"v": 2}}
    assert diff_parts(old, new) == ["dropout: 0.3 -> 0.5", "fp: a -> b", "v: 1 -> 2"]


def test_load_verified_moves_corrupt_and_stale_aside(tmp_path: Path, caplog):
    store = ExperimentStore(tmp_path)
    bad = store.run_path("c", 1)
    bad.parent.mkdir(parents=True)
    bad.write_text("garbage")
    assert store.load_verified(bad, "run", FP).state == "corrupt"
    assert not bad.exists()
    (moved,) = store.quarantine_dir.iterdir()
    assert moved.read_text() == "garbage" and moved.name.startswith("runs__c__run_1.json.")
    assert "corrupt" in caplog.text

    stale = store.run_path("c", 2)
    stale.write_text(json.dumps(run_doc()))
    assert store.load_verified(stale, "run", {**FP, "fingerprint": "x", "config": {"dropout": 0.1}}).state == "stale"
    assert not stale.exists()
    assert len(list(store.superseded_dir.iterdir())) == 1
    assert "dropout: 0.5 -> 0.1" in caplog.text


def test_lock_refuses_a_second_holder_with_its_identity(tmp_path: Path):
    code = ("import sys, time; from pathlib import Path; from ablation_cli.store import experiment_lock\n"
            "with experiment_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError) as info, experiment_lock(tmp_path):
            pass
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "started 20" in msg
        assert info.value.exit_code == 3
    finally:
        holder.kill()
        holder.wait()


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, caplog):
    code = ("import sys, os, signal; from pathlib import Path; from ablation_cli.store import experiment_lock\n"
            "with experiment_lock(Path(sys.argv[1])):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert dead.returncode == -9
    assert (tmp_path / ".lock.json").exists()
    with experiment_lock(tmp_path):
        held = json.loads((tmp_path / ".lock.json").read_text())
        assert held["pid"] == os.getpid()
    assert "taking over the lock left by pid" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / ".lock.json").exists()


def test_reset_refuses_a_cell_a_live_process_trains_and_is_never_undone(tmp_path: Path):
    """A Slurm task claims its cell (no experiment lock): reset must not delete under it, or the task would
    write the cell from runs it loaded before the reset (issue 26, item 1)."""
    from tests.conftest import ablate_in_process as ablate
    from tests.conftest import cell_claimed, make_experiment

    store = make_experiment(tmp_path / "exp")
    with cell_claimed(store.root, "all_layers_stats") as holder:
        before = sorted(p.relative_to(store.root) for p in store.checkpoints.rglob("*.json"))
        res = ablate("reset", "--all", "--yes", "-o", str(store.root), cwd=tmp_path)
        assert res.returncode == 3, res.stderr
        assert (f"error: all_layers_stats is being trained right now (host {socket.gethostname()}, pid "
                f"{holder.pid}); nothing was changed") in res.stderr
        assert sorted(p.relative_to(store.root) for p in store.checkpoints.rglob("*.json")) == before
        other = ablate("reset", "--rep", "simple_stats", "--yes", "-o", str(store.root), cwd=tmp_path)
        assert other.returncode == 0, other.stderr  # cells nobody trains reset as before
    res = ablate("reset", "--all", "--yes", "-o", str(store.root), cwd=tmp_path)
    assert res.returncode == 0 and not store.run_indices("all_layers_stats"), res.stderr
