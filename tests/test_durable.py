"""durable.py: atomic writes, sealed JSON, verified reads."""

import json
import os
from pathlib import Path

import pytest

from ablation_cli.durable import (
    OTHER_HOST_TEMP_AGE_S,
    atomic_write,
    atomic_write_json,
    checksum,
    dead_writers_temp,
    host_tag,
    pid_alive,
    read_json_object,
    read_sealed,
    seal,
    temp_path,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checksum_ignores_only_the_checksum_field():
    doc = seal({"run": 1, "metrics": {"test_acc": 0.5}, "meta": {"created_at": "now"}})
    assert doc["meta"]["checksum"] == checksum(doc)
    doc["metrics"]["test_acc"] = 0.6
    assert doc["meta"]["checksum"] != checksum(doc)


def test_a_reader_sees_the_old_file_until_the_new_one_is_complete(tmp_path: Path):
    """Read the target halfway through a write: it still holds the old content, whole."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old" * 1000)
    seen = []

    def write(fh):
        fh.write(b"new" * 500)
        fh.flush()
        seen.append(target.read_bytes())  # halfway: the reader's view
        assert temp_path(target).exists() and temp_path(target).name == f".big.bin.@{host_tag()}.{os.getpid()}.tmp"
        fh.write(b"new" * 500)

    atomic_write(target, write)
    assert seen == [b"old" * 1000]
    assert target.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path: Path):
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")

    def write(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", None), ("[1, 2]", None), ('{"a": 1}', {"a": 1}),
], ids=["garbage", "array", "object"])
def test_read_json_object(tmp_path: Path, content, expected):
    path = tmp_path / "x.json"
    assert read_json_object(path) is None  # missing
    path.write_text(content)
    assert read_json_object(path) == expected


def test_read_sealed_rejects_a_modified_document(tmp_path: Path):
    path = tmp_path / "index.json"
    atomic_write_json(path, seal({"labels": [0, 1], "meta": {}}))
    assert read_sealed(path)["labels"] == [0, 1]
    doc = json.loads(path.read_text())
    doc["labels"] = [1, 0]
    path.write_text(json.dumps(doc))
    assert read_sealed(path) is None


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(2**22 + 12345)


def test_only_dead_writers_temps_are_leftovers(tmp_path: Path):
    """A temp names its writer's host and pid: this host's is a leftover once its pid is gone; another
    host's (whose pid means nothing here) once it is older than OTHER_HOST_TEMP_AGE_S."""
    import subprocess
    import sys
    import time

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        names = {
            "live_here": f".a.json.@{host_tag()}.{alive.pid}.tmp",
            "dead_here": f".b.json.@{host_tag()}.{dead.stdout.strip()}.tmp",
            "legacy_dead": f".c.json.{dead.stdout.strip()}.tmp",
            "legacy_live": f".d.json.{alive.pid}.tmp",
            "other_recent": f".e.json.@node7_cluster_org.{alive.pid}.tmp",
            "other_old": f".f.json.@node7_cluster_org.{alive.pid}.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_text("x")
        old = time.time() - OTHER_HOST_TEMP_AGE_S - 60
        os.utime(tmp_path / names["other_old"], (old, old))
        verdicts = {key: dead_writers_temp(tmp_path / name) for key, name in names.items()}
        assert verdicts == {"live_here": False, "dead_here": True, "legacy_dead": True, "legacy_live": False,
                            "other_recent": False, "other_old": True}
        assert dead_writers_temp(tmp_path / ".gone.json.@node7.1.tmp") is False  # renamed meanwhile

        from ablation_cli.store import ExperimentStore

        store = ExperimentStore(tmp_path)
        assert store.remove_temp_files() == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            names[k] for k in ("live_here", "legacy_live", "other_recent"))
    finally:
        alive.kill()
        alive.wait()
