"""The warm launcher the end-to-end tests start `ablate` with (tests/warm.py): a child behaves as
``python -m ablation_cli`` started fresh, and what it cannot start as a fresh one would, it does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import warm
from tests.conftest import write_project

REPO = Path(__file__).resolve().parent.parent


def _fresh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ablation_cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["no-such-command"], ["status", "-o", "nowhere"]])
def test_a_child_prints_and_exits_as_a_fresh_interpreter(tmp_path, args):
    proc = warm.popen(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert isinstance(proc, warm.WarmProcess)  # forked, not started fresh
    out, err = proc.communicate(timeout=120)
    fresh = _fresh(*args, cwd=tmp_path)
    assert (proc.returncode, out, err) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_child_runs_in_its_folder_with_its_environment_and_dies_of_kill_9(tmp_path):
    write_project(tmp_path)
    crashed = warm.run(["run", "-c", "exp.toml"], tmp_path, env={"ABLATE_CRASH_AT": "write:run_*.json@1"})
    assert crashed.returncode == -signal.SIGKILL  # the crash hook read this child's environment
    assert (tmp_path / "results/tiny_tinydemo/experiment.json").exists()  # written in its working folder
    proc = warm.popen(["run", "-c", "exp.toml", "-o", "other"], tmp_path)
    time.sleep(0.5)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_a_child_whose_client_is_gone_is_killed(tmp_path):
    """kill -9 of a shell's `ablate` (the client) ends its child too, as it ends a real process."""
    write_project(tmp_path, training="[training]\nmax_epochs = 300\npatience = 300\nbatch_size = 32\n")
    proc = warm.popen(["run", "-c", "exp.toml"], tmp_path)
    assert isinstance(proc, warm.WarmProcess)
    time.sleep(1.0)
    os.kill(proc.pid, 0)  # alive
    proc._answers.close()  # what the client's death does to its connection
    proc._conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child outlived its client")
    assert not (tmp_path / "results/tiny_tinydemo/results.json").exists()  # killed, not finished


def test_what_changes_an_interpreters_start_gets_a_fresh_one(tmp_path):
    threads = warm.popen(["--help"], tmp_path, env={"OMP_NUM_THREADS": "7"}, stdout=subprocess.DEVNULL)
    assert isinstance(threads, subprocess.Popen) and threads.wait(timeout=120) == 0
    shadow = tmp_path / "shadow" / "mlflow"  # a PYTHONPATH that hides a module the server imported
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden')\n")
    hidden = warm.popen(["--help"], tmp_path, env={"PYTHONPATH": str(shadow.parent)}, stdout=subprocess.DEVNULL)
    assert isinstance(hidden, subprocess.Popen) and hidden.wait(timeout=120) == 0
    checkout = warm.popen(["--help"], tmp_path, env={"PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    assert isinstance(checkout, warm.WarmProcess) and checkout.wait(timeout=120) == 0  # the one loaded


def test_the_shell_client_passes_its_streams_and_exit_status(tmp_path):
    env = {**os.environ, "ABLATE_WARM_SOCKET": warm.socket_path()}
    client = [sys.executable, str(REPO / "tests/warm.py"), "--client"]
    for args in (["--help"], ["no-such-command"]):
        res = subprocess.run([*client, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        fresh = _fresh(*args, cwd=tmp_path)
        assert (res.returncode, res.stdout, res.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
