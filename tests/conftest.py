"""Shared fixtures: a tiny experiment (small demo, short training) runnable in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as `ablate` itself sets (cli.REPRODUCIBLE_ENV), before torch
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
# One torch thread per test process and per `ablate` it starts: `make test` runs two test processes on
# two cores, and tiny models on threads that wait for each other ran up to 10x slower than on one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import json
import signal
import subprocess
import sys
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ablation_cli.config import ExperimentConfig, LayerConfig
from ablation_cli.data.demo import DemoSource
from ablation_cli.grid import expand
from ablation_cli.orchestrator import experiment_record
from ablation_cli.store import ExperimentStore
from tests import warm

REPO = Path(__file__).resolve().parent.parent
TINY_DEMO = {"num_samples": 120, "num_classes": 3, "seed": 7}
TIMING_KEYS = {"checksum", "created_at", "updated_at", "duration_s", "train_time_s", "pid", "host", "provenance",
               "folder", "training_time", "training_time_mean", "training_time_std", "training_time_total"}


def tiny_config(**overrides: Any) -> ExperimentConfig:
    data: dict[str, Any] = {
        "name": "tiny",
        "dataset": "tinydemo",
        "num_runs": 2,
        "device": "cpu",
        "representations": ["simple_stats", "stats"],
        "layer_configs": {"all_layers": LayerConfig(include=["*"]), "visual_only": LayerConfig(include=["*.attn1.*"])},
        "classifier": {"hidden_dim": 16, "num_hidden_layers": 2, "dropout": 0.2},
        "training": {"max_epochs": 8, "patience": 4, "batch_size": 32, "plateau_patience": 2},
    }
    data.update(overrides)
    return ExperimentConfig.model_validate(data)


def write_project(folder: Path, **toml_overrides: str) -> Path:
    """exp.toml + datasets.toml for CLI tests; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "top": 'name = "tiny"\ndataset = "tinydemo"\nnum_runs = 2\ndevice = "cpu"\n'
        'representations = ["simple_stats", "stats"]\n',
        "classifier": "[classifier]\nhidden_dim = 16\nnum_hidden_layers = 2\ndropout = 0.2\n",
        "training": "[training]\nmax_epochs = 8\npatience = 4\nbatch_size = 32\nplateau_patience = 2\n",
    }
    body.update(toml_overrides)
    layer = '[layer_configs.all_layers]\ninclude = ["*"]\n[layer_configs.visual_only]\ninclude = ["*.attn1.*"]\n'
    (folder / "exp.toml").write_text(body["top"] + layer + body["classifier"] + body["training"])
    lines = ["[tinydemo]", 'kind = "demo"', *(f"{k} = {v}" for k, v in TINY_DEMO.items())]
    (folder / "datasets.toml").write_text("\n".join(lines) + "\n")
    return folder / "exp.toml"


def all_layers_project(folder: Path, reps: list[str]) -> Path:
    """A one-run, two-epoch project on the tiny demo with the all_layers layer config only; returns the folder."""
    write_project(folder, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                  f"representations = {json.dumps(reps)}\n",
                  training="[training]\nmax_epochs = 2\npatience = 1\nbatch_size = 16\nplateau_patience = 1\n")
    text = (folder / "exp.toml").read_text().replace('[layer_configs.visual_only]\ninclude = ["*.attn1.*"]\n', "")
    (folder / "exp.toml").write_text(text)
    return folder


@contextlib.contextmanager
def cell_claimed(root: Path, cell: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``cell``'s claim, with its heartbeat, as a Slurm task does while it trains;
    released when the block ends."""
    code = ("import sys; from pathlib import Path; from ablation_cli.store import ExperimentStore\n"
            "s, cell = ExperimentStore(Path(sys.argv[1])), sys.argv[2]\n"
            "with s.claim(cell) as mine:\n"
            "    s.heartbeat(cell, {'cell': cell, 'run': 2, 'num_runs': 2})\n"
            "    print('held' if mine else 'not held', flush=True); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root), cell], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.communicate("\n")


def ablate(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in its own process (no terminal: plain output), forked from a warm one (tests/warm.py)."""
    return warm.run(list(args), cwd, {"PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout, input=input)


def ablate_popen(*args: str, cwd: Path, env: dict[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                 text: bool = False) -> warm.WarmProcess | subprocess.Popen[Any]:
    """Start the real CLI in its own process, as ``subprocess.Popen`` would (forked from a warm one)."""
    return warm.popen(list(args), cwd, env, stdout=stdout, stderr=stderr, text=text)


def ablate_in_process(*args: str, cwd: Path, env: dict[str, str] | None = None,
                      input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process (Typer's CliRunner) as ``ablate`` would run in a subprocess: the same exit
    code, stdout and stderr (an unexpected exception's traceback included), at none of a process's start-up.
    Whatever the command changes in this process is put back."""
    from typer.main import get_command

    from ablation_cli.cli import app, flush_tracking

    sets_threads = any(a.partition("=")[0] == "--threads" for a in args)
    with _process_state_kept(cwd, sets_threads), CliRunner().isolation(input=input, env=env) as (out, err, _):
        try:
            get_command(app).main(args=list(args), prog_name="ablate")
            code = 0
        except SystemExit as exc:  # click's standalone mode always ends so
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except Exception:  # a bug: its traceback and exit 1, as the interpreter does
            traceback.print_exc()
            code = 1
        finally:
            flush_tracking()
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["ablate", *args], code, stdout, stderr)


@contextlib.contextmanager
def _process_state_kept(cwd: Path, threads_flag: bool = False) -> Iterator[None]:
    """``cwd`` as the working folder; afterwards the folder, environment, log handlers, signal handlers,
    progress bar and torch's thread count (which ``--threads`` sets) as they were."""
    from ablation_cli import logs, progress, runtime

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    loggers = [logs.log, logs.file_log]
    saved_logs = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    signums = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP]
    saved_signals = {s: signal.getsignal(s) for s in signums}
    saved_bar, saved_stop = progress._bar, runtime._stop
    if threads_flag:
        import torch  # here, so that its thread count before the command is known

        threads = torch.get_num_threads()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for lg, handlers, level, propagate in saved_logs:
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()  # run.log's file, a stream of the runner's
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
        for signum, handler in saved_signals.items():
            if handler is not None:  # None: a handler not set from Python, which no command sets
                signal.signal(signum, handler)
        progress.use_bar(saved_bar)
        runtime._stop = saved_stop
        if threads_flag:
            torch.set_num_threads(threads)


def strip_timing(obj: Any) -> Any:
    """Drop timing, timestamp and host fields so two runs' results compare exactly."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


# -- builders shared by several test modules ------------------------------------------------------

def _meta(cell, fingerprint=None):
    fp = {"fingerprint": fingerprint or cell.fingerprint.digest, **cell.fingerprint.parts}
    return {**fp, "created_at": "2026-01-01T00:00:00+00:00"}


def make_experiment(root: Path) -> ExperimentStore:
    """A 6-cell experiment with one cell in each state (no training involved)."""
    cfg = tiny_config(representations=["simple_stats", "stats", "spectral"])
    info = DemoSource(name="tinydemo", **TINY_DEMO).describe()
    cells = {c.id: c for c in expand(cfg, info)}
    store = ExperimentStore(root)
    store.write_experiment(experiment_record(cfg, info, list(cells.values()), None))

    def run(cid, k):
        store.write_run(cid, k, {"cell": cid, "run": k, "seed": 41 + k, "metrics": {"test_acc": 0.5},
                                 "train_time_s": 10.0, "meta": _meta(cells[cid])})

    done = cells["all_layers_simple_stats"]
    for k in (1, 2):
        run(done.id, k)
    store.write_cell(done.id, {"representation": "simple_stats", "layer_config": "all_layers", "num_runs": 2,
                               "per_run_results": [], "test_acc_mean": 0.625, "test_acc_std": 0.125,
                               "test_f1_macro_mean": 0.6, "test_f1_macro_std": 0.1, "num_layers": 128,
                               "feature_dim": 640,
                               "duration_s": 20.0, "meta": _meta(done)})
    run("all_layers_stats", 1)
    store.heartbeat("all_layers_stats", {"cell": "all_layers_stats", "run": 2, "num_runs": 2, "epoch": 5})
    run("all_layers_spectral", 1)
    store.write_failure("visual_only_simple_stats", {"type": "RuntimeError", "message": "boom", "traceback": ""})
    stale = cells["visual_only_stats"]
    meta = _meta(stale, fingerprint="0000")
    meta["config"] = {**meta["config"], "dropout": 0.3}
    store.write_cell(stale.id, {"representation": "stats", "layer_config": "visual_only", "num_runs": 2,
                                "per_run_results": [], "meta": meta})
    return store


N_TEST = 100  # test rows of the cells built by cell(): run k gets round(acc_k * 100) of them right


def stored_predictions(accs: list[float], n_test: int = N_TEST, rotate: int = 0) -> list[dict[str, str]]:
    """Stored predictions of runs with these test accuracies: true labels i % 3; the first round(acc * n)
    rows after ``rotate`` are right, the others predicted as the next class."""
    from ablation_cli.training.predictions import RunPredictions

    true = np.arange(n_test) % 3
    out = []
    for acc in accs:
        right = np.roll(np.arange(n_test) < round(acc * n_test), rotate)
        out.append(RunPredictions(np.arange(n_test) * 2, true, np.where(right, true, (true + 1) % 3)).to_json())
    return out


def cell(rep: str, lc: str, accs: list[float], f1_shift: float = 0.01) -> dict[str, Any]:
    """A cell checkpoint (as merge reads it): its runs' accuracies, validation 0.01 above test, and
    predictions that give exactly these accuracies."""
    arr = np.array(accs)
    cm = [[8, 2, 0], [1, 7, 2], [0, 3, 7]] if lc == "all_layers" else [[5, 3, 2], [3, 4, 3], [2, 4, 4]]
    return {
        "cell": f"{lc}_{rep}", "representation": rep, "layer_config": lc,
        "num_layers": 128 if lc == "all_layers" else 64, "feature_dim": 5 * (128 if lc == "all_layers" else 64),
        "num_runs": len(accs), "num_classes": 3,
        "test_acc_mean": float(arr.mean()), "test_acc_std": float(arr.std()), "test_acc_ci95": 0.05,
        "test_f1_macro_mean": float(arr.mean() - f1_shift), "test_f1_macro_std": float(arr.std()),
        "test_f1_macro_ci95": 0.06,
        "per_run_results": [{"run": k + 1, "test_acc": a} for k, a in enumerate(accs)],
        "learning_curves": [{"train_loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.9, 0.95], "val_acc": [0.3, 0.5, 0.45],
                             "lr": [1e-3] * 3} for _ in accs],
        "confusion_matrices": [{"val": cm, "test": cm} for _ in accs],
        "val_acc_mean": float(arr.mean() + 0.01),
        "predictions": stored_predictions(accs), "split_sizes": {"train": 350, "val": 50, "test": N_TEST},
    }


def make_results(dataset: str = "10k", num_samples: int = 9170, scale: float = 1.0) -> dict[str, Any]:
    data = {
        "all_layers": {"simple_stats": [0.48, 0.50, 0.49], "spectral": [0.47, 0.48, 0.49],
                       "ensemble": [0.62, 0.61, 0.63]},
        "visual_only": {"simple_stats": [0.33, 0.34, 0.33], "spectral": [0.33, 0.32, 0.34],
                        "ensemble": [0.36, 0.37, 0.36]},
    }
    results: dict[str, Any] = {
        "dataset": dataset, "experiment": "visual_ablation", "num_runs": 3, "num_classes": 3,
        "label_mapping": {"bird": 1, "airplane": 0, "cat": 2},
        "config": {"representations": ["simple_stats", "spectral", "ensemble"],
                   "layer_configs": {"all_layers": {}, "visual_only": {}}},
        "dataset_info": {"name": dataset, "num_samples": num_samples},
        "missing": [],
    }
    for lc, reps in data.items():
        results[f"{lc}_results"] = [cell(rep, lc, [a * scale for a in accs]) for rep, accs in reps.items()]
    return results


ORIGINAL_REPS = ("simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution", "frequency",
                 "info_theoretic", "ensemble")


def original_cell(rep: str, lc: str, num_runs: int = 3, num_classes: int = 3) -> dict[str, Any]:
    """A cell checkpoint as the original script wrote it (its keys, its meanings; population std)."""
    rng = np.random.default_rng(zlib.crc32(f"{rep}/{lc}".encode()))
    num_layers = 128 if lc == "all_layers" else 64
    feature_dim = 5 * num_layers
    base = 0.5 if lc == "all_layers" else 0.33
    runs = []
    for k in range(num_runs):
        acc = {s: float(base + rng.uniform(-0.03, 0.03)) for s in ("train", "val", "test")}
        runs.append({"run": k, "train_acc": acc["train"] + 0.4, "val_acc": acc["val"], "test_acc": acc["test"],
                     "val_f1": acc["val"] - 0.01, "test_f1": acc["test"] - 0.01, "val_precision": acc["val"] + 0.01,
                     "test_precision": acc["test"] + 0.01, "val_recall": acc["val"], "test_recall": acc["test"],
                     "training_time": float(30 + 10 * k), "best_epoch": int(10 + k), "feature_dim": feature_dim})
    cell: dict[str, Any] = {"representation": f"{rep}_{lc}", "num_layers": num_layers, "feature_dim": feature_dim}
    for key in ("train_acc", "val_acc", "test_acc", "val_f1", "test_f1", "val_precision", "test_precision",
                "val_recall", "test_recall", "training_time", "best_epoch"):
        values = np.array([r[key] for r in runs], dtype=np.float64)
        cell[f"{key}_mean"], cell[f"{key}_std"] = float(values.mean()), float(values.std())
    cell["training_time_total"] = float(sum(r["training_time"] for r in runs))
    cell["per_run_results"] = runs
    cell["learning_curves"] = [{"val_acc_history": [0.2, 0.3, r["val_acc"]], "train_loss_history": [2.0, 1.5, 1.2],
                                "best_epoch": r["best_epoch"]} for r in runs]
    cm = [[5 if i == j else 1 for j in range(num_classes)] for i in range(num_classes)]
    cell["val_confusion_matrices"] = [cm for _ in runs]
    cell["test_confusion_matrices"] = [cm for _ in runs]
    for split in ("train", "val", "test"):
        cell[f"{split}_acc_all_runs"] = [r[f"{split}_acc"] for r in runs]
    return cell


def write_original_folder(root: Path, dataset: str = "10k", truncate: str | None = None,
                          missing: str | None = None, with_results: bool = True) -> Path:
    """An output folder of the original script: checkpoints/<lc>_<rep>.json (2 x 9) and results.json."""
    (root / "checkpoints").mkdir(parents=True)
    cells = {}
    for lc in ("all_layers", "visual_only"):
        for rep in ORIGINAL_REPS:
            cid = f"{lc}_{rep}"
            if cid == missing:
                continue
            cells[cid] = original_cell(rep, lc)
            text = json.dumps(cells[cid], indent=2)
            (root / "checkpoints" / f"{cid}.json").write_text(text[: len(text) // 2] if cid == truncate else text)
    if with_results:
        results = {"dataset": dataset, "num_runs": 3, "num_classes": 3, "num_all_layers": 128,
                   "num_visual_layers": 64, "num_text_layers": 64, "label_mapping": {"a": 0, "b": 1, "c": 2},
                   "all_layers_results": [c for k, c in cells.items() if k.startswith("all_layers")],
                   "visual_only_results": [c for k, c in cells.items() if k.startswith("visual_only")]}
        (root / "results.json").write_text(json.dumps(results, indent=2))
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_project(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")


# The modules whose tests take longest (waiting on Slurm, or many `ablate` processes), longest first.
# `make test` hands tests to its workers in collection order, so these start first and the run does not
# end waiting on one of them started last; each module's tests stay together (module fixtures are made once).
# Seconds each module took in `make test` here (tests/warm.py's children included; rounded). `make test`
# hands out whole modules (--dist loadfile, so module fixtures are built once) in this order, longest
# first: each worker takes the next when it is done, and the Slurm modules, which mostly wait, start
# at once beside the ones that keep the cores busy. A module not listed takes its place at the end.
MODULE_SECONDS = {"test_scaleout": 147, "test_slurm_timelimit": 121, "test_tracking": 56, "test_concurrency": 50,
                  "test_readme": 49, "test_sweeps": 48, "test_plugins": 39, "test_faults": 37, "test_classifiers": 37,
                  "test_invariance": 36, "test_alpha_layouts": 36, "test_orchestrator": 30, "test_cli": 23,
                  "test_cache": 20, "test_kill": 15, "test_importer": 15, "test_folders": 14, "test_trainer": 13,
                  "test_kill_phases": 13, "test_warm": 12, "test_runtime": 12, "test_resume": 10}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.stem, 0))  # stable: a module's order is kept

