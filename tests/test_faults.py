"""Faults from the machine, real ones: a full disk (a small tmpfs), a read-only folder (a read-only
bind mount), a full feature cache. None is a cell's failure: the run stops at once with one line and
exit 4 (a full cache only warns), and the same command finishes once the cause is gone."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ablation_cli.data.demo import DemoSource
from ablation_cli.store import verify
from tests.conftest import TINY_DEMO, ablate, load_json, strip_timing, write_project
from tests.lora_files import write_dataset


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount after the test (innermost first)."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tmpfs(path: Path, size: str, mounts: list[Path]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    mounts.append(path)
    return path


def _checkpoints_all_valid(exp: Path) -> None:
    for path in (exp / "checkpoints").rglob("*.json"):
        kind = "run" if path.parent.parent.name == "runs" else "cell"
        assert verify(path, kind, None).state == "ok", path


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_finishes_it(tmp_path, mounts):
    reference = tmp_path / "ref"
    write_project(reference)
    assert ablate("run", "-c", "exp.toml", cwd=reference).returncode == 0
    victim = tmp_path / "victim"
    write_project(victim)
    out = tmpfs(victim / "out", "64k", mounts)
    full = ablate("run", "-c", "exp.toml", "-o", "out", cwd=victim)
    assert full.returncode == 4, full.stderr
    errors = _error_lines(full.stderr)
    assert len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0], full.stderr
    assert "free space on that disk, then rerun the same command" in errors[0]
    assert "Traceback" not in full.stderr and "FAILED" not in full.stderr  # not a cell's failure
    exp = out / "tiny_tinydemo"
    assert not list(out.rglob("*.tmp"))  # no temp file left behind
    _checkpoints_all_valid(exp)
    assert not (exp / "failures").exists()
    assert _mount("-o", "remount,size=64m", str(out))  # space freed
    again = ablate("run", "-c", "exp.toml", "-o", "out", cwd=victim)
    assert again.returncode == 0, again.stderr
    expected = strip_timing(load_json(reference / "results/tiny_tinydemo/results.json"))
    assert strip_timing(load_json(exp / "results.json")) == expected


def test_a_read_only_output_folder_is_one_line_exit_4(tmp_path, mounts):
    write_project(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    if not (_mount("--bind", str(ro), str(ro)) and (mounts.append(ro) or True)
            and _mount("-o", "remount,ro,bind", str(ro))):
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    res = ablate("run", "-c", "exp.toml", "-o", "ro", cwd=tmp_path)
    assert res.returncode == 4, res.stderr
    errors = _error_lines(res.stderr)
    assert (len(errors) == 1 and "Read-only file system (EROFS)" in errors[0] and str(ro) in errors[0]) or \
        "ro/tiny_tinydemo" in errors[0], res.stderr
    assert "use a writable folder" in errors[0] and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_full_feature_cache_warns_and_the_run_goes_on(tmp_path, mounts):
    write_project(tmp_path)
    loras = write_dataset(DemoSource(name="tinydemo", **TINY_DEMO).load(), tmp_path / "loras", "peft")
    cache = tmpfs(tmp_path / "cache", "4k", mounts)
    res = ablate("run", "-c", "exp.toml", "--dataset", str(loras), "--cache-dir", str(cache), "-o", "full",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "feature cache: cannot write to" in res.stderr and "features are computed in memory" in res.stderr
    plain = ablate("run", "-c", "exp.toml", "--dataset", str(loras), "--no-cache-features", "-o", "plain",
                   cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    got, expected = (strip_timing(load_json(next((tmp_path / d).glob("*/results.json")))) for d in ("full", "plain"))
    assert got == expected
