"""Experiment tracking against a real MLflow: a SQLite store, `mlflow server` and its REST API.
No mocks: runs are read back with mlflow.search_runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import warm
from tests.conftest import ablate, ablate_in_process, load_json, write_original_folder, write_project

mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.slow


def _runs(db: Path, kind: str | None = None, current: bool = True) -> list:
    """MLflow runs of every experiment in the store (of one ``ablate.kind``), superseded ones left out."""
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`ablate.kind` = '{kind}'" if kind else "", max_results=1000)
    return [r for r in runs if not current or r.data.tags.get("superseded") != "true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_resumed_reset_and_unreachable_tracker_then_sync_and_the_web_ui(tmp_path):
    """One experiment through every tracking path: a kill between MLflow and the ledger, a kill mid-write,
    a resume, a reset, a run whose tracker is unreachable, the sync after it, `mlflow server`."""
    write_project(tmp_path)
    db = tmp_path / "mlflow.db"
    args = ["run", "-c", "exp.toml", "--layer-configs", "all_layers", "--mlflow", "sqlite:///mlflow.db"]
    exp = tmp_path / "results/tiny_tinydemo"
    # killed with the second cell's first run checkpoint half written; resumed, killed with a child run
    # half logged in MLflow (created, never ended); resumed, killed with a parent's aggregates logged but
    # not its completion mark; resumed, killed between MLflow's write and the ledger's (logging runs in a
    # background thread, so the first kill may also catch it mid-run)
    for point in ("write:run_*.json@3", "tracking:run-logged", "tracking:cell-logged", "write:*.mlflow.json"):
        killed = ablate(*args, cwd=tmp_path, env={"ABLATE_CRASH_AT": point})
        assert killed.returncode == -9, killed.stderr
    done = ablate_in_process(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tracking:" not in done.stderr

    children = _runs(db, "run")
    assert sorted((r.data.tags["ablate.cell"], r.data.tags["ablate.run"]) for r in children) == \
        [("all_layers_simple_stats", "1"), ("all_layers_simple_stats", "2"), ("all_layers_stats", "1"),
         ("all_layers_stats", "2")]  # each training run exactly once
    parents = {r.data.tags["ablate.cell"]: r for r in _runs(db, "cell")}
    assert sorted(parents) == ["all_layers_simple_stats", "all_layers_stats"]
    for r in children:
        doc = load_json(exp / "checkpoints/runs" / r.data.tags["ablate.cell"] / f"run_{r.data.tags['ablate.run']}.json")
        assert r.data.tags["mlflow.parentRunId"] == parents[r.data.tags["ablate.cell"]].info.run_id
        assert r.data.metrics["test_acc"] == doc["metrics"]["test_acc"]
        assert r.data.params["lr"] == "0.001" and r.data.params["hidden_dim"] == "16"
        assert r.data.params["seed"] == str(doc["seed"])
        history = mlflow.MlflowClient(f"sqlite:///{db}").get_metric_history(r.info.run_id, "curve/val_loss")
        assert [m.step for m in history] == list(range(1, doc["epochs_run"] + 1))
        assert [m.value for m in history] == pytest.approx(doc["learning_curve"]["val_loss"])
        assert r.info.status == "FINISHED"
    for cid, parent in parents.items():
        cell = load_json(exp / "checkpoints" / f"{cid}.json")
        assert parent.data.metrics["test_acc_mean"] == cell["test_acc_mean"]
        assert parent.data.tags["ablate.fingerprint"] == cell["meta"]["fingerprint"]
        assert parent.data.tags["representation"] == cell["representation"] and parent.info.status == "FINISHED"
    assert len(_runs(db, "merge")) == 1
    incomplete = [r for r in _runs(db, current=False) if r.data.tags.get("ablate.incomplete") == "true"]
    assert incomplete and all(r.data.tags["superseded"] == "true" and r.info.status == "KILLED"
                              and r.data.tags["ablate.kind"] == "run" for r in incomplete)
    status = json.loads(ablate_in_process("status", "--json", cwd=tmp_path).stdout)
    assert status["tracking"] == {"mlflow": f"sqlite:///{db}", "untracked_runs": 0}

    reset = ablate_in_process("reset", "--rep", "stats", "--yes", cwd=tmp_path)
    assert reset.returncode == 0 and "Marked 3 MLflow run(s) superseded" in reset.stdout, reset.stdout
    again = ablate_in_process(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(_runs(db, "run")) == 4 and len(_runs(db, "cell")) == 2  # the stats cell afresh
    old = [r for r in _runs(db, current=False)
           if r.data.tags.get("superseded") == "true" and r.data.tags.get("ablate.incomplete") != "true"]
    assert sorted(r.data.tags["ablate.kind"] for r in old) == ["cell", "merge", "run", "run"]  # kept, marked
    resync = ablate_in_process("track", "sync", cwd=tmp_path)
    assert resync.returncode == 0 and "0 run(s), 0 cell(s), 0 merge(s) logged" in resync.stdout, resync.stdout
    # a merge killed with its MLflow run's artifacts half logged: the sync logs it afresh, once
    killed = ablate("merge", cwd=tmp_path, env={"ABLATE_CRASH_AT": "tracking:merge-logged"})
    assert killed.returncode == -9, killed.stderr
    resync = ablate_in_process("track", "sync", cwd=tmp_path)
    assert resync.returncode == 0 and "0 run(s), 0 cell(s), 1 merge(s) logged" in resync.stdout, resync.stdout
    merges = _runs(db, "merge", current=False)
    assert sorted((r.info.status, r.data.tags.get("ablate.incomplete")) for r in merges) == \
        [("FINISHED", None), ("FINISHED", None), ("FINISHED", None), ("KILLED", "true")]
    incomplete.append(next(r for r in merges if r.info.status == "KILLED"))

    # the rest of the grid with the tracker unreachable, then a sync, then the web UI's REST API
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    rest = ablate_in_process("run", "-c", "exp.toml", "--mlflow", dead, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr  # the grid went on
    warnings = [line for line in rest.stderr.splitlines() if "tracking: MLflow at" in line]
    assert len(warnings) == 1 and dead in warnings[0] and "ablate track sync" in warnings[0], rest.stderr
    status = json.loads(ablate_in_process("status", "--json", cwd=tmp_path).stdout)
    assert status["tracking"] == {"mlflow": dead, "untracked_runs": 8}
    failed = ablate_in_process("track", "sync", cwd=tmp_path)  # still unreachable: exit 4, one line
    assert failed.returncode == 4 and failed.stderr.startswith(f"error: MLflow at {dead} failed"), failed.stderr

    sync = ablate_in_process("track", "sync", "--mlflow", "sqlite:///mlflow.db", cwd=tmp_path)
    assert sync.returncode == 0, sync.stderr
    assert "4 run(s), 2 cell(s), 1 merge(s) logged; 1 marked superseded" in sync.stdout  # exactly the missing
    assert ablate_in_process("track", "sync", "--mlflow", "sqlite:///mlflow.db", cwd=tmp_path).stdout.count(
        "0 run(s), 0 cell(s), 0 merge(s) logged") == 1
    assert len(_runs(db, "run")) == 8 and len(_runs(db, "cell")) == 4 and len(_runs(db, "merge")) == 1
    # and the reset cell's runs, three older merges, the half-logged ones
    assert len(_runs(db, current=False)) == 8 + 4 + 1 + 3 + 3 + len(incomplete)

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=tiny_tinydemo",
                                            timeout=5) as resp:
                    experiment = json.load(resp)["experiment"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not come up"
                time.sleep(0.5)
        query = {"experiment_ids": [experiment["experiment_id"]], "max_results": 100,
                 "filter": "tags.`ablate.kind` = 'run' and tags.`ablate.cell` = 'visual_only_stats'"}
        req = urllib.request.Request(f"{base}/runs/search", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            runs = json.load(resp)["runs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(runs) == 2
    run1 = next(r for r in runs if {"key": "ablate.run", "value": "1"} in r["data"]["tags"])
    doc = load_json(tmp_path / "results/tiny_tinydemo/checkpoints/runs/visual_only_stats/run_1.json")
    assert {"key": "test_acc", "value": doc["metrics"]["test_acc"]} == \
        {k: v for k, v in next(m for m in run1["data"]["metrics"] if m["key"] == "test_acc").items()
         if k in ("key", "value")}


def test_a_run_killed_after_its_merge_logs_the_merge_when_run_again(tmp_path):
    """The merge reached MLflow half (killed before its run ended): the rerun finds the results up to date,
    writes nothing, and still brings MLflow's merge run up to date, once."""
    write_project(tmp_path)
    args = ["run", "-c", "exp.toml", "--layer-configs", "all_layers", "--mlflow", "sqlite:///mlflow.db"]
    killed = ablate(*args, cwd=tmp_path, env={"ABLATE_CRASH_AT": "tracking:merge-logged"})
    assert killed.returncode == -9, killed.stderr
    results = tmp_path / "results/tiny_tinydemo/results.json"
    before = results.read_bytes()
    again = ablate_in_process(*args, cwd=tmp_path)
    assert again.returncode == 0 and "Results are up to date" in again.stderr, again.stderr
    assert results.read_bytes() == before
    merges = _runs(tmp_path / "mlflow.db", "merge")
    assert [r.info.status for r in merges] == ["FINISHED"]
    assert merges[0].data.tags["ablate.checksum"] == hashlib.sha256(before).hexdigest()
    assert ablate_in_process(*args, cwd=tmp_path).returncode == 0
    assert len(_runs(tmp_path / "mlflow.db", "merge")) == 1  # logged once


def test_an_imported_experiment_is_backfilled_by_sync(tmp_path):
    src = write_original_folder(tmp_path / "results_10k" / "visual_ablation_10k")
    assert ablate("import", str(src), "-o", "imported", cwd=tmp_path).returncode == 0
    no_uri = ablate("track", "sync", "-o", "imported", cwd=tmp_path)
    assert no_uri.returncode == 2 and "was run without tracking" in no_uri.stderr and "--mlflow" in no_uri.stderr
    sync = ablate("track", "sync", "-o", "imported", "--mlflow", "sqlite:///mlflow.db", cwd=tmp_path)
    assert sync.returncode == 0, sync.stderr
    assert "54 run(s), 18 cell(s), 1 merge(s) logged" in sync.stdout  # 2 x 9 cells x 3 runs of the original
    db = tmp_path / "mlflow.db"
    parents = _runs(db, "cell")
    assert {r.data.tags["ablate.provenance"] for r in parents} == {"imported"}
    cell = load_json(tmp_path / "imported/visual_ablation_10k/checkpoints/all_layers_spectral.json")
    parent = next(r for r in parents if r.data.tags["ablate.cell"] == "all_layers_spectral")
    assert parent.data.metrics["test_acc_mean"] == cell["test_acc_mean"]
    run1 = next(r for r in _runs(db, "run") if r.data.tags["ablate.cell"] == "all_layers_spectral"
                and r.data.tags["ablate.run"] == "1")
    assert run1.data.metrics["test_acc"] == cell["per_run_results"][0]["test_acc"]
    again = ablate("track", "sync", "-o", "imported", "--mlflow", "sqlite:///mlflow.db", cwd=tmp_path)
    assert "0 run(s), 0 cell(s), 0 merge(s) logged" in again.stdout


def test_tracking_without_mlflow_says_how_to_install_it(tmp_path):
    shim = tmp_path / "shim" / "mlflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    write_project(tmp_path)
    res = ablate("run", "-c", "exp.toml", "--mlflow", "sqlite:///mlflow.db", cwd=tmp_path,
                 env={"PYTHONPATH": f"{tmp_path / 'shim'}:{Path(__file__).resolve().parent.parent}"})
    assert res.returncode == 2, res.stderr
    assert "experiment tracking needs mlflow" in res.stderr and "pip install 'ablate[mlflow]'" in res.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def _schema(db: Path) -> tuple[list, list]:
    """Every table, index and trigger with its definition, and the alembic revision. A definition is
    compared line by line, in any order: alembic's table rebuilds list a table's constraints in an order
    that varies from one process to the next (MLflow's own stores differ from each other that way)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        return (sorted((kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                       for kind, name, sql in rows),
                con.execute("SELECT version_num FROM alembic_version").fetchall())


def test_a_new_store_is_a_copy_of_the_schema_template_mlflow_would_have_made(tmp_path, monkeypatch):
    """MLflow's schema migrations run once per machine and MLflow version (the template in the user's
    cache); each new store is a copy with exactly MLflow's own schema, and gets its own Default experiment."""
    from ablation_cli.tracking import template

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    mlflow.MlflowClient("sqlite:///own.db").search_experiments()  # the store MLflow makes itself
    template.create_sqlite_atomically("sqlite:///first.db")
    templates = list((tmp_path / "cache/ablate").glob("mlflow-*.empty.db"))
    assert len(templates) == 1 and _schema(templates[0]) == _schema(tmp_path / "own.db")
    made = templates[0].stat().st_mtime_ns
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    template.create_sqlite_atomically(f"sqlite:///{tmp_path / 'second.db'}")
    assert templates[0].stat().st_mtime_ns == made  # made once
    assert (tmp_path / "second.db").read_bytes() == templates[0].read_bytes()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'second.db'}")
    default = client.get_experiment("0")  # added by MLflow on first open, with this store's artifact root
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "elsewhere/mlruns/0")
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "acc", 0.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "acc")] == [(3, 0.5)]
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "cache/ablate").glob(".*.tmp"))


def test_an_unwritable_user_cache_still_gives_a_store(tmp_path, monkeypatch):
    from ablation_cli.tracking import template

    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert template.schema_template() is None
    template.create_sqlite_atomically(f"sqlite:///{tmp_path / 'store.db'}")
    assert _schema(tmp_path / "store.db")[1] == _schema(_own_store(tmp_path))[1]


def _own_store(tmp_path: Path) -> Path:
    db = tmp_path / "own.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def test_processes_racing_to_log_one_experiment_log_each_run_once(tmp_path):
    """`track sync` and the loggers of Slurm tasks (which take no experiment lock) can all see run k missing
    at once: logging of one experiment is exclusive across processes, so MLflow holds each run once
    (issue 26, item 3). Two task loggers and a sync race on a finished experiment."""
    write_project(tmp_path)
    done = ablate("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task = ("import sys; from pathlib import Path; from ablation_cli.tracking import background\n"
            "from ablation_cli.store import ExperimentStore\n"
            "store = ExperimentStore(Path(sys.argv[2]))\n"
            "for cell in ('all_layers_simple_stats', 'all_layers_stats'):\n"
            "    background.notify_cell(sys.argv[1], store, cell)\n"
            "assert background.flush() and all(background._trackers.values()), background._trackers\n")
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    racers = [warm.popen([uri, str(tmp_path / "results/tiny_tinydemo")], tmp_path, code=task, **pipes)
              for _ in range(2)]
    racers.append(warm.popen(["track", "sync", "--mlflow", uri], tmp_path, **pipes))
    outs = [r.communicate(timeout=300) for r in racers]
    assert [r.returncode for r in racers] == [0, 0, 0], [err for _, err in outs]
    assert not any("tracking: MLflow at" in err for _, err in outs), outs  # no logger gave up
    db = tmp_path / "mlflow.db"
    children = _runs(db, "run", current=False)
    assert sorted((r.data.tags["ablate.cell"], r.data.tags["ablate.run"]) for r in children) == \
        [("all_layers_simple_stats", "1"), ("all_layers_simple_stats", "2"), ("all_layers_stats", "1"),
         ("all_layers_stats", "2")]  # each training run exactly once, none superseded
    assert len(_runs(db, "cell", current=False)) == 2 and len(_runs(db, "merge", current=False)) == 1
