"""Scale-out: --workers N on one machine, and --executor slurm on a real Slurm (scripts/slurm_up.sh)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ablation_cli.status import CellStatus
from tests.conftest import ablate, ablate_in_process, ablate_popen, load_json, strip_timing, write_project

CELLS = ["all_layers_simple_stats", "all_layers_stats", "visual_only_simple_stats", "visual_only_stats"]


def _results(root: Path) -> dict:
    return strip_timing(load_json(next(root.glob("*/results.json"))))


def _without_versions(obj):
    """Run metadata names the process's torch thread count; results must agree on everything else."""
    if isinstance(obj, dict):
        return {k: _without_versions(v) for k, v in obj.items() if k != "versions"}
    if isinstance(obj, list):
        return [_without_versions(v) for v in obj]
    return obj


# -- status overlay (pure) ------------------------------------------------------------------------

def _row(state, runs_done=0, runs_total=3):
    return CellStatus("c", "all_layers", "stats", runs_total, state=state, runs_done=runs_done)


@pytest.mark.parametrize(("state", "job", "expected"), [
    ("pending", {"job": "7_1", "state": "PENDING", "live": True}, "pending"),
    ("pending", {"job": "7_1", "state": "RUNNING", "live": True}, "running"),
    ("interrupted", {"job": "7_1", "state": "REQUEUED", "live": True}, "pending"),
    ("pending", {"job": "7_1", "state": "TIMEOUT", "live": False}, "interrupted"),
    ("running", {"job": "7_1", "state": "ENDED", "live": False}, "interrupted"),
    ("done", {"job": "7_1", "state": "ENDED", "live": False}, "done"),
    ("failed", {"job": "7_1", "state": "FAILED", "live": False}, "failed"),
])
def test_slurm_state_overlay(state, job, expected):
    status = _row(state)
    status.apply_slurm(job)
    row = status.to_json()
    assert row["state"] == expected
    assert row["slurm"] == {"job": "7_1", "state": job["state"]}
    if expected == "interrupted":
        how = "" if job["state"] == "ENDED" else f" ({job['state']})"
        assert row["error"] == f"Slurm job 7_1 ended{how} without finishing the cell; rerun to resubmit"


def test_pending_reason_is_shown_and_hopeless_ones_recognised():
    from ablation_cli.executors.slurm_queue import stuck
    from ablation_cli.reports.status_view import format_cell

    status = _row("pending")
    status.apply_slurm({"job": "7_1", "state": "PENDING", "live": True, "reason": "PartitionConfig"})
    row = status.to_json()
    assert row["slurm"] == {"job": "7_1", "state": "PENDING", "reason": "PartitionConfig"}
    assert format_cell(row) == "pending [job 7_1 pending: PartitionConfig]"
    assert stuck("PartitionConfig") and stuck("DependencyNeverSatisfied")
    assert not stuck("Resources") and not stuck("Priority") and not stuck("Dependency")


# -- --workers ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_workers_run_every_cell_once_with_the_sequential_results(tmp_path):
    cfg = write_project(tmp_path)
    seq = ablate_in_process("run", "-c", str(cfg), "-o", "seq", "--threads", "1", cwd=tmp_path)
    assert seq.returncode == 0, seq.stderr
    tracked = importlib.util.find_spec("mlflow") is not None  # both workers log to one SQLite store
    par = ablate("run", "-c", str(cfg), "-o", "par", "--workers", "2",
                 *(["--mlflow", "sqlite:///mlflow.db"] if tracked else []), cwd=tmp_path)
    assert par.returncode == 0, par.stderr
    assert "in 2 worker processes" in par.stderr and "tracking:" not in par.stderr
    log = (tmp_path / "par/tiny_tinydemo/run.log").read_text()
    workers = set(re.findall(r"\[worker (\d)\] Evaluating", log))
    assert workers == {"0", "1"}  # both worked
    for cell in CELLS:
        assert len(re.findall(rf"Evaluating {cell}:", log)) == 1, cell  # exactly once
    assert len(re.findall(r"\]\s+Run \d/2:", log)) == 8  # 4 cells x 2 runs, none trained twice
    par_results = _results(tmp_path / "par")
    par_results["config"].pop("tracking")  # where the runs were also logged: not a result
    seq_results = _results(tmp_path / "seq")
    seq_results["config"].pop("tracking")
    assert _without_versions(par_results) == _without_versions(seq_results)
    if tracked:
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.`ablate.kind` = 'run'")
        assert sorted((r.data.tags["ablate.cell"], r.data.tags["ablate.run"]) for r in runs) == \
            [(c, k) for c in CELLS for k in ("1", "2")]



@pytest.mark.slow
def test_workers_stop_when_their_run_is_killed_and_leave_no_cell_claimed(tmp_path):
    """kill -9 of `ablate run --workers 2`: its workers stop as on SIGTERM (finished runs kept) instead of
    training on as orphans that a rerun would have to leave their cells to."""
    from ablation_cli.store import ExperimentStore

    write_project(tmp_path, training="[training]\nmax_epochs = 300\npatience = 300\nbatch_size = 16\n")
    proc = ablate_popen("run", "-c", "exp.toml", "--workers", "2", "--threads", "1", cwd=tmp_path)
    store = ExperimentStore(tmp_path / "results/tiny_tinydemo")
    _wait_until(lambda: sum(store.progress_path(c).exists() for c in CELLS) >= 2, 300, "both workers to train",
                step=0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes"
    proc.kill()
    proc.wait()  # its pipes are not awaited: orphans would hold them

    def alive(pid: str) -> bool:  # a zombie (no reaper in a container) has stopped
        status = Path(f"/proc/{pid}/status")
        return status.exists() and "State:\tZ" not in status.read_text()
    _wait_until(lambda: not any(alive(pid) for pid in children), 60, "the workers to stop", step=0.2)
    with contextlib.ExitStack() as stack:  # and no cell is left claimed
        assert all(stack.enter_context(store.claim(cell)) for cell in CELLS)


# -- Slurm ----------------------------------------------------------------------------------------

def _slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


def _queued(jobs: list[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=20)
    return [j for j in out.stdout.split() if j in jobs]


def _wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_slurm_without_submitit_says_how_to_install_it(tmp_path):
    shim = tmp_path / "shim" / "submitit"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    cfg = write_project(tmp_path)
    res = ablate("run", "-c", str(cfg), "--executor", "slurm", cwd=tmp_path,
                 env={"PYTHONPATH": f"{tmp_path / 'shim'}:{Path(__file__).resolve().parent.parent}"})
    assert res.returncode == 2
    assert "--executor slurm needs submitit" in res.stderr and "pip install 'ablate[slurm]'" in res.stderr
    assert not (tmp_path / "results").exists()  # checked before anything is written


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no running Slurm (bring one up with: sudo bash scripts/slurm_up.sh)")
def test_slurm_grid_with_a_cancelled_task_resumes_and_equals_a_local_run(tmp_path):
    # runs long enough (no early stop; on Slurm each epoch paused 0.05 s) that a task can be cancelled
    # between two of its runs; the local run trains the same epochs unpaused
    cfg = write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 3\ndevice = "cpu"\n'
                        'representations = ["simple_stats", "stats"]\n',
                        training="[training]\nmax_epochs = 50\npatience = 150\nbatch_size = 32\n"
                                 "plateau_patience = 2\n")
    common = ["-c", str(cfg), "--cache-dir", "slcache"]
    paused = {"ABLATE_PAUSE_AT": "epoch=0.05"}
    sub = ablate("run", *common, "-o", "sl", "--executor", "slurm", "--cpus-per-task", "1", cwd=tmp_path,
                 env=paused)
    assert sub.returncode == 0, sub.stderr
    exp = tmp_path / "sl/tiny_tinydemo"
    record = load_json(exp / "slurm/submissions.json")[0]
    assert record["features_job"] and list(record["cells"]) == CELLS  # a fresh cache: features run as a job
    assert f"Submitted feature job {record['features_job']}, then 4 cell task(s)" in sub.stderr
    jobs = [record["features_job"], *record["cells"].values()]

    victim, victim_job = "visual_only_stats", record["cells"]["visual_only_stats"]
    first_run = exp / "checkpoints/runs" / victim / "run_1.json"
    _wait_until(first_run.exists, 300, f"{victim}'s first run")
    subprocess.run(["scancel", victim_job], check=True, timeout=20)
    status = json.loads(ablate("status", "-o", "sl", "--json", cwd=tmp_path).stdout)
    assert {c["id"]: c["slurm"]["job"] for c in status["cells"] if "slurm" in c} == record["cells"]
    _wait_until(lambda: not _queued(jobs), 300, "the array to finish", step=1.0)
    assert not (exp / "checkpoints" / f"{victim}.json").exists()  # cancelled mid-way: cell not finished

    status = json.loads(ablate("status", "-o", "sl", "--json", cwd=tmp_path).stdout)
    row = next(c for c in status["cells"] if c["id"] == victim)
    assert row["state"] == "interrupted" and 1 <= row["runs_done"] < 3
    assert row["error"].startswith(f"Slurm job {victim_job} ended")
    assert status["done"] == 3
    runs_before = row["runs_done"]

    again = ablate("run", *common, "-o", "sl", "--executor", "slurm", "--cpus-per-task", "1", "--wait",
                   cwd=tmp_path, timeout=600, env=paused)
    assert again.returncode == 0, again.stderr
    assert "Submitted 1 cell task(s)" in again.stderr and "feature job" not in again.stderr  # cache is ready
    log = (exp / "run.log").read_text()
    todo = "3" if runs_before == 2 else "2-3"
    assert f"Evaluating {victim}: 64 layers, runs {todo} of 3 to train" in log  # resumed from its run checkpoints
    local = ablate("run", *common[:2], "-o", "local", "--threads", "1", "--cache-dir", "localcache", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert _without_versions(_results(tmp_path / "sl")) == _without_versions(_results(tmp_path / "local"))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no running Slurm (bring one up with: sudo bash scripts/slurm_up.sh)")
def test_a_submitter_killed_after_sbatch_queues_nothing_twice(tmp_path):
    """kill -9 between sbatch and the submissions record: the next submission finds the queued jobs
    (submitit's records in the logs folder) instead of queueing every cell again."""
    cfg = write_project(tmp_path)
    common = ["-c", str(cfg), "--num-runs", "1", "--cache-dir", "cache", "-o", "sl", "--executor", "slurm",
              "--cpus-per-task", "1"]
    killed = ablate("run", *common, cwd=tmp_path, env={"ABLATE_CRASH_AT": "write:submissions.json@2"})
    assert killed.returncode == -9, killed.stderr
    exp = tmp_path / "sl/tiny_tinydemo"
    intent = load_json(exp / "slurm/submissions.json")
    assert len(intent) == 1 and intent[0]["submitting"]["cells"] == CELLS and intent[0]["cells"] == {}
    queued = sorted((exp / "slurm/logs").glob("*_submitted.pkl"))
    assert len(queued) == 1 + 4  # the feature job and the array were queued before the kill
    again = ablate("run", *common, "--wait", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "An earlier submission was interrupted after sbatch; recorded its jobs" in again.stderr
    assert "Submitted" not in again.stderr  # nothing queued twice
    assert sorted((exp / "slurm/logs").glob("*_submitted.pkl")) == queued
    record = load_json(exp / "slurm/submissions.json")
    assert len(record) == 1 and list(record[0]["cells"]) == CELLS
    assert {f"{j}_submitted.pkl" for j in [record[0]["features_job"], *record[0]["cells"].values()]} == \
        {p.name for p in queued}
    local = ablate("run", "-c", str(cfg), "--num-runs", "1", "-o", "local", "--threads", "1", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert _without_versions(_results(tmp_path / "sl")) == _without_versions(_results(tmp_path / "local"))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no running Slurm (bring one up with: sudo bash scripts/slurm_up.sh)")
def test_a_sweep_on_slurm_equals_the_sweep_run_locally(tmp_path):
    """Issue 28: each task rebuilds its swept cell (its own lr) from the JobSpec, as a local run does."""
    cfg = write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                        'representations = ["stats"]\n')
    common = ["-c", str(cfg), "--layer-configs", "visual_only", "--sweep", "training.lr=1e-3,1e-2"]
    sl = ablate("run", *common, "-o", "sl", "--cache-dir", "c1", "--executor", "slurm", "--cpus-per-task", "1",
                "--wait", cwd=tmp_path, timeout=600)
    assert sl.returncode == 0, sl.stderr
    record = load_json(tmp_path / "sl/tiny_tinydemo/slurm/submissions.json")[0]
    assert list(record["cells"]) == ["visual_only_stats__lr=1e-3", "visual_only_stats__lr=0.01"]
    local = ablate("run", *common, "-o", "local", "--cache-dir", "c2", "--threads", "1", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    results = _without_versions(_results(tmp_path / "sl"))
    assert results == _without_versions(_results(tmp_path / "local"))
    curves = [c["learning_curves"] for c in (load_json(tmp_path / f"sl/tiny_tinydemo/checkpoints/{cid}.json")
                                             for cid in record["cells"])]
    assert curves[0] != curves[1]  # two learning rates, two trainings
