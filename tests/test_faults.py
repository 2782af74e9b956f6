"""Faults from the machine, real ones: a full disk (a small tmpfs), a read-only folder (a read-only
bind mount), a full feature cache. None is a cell's failure: the run stops at once with one line and
exit 4 (a full cache only warns), and the same command finishes once the cause is gone."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ablation_cli.data.demo import DemoSource
from ablation_cli.errors import environment_failure
from ablation_cli.store import path_slug, verify
from tests.conftest import TINY_DEMO, ablate_in_process, load_json, strip_timing, write_project
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
    assert ablate_in_process("run", "-c", "exp.toml", cwd=reference).returncode == 0
    victim = tmp_path / "victim"
    write_project(victim)
    out = tmpfs(victim / "out", "64k", mounts)
    full = ablate_in_process("run", "-c", "exp.toml", "-o", "out", cwd=victim)
    assert full.returncode == 4, full.stderr
    errors = _error_lines(full.stderr)
    assert len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0], full.stderr
    assert "free space on that disk, then rerun the same command" in errors[0]
    assert re.search(r"out/tiny_tinydemo: \d+ KB free on its disk, but this run will write about 4 MB there",
                     full.stderr), full.stderr
    assert "Traceback" not in full.stderr and "FAILED" not in full.stderr  # not a cell's failure
    exp = out / "tiny_tinydemo"
    assert not list(out.rglob("*.tmp"))  # no temp file left behind
    _checkpoints_all_valid(exp)
    assert not (exp / "failures").exists()
    assert _mount("-o", "remount,size=64m", str(out))  # space freed
    again = ablate_in_process("run", "-c", "exp.toml", "-o", "out", cwd=victim)
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
    res = ablate_in_process("run", "-c", "exp.toml", "-o", "ro", cwd=tmp_path)
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
    res = ablate_in_process("run", "-c", "exp.toml", "--dataset", str(loras), "--cache-dir", str(cache), "-o", "full",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "feature cache: cannot write to" in res.stderr and "features are computed in memory" in res.stderr
    assert re.search(rf"{cache}/features: \d+ KB free on its disk, but this run will write about \d+ KB there",
                     res.stderr), res.stderr
    plain = ablate_in_process("run", "-c", "exp.toml", "--dataset", str(loras), "--no-cache-features", "-o", "plain",
                   cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    got, expected = (strip_timing(load_json(next((tmp_path / d).glob("*/results.json")))) for d in ("full", "plain"))
    assert got == expected


# -- a forbidden folder, for real: root may read and write anything, so these run ablate as root
# without the capabilities that bypass file permissions (setpriv), where the permission bits bind --------

DROP = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]


def ablate_bound(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI, bound by file permissions."""
    return subprocess.run([*DROP, sys.executable, "-m", "ablation_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def bound(tmp_path: Path) -> Path:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run ablate bound by file permissions")
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0o000)
    if subprocess.run([*DROP, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE is not allowed here")
    probe.unlink()
    return tmp_path


@pytest.mark.slow
def test_forbidden_dataset_output_and_cache_folders(bound):
    shared_dir = bound
    write_project(shared_dir)
    loras = write_dataset(DemoSource(name="tinydemo", **TINY_DEMO).load(), shared_dir / "loras", "peft")
    run = ["run", "-c", "exp.toml", "--dataset", str(loras), "--num-runs", "1"]

    first = next(loras.rglob("*.safetensors"))
    first.chmod(0o000)  # one adapter file nobody may read
    unreadable = ablate_bound(*run, "-o", "out1", "--cache-dir", "cache1", cwd=shared_dir)
    assert unreadable.returncode == 4, unreadable.stderr
    errors = _error_lines(unreadable.stderr)
    assert len(errors) == 1 and f"{first}: Permission denied (EACCES)" in errors[0], unreadable.stderr
    assert "Traceback" not in unreadable.stderr
    first.chmod(0o644)

    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # nothing may be created in it
    forbidden = ablate_bound(*run, "-o", "locked", "--cache-dir", "cache2", cwd=shared_dir)
    assert forbidden.returncode == 4, forbidden.stderr
    errors = _error_lines(forbidden.stderr)
    folder = f"locked/tiny_{path_slug(loras)}"
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder}: Permission denied (EACCES)"), errors
    assert "fix its permissions or use another folder" in errors[0]

    no_cache = ablate_bound(*run, "-o", "out3", "--cache-dir", "locked", cwd=shared_dir)
    assert no_cache.returncode == 0, no_cache.stderr
    assert "feature cache: cannot write to" in no_cache.stderr and "Permission denied (EACCES)" in no_cache.stderr
    assert (shared_dir / "out3" / f"tiny_{path_slug(loras)}" / "results.json").exists()
    assert not any(locked.iterdir())


def test_every_refusal_of_the_machine_maps_to_exit_4_and_advice():
    for code, advice in [(errno.ENOSPC, "free space on that disk"), (errno.EDQUOT, "within your quota"),
                         (errno.EROFS, "read-only filesystem"), (errno.EACCES, "fix its permissions"),
                         (errno.EPERM, "fix its permissions")]:
        failure = environment_failure(OSError(code, os.strerror(code), "/scratch/x.json"))
        assert failure is not None and failure.exit_code == 4
        assert str(failure).startswith(f"/scratch/x.json: {os.strerror(code)} ({errno.errorcode[code]})")
        assert advice in str(failure) and "rerun the same command" in str(failure)
    assert environment_failure(OSError(errno.EIO, "I/O error", "/x")) is None  # not the machine's refusal
