"""Issue 26, item 4, on the real Slurm (scripts/slurm_up.sh): a task past its time limit is requeued and its
run goes on from its training state. A module of its own so that its minutes of waiting on Slurm run
beside the other modules under pytest-xdist."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ablate, ablate_popen, load_json, strip_timing
from tests.test_scaleout import _slurm_up, _without_versions

SLOW_CELL = """name = "slow"
dataset = "slowdemo"
num_runs = 1
device = "cpu"
representations = ["simple_stats"]
[layer_configs.all_layers]
include = ["*"]
[classifier]
hidden_dim = 256
num_hidden_layers = 2
dropout = 0.2
[training]
max_epochs = 300
patience = 100000
batch_size = 16
plateau_patience = 1000
checkpoint_every_s = 5
[executor.slurm]
time_min = 1
cpus_per_task = 1
max_requeues = 10
"""


@contextlib.contextmanager
def _requeue_holds_released(folder: Path) -> Iterator[list[str]]:
    """Slurm holds a requeued job for 120 s (its BeginTime) and starts it at the next scheduling pass;
    release that hold at once, as an admin's `scontrol update JobId=N StartTime=now` does, for the jobs
    submitted from ``folder``. Yields the ids released, one entry per release."""
    released: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i|%r|%Z"], capture_output=True, text=True,
                                 timeout=20).stdout
            for line in out.splitlines():
                job, reason, workdir = line.split("|", 2)
                if reason == "BeginTime" and Path(workdir).is_relative_to(folder):
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=20)
                    released.append(job)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield released
    finally:
        done.set()
        thread.join()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no running Slurm (bring one up with: sudo bash scripts/slurm_up.sh)")
def test_a_run_longer_than_the_time_limit_is_requeued_and_ends_as_a_local_run(tmp_path):
    """Issue 26, item 4, on the real Slurm: one run of about 60 s (300 epochs paused 0.2 s each) plus start-up
    under a one-minute time limit. Warned before the limit, the task is requeued by submitit; the run goes on
    from its training state each time, and its numbers equal those of the same run trained locally,
    uninterrupted."""
    (tmp_path / "exp.toml").write_text(SLOW_CELL)
    (tmp_path / "datasets.toml").write_text('[slowdemo]\nkind = "demo"\nnum_samples = 120\nnum_classes = 3\n'
                                            'seed = 7\n')
    local = ablate_popen("run", "-c", "exp.toml", "-o", "local", "--threads", "1", "--cache-dir", "localcache",
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # on the other core
    with _requeue_holds_released(tmp_path) as released:
        # 300 epochs of 0.2 s each outlast the one-minute limit with a few seconds of training: the job
        # inherits the pause (sbatch exports the environment), the local run trains without it
        sl = ablate("run", "-c", "exp.toml", "-o", "sl", "--cache-dir", "slcache", "--executor", "slurm", "--wait",
                    cwd=tmp_path, timeout=900, env={"ABLATE_PAUSE_AT": "epoch=0.2"})
    _, local_err = local.communicate(timeout=600)
    assert local.returncode == 0, local_err
    assert sl.returncode == 0, sl.stderr
    exp = tmp_path / "sl/slow_slowdemo"
    logs = "".join(p.read_text(errors="replace") for p in (exp / "slurm/logs").glob("*_log.*"))
    assert "Requeued job" in logs, logs[-3000:]  # submitit requeued it on the time-limit warning
    assert released, "no requeued job was held by Slurm"
    resumed = [int(m) for m in re.findall(r"Run 1 goes on from its training state after epoch (\d+)", logs)]
    assert resumed and resumed == sorted(resumed) and resumed[-1] < 300, logs[-3000:]
    assert not list((exp / "checkpoints/runs").rglob(".state_*")), "a finished run's state is removed"
    sl_cell = strip_timing(load_json(exp / "checkpoints/all_layers_simple_stats.json"))
    local_cell = strip_timing(load_json(tmp_path / "local/slow_slowdemo/checkpoints/all_layers_simple_stats.json"))
    for key in ("per_run_results", "learning_curves", "predictions", "test_acc_mean"):
        assert _without_versions(sl_cell[key]) == _without_versions(local_cell[key]), key
    assert sl_cell["per_run_results"][0]["epochs_run"] == 300
