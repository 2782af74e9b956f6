"""One cell in this process: train its missing runs, checkpoint each the moment it stops, then the cell."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ablation_cli import runtime, tracking
from ablation_cli.config import ExperimentConfig
from ablation_cli.durable import now_iso
from ablation_cli.errors import ConfigError
from ablation_cli.grid import Cell
from ablation_cli.original import with_original_keys
from ablation_cli.progress import Reporter
from ablation_cli.store import ExperimentStore
from ablation_cli.training.classifiers import resolve_classifier
from ablation_cli.training.metrics import aggregate
from ablation_cli.training.predictions import RunPredictions
from ablation_cli.training.results import CheckpointMeta, RunCheckpoint, RunResult
from ablation_cli.training.split import Split, make_split
from ablation_cli.training.state import SavedState, TrainingState
from ablation_cli.workspace import Workspace

if TYPE_CHECKING:  # torch loads where cells train
    import torch

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 5.0


def _trainer() -> ModuleType:
    """training.trainer, imported on first use: torch loads where cells train, not where Slurm jobs
    are submitted."""
    from ablation_cli.training import trainer

    return trainer


def run_seed(cfg: ExperimentConfig, k: int) -> int:
    """Run k (1-based) is seeded by base seed + run index."""
    return cfg.seed + k - 1


def run_split(cfg: ExperimentConfig, workspace: Workspace, k: int) -> Split:
    """Run k's split: the experiment's one, or with ``split.resample`` its own, seeded by its seed."""
    if not cfg.split.resample:
        return workspace.split
    s, index = cfg.split, workspace.index
    return make_split(index.labels, s.train, s.val, s.test, run_seed(cfg, k), s.stratify, index.label_names)


# trainer.train_runs's signature: (data, params, seeds, on_epoch=..., on_done=...) -> results
TrainRuns = Callable[..., Any]


def run_cell(cell: Cell, cfg: ExperimentConfig, store: ExperimentStore, workspace: Workspace,
             reporter: Reporter, train_runs: TrainRuns | None = None) -> dict[str, Any]:
    """Train the runs of ``cell`` that no valid checkpoint holds; write the cell checkpoint."""
    cfg = cell.config(cfg)  # its [axes] values in place
    num_runs = cfg.num_runs
    # read back as finished() wrote them (the store checks their seal, not their keys)
    runs = cast(dict[int, RunCheckpoint], store.valid_runs(cell.id, cell.fingerprint.record, num_runs))
    todo = [k for k in range(1, num_runs + 1) if k not in runs]
    reporter.cell_start(cell.id, todo, num_runs)
    if todo:
        log.info("Evaluating %s: %d layers, runs %s of %d to train", cell.id, len(cell.layers),
                 _ranges(todo), num_runs)
        runs.update(_train_runs(cell, cfg, store, workspace, reporter, todo, train_runs))
    doc = build_cell_doc(cell, cfg, [runs[k] for k in range(1, num_runs + 1)])
    store.write_cell(cell.id, with_original_keys(doc))  # the researcher's scripts read the original's keys
    tracking.notify_cell(cfg.tracking.mlflow, store, cell.id)
    store.clear_heartbeat(cell.id)
    store.clear_failure(cell.id)
    reporter.cell_end(cell.id)
    log.info("Checkpoint saved: %s  test_acc=%.4f±%.4f  f1_macro=%.4f", cell.id, doc["test_acc_mean"],
             doc["test_acc_std"], doc["test_f1_macro_mean"])
    return doc


def _train_runs(cell: Cell, cfg: ExperimentConfig, store: ExperimentStore, workspace: Workspace,
                reporter: Reporter, todo: list[int], train_runs: TrainRuns | None) -> dict[int, RunCheckpoint]:
    """Train the runs ``todo``, several at a time as one batched model where that pays (CUDA); each
    run's checkpoint is written the moment that run stops. A CUDA out-of-memory error halves the
    number of runs trained together and retries what is not finished; with one run it fails the
    cell with the settings that did not fit."""
    trainer = _trainer()
    device = trainer.resolve_device(workspace.device)
    if cfg.training.amp != "off" and device.type != "cuda":
        raise ConfigError(f"training.amp = {cfg.training.amp} needs CUDA; this cell runs on {device}")
    index = workspace.index
    x = workspace.feature_view(cell.representation, cell.layers)  # no copy: batches are gathered from it
    classifier = resolve_classifier(cfg, cell.classifier)
    classifier.check()
    if not classifier.torch:  # fitted in memory on the CPU: a plain standardised copy of each split
        device = trainer.torch.device("cpu")
    resample = cfg.split.resample
    splits: dict[int, Split] = {}

    def split_of(k: int) -> Split:
        if k not in splits:
            splits[k] = run_split(cfg, workspace, k)
        return splits[k]

    data = trainer.prepare(x, index.labels, split_of(todo[0]), index.num_classes, device)
    together = cfg.training.runs_in_parallel or (len(todo) if device.type == "cuda" else 1)
    if not classifier.torch:
        together = len(todo)  # one call: a fit without randomness is made once for all runs
    if resample:
        together = 1  # each run its own split, so its own standardisation and data
    done: dict[int, RunCheckpoint] = {}
    left = list(todo)
    while left:
        chunk = left[:together]
        if resample and chunk[0] != todo[0]:
            del data  # the previous run's split: not two datasets on the GPU at once
            trainer.free_cuda_cache()
            data = trainer.prepare(x, index.labels, split_of(chunk[0]), index.num_classes, device)
        beats = {pos: _heartbeat(store, cell.id, k, cfg.num_runs, cfg.training.max_epochs, reporter)
                 for pos, k in enumerate(chunk)}
        for beat in beats.values():
            beat(0, float("nan"))

        def finished(pos: int, result: RunResult, chunk: list[int] = chunk) -> None:
            k = chunk[pos]
            split = split_of(k)
            test_rows = split.test
            # read, not popped: an estimator fitted once hands the same result to every run
            predictions = RunPredictions(test_rows, index.labels[test_rows], np.asarray(result["test_pred"]))
            doc = cast(RunCheckpoint, {  # the result's keys but test_pred, whatever they are
                "cell": cell.id, "run": k, "seed": run_seed(cfg, k),
                **{key: value for key, value in result.items() if key != "test_pred"},
                "predictions": predictions.to_json(),
                "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                "label_names": list(index.label_names),
                "meta": _meta(cell, result["train_time_s"], result["device"]),
            })
            store.write_run(cell.id, k, dict(doc))  # the moment the run stops: a kill loses no finished run
            store.run_state_path(cell.id, k).unlink(missing_ok=True)  # its training state: no longer needed
            tracking.notify_cell(cfg.tracking.mlflow, store, cell.id)  # MLflow: a view, never in the way
            done[k] = doc
            m = result["metrics"]
            log.info("  Run %d/%d: Train=%.4f Val=%.4f Test=%.4f Time=%.1fs (best epoch %d of %d)", k,
                     cfg.num_runs, m["train_acc"], m["val_acc"], m["test_acc"], result["train_time_s"],
                     result["best_epoch"], result["epochs_run"])
            reporter.run_end(cell.id, k, cfg.num_runs)
            runtime.raise_if_stopped()

        def epoch_done(pos: int, epoch: int, acc: float,
                       beats: dict[int, Callable[[int, float], None]] = beats) -> None:
            beats[pos](epoch, acc)
            runtime.raise_if_stopped()

        try:
            seeds = [run_seed(cfg, k) for k in chunk]
            # the MLP protocol: a run cut off goes on from its saved training state
            states = _States(store, cell, chunk, seeds, device) if classifier.torch else None
            classifier.train_runs(data, seeds, on_epoch=epoch_done, on_done=finished, states=states,
                                  torch_runs=train_runs)
        except trainer.OutOfMemoryError as exc:
            trainer.free_cuda_cache()
            if together == 1:
                raise RuntimeError(
                    f"CUDA out of memory on {device} training one run of {cell.id} (feature_dim {data.feature_dim}, "
                    f"hidden_dim {cfg.classifier.hidden_dim}, batch_size {cfg.training.batch_size}, amp "
                    f"{cfg.training.amp}); lower "
                    "--batch-size or --hidden-dim, set training.amp, or free the GPU") from exc
            together = max(1, together // 2)
            log.warning("CUDA out of memory with %d runs together; retrying with %d", len(chunk), together)
        left = [k for k in left if k not in done]
    return done


class _States:
    """The training state of a chunk's runs, beside their checkpoints (``runs/<cell>/.state_<k>.pt``): kept
    only for the cell's fingerprint and the run's seed, removed once the run's checkpoint is written."""

    def __init__(self, store: ExperimentStore, cell: Cell, chunk: list[int], seeds: list[int],
                 device: torch.device) -> None:
        self.store, self.cell, self.chunk, self.seeds, self.device = store, cell, chunk, seeds, device

    def load(self, pos: int) -> TrainingState | None:
        path = self.store.run_state_path(self.cell.id, self.chunk[pos])
        doc: SavedState | None = _trainer().load_state(path, self.device)
        if doc is None:
            return None
        if doc.get("fingerprint") != self.cell.fingerprint.digest or doc.get("seed") != self.seeds[pos]:
            path.unlink(missing_ok=True)  # made under other settings: the run starts over
            return None
        state = doc["state"]
        log.info("  Run %d goes on from its training state after epoch %d", self.chunk[pos], state["epoch"])
        return state

    def save(self, pos: int, state: TrainingState) -> None:
        path = self.store.run_state_path(self.cell.id, self.chunk[pos])
        doc: SavedState = {"fingerprint": self.cell.fingerprint.digest, "seed": self.seeds[pos], "state": state}
        _trainer().save_state(path, doc)


def _hyperparameters(cfg: ExperimentConfig, cell: Cell) -> dict[str, object]:
    common = {"split": cfg.split.model_dump(), "seed": cfg.seed}
    return {**resolve_classifier(cfg, cell.classifier).hyperparameters(), **common}


def _heartbeat(store: ExperimentStore, cell_id: str, k: int, num_runs: int, max_epochs: int,
               reporter: Reporter) -> Callable[[int, float], None]:
    last = [0.0]

    def beat(epoch: int, val_acc: float) -> None:
        reporter.epoch(cell_id, k, num_runs, epoch, max_epochs, val_acc)
        now = time.monotonic()
        if epoch == 0 or now - last[0] >= HEARTBEAT_EVERY_S:
            last[0] = now
            store.heartbeat(cell_id, {"cell": cell_id, "run": k, "num_runs": num_runs, "epoch": epoch})

    return beat


def _meta(cell: Cell, duration_s: float, device: str) -> CheckpointMeta:
    fp = cell.fingerprint  # its record's keys, in its order
    return {"fingerprint": fp.digest, "config": dict(fp.config), "dataset": dict(fp.dataset), "code": dict(fp.code),
            "created_at": now_iso(), "host": socket.gethostname(), "pid": os.getpid(), "duration_s": duration_s,
            "device": device, "versions": _trainer().library_versions()}


def build_cell_doc(cell: Cell, cfg: ExperimentConfig, runs: list[RunCheckpoint]) -> dict[str, Any]:
    """The researcher's per-cell result (docs/outputs.md) from its run checkpoints, in run order."""
    doc: dict[str, Any] = {
        "cell": cell.id,
        "representation": cell.representation,
        "layer_config": cell.layer_config,
        "num_layers": len(cell.layers),
        "feature_dim": runs[0]["feature_dim"],
        "num_runs": len(runs),
        "num_classes": len(runs[0]["label_names"]),
        "label_mapping": {name: i for i, name in enumerate(runs[0]["label_names"])},
        "hyperparameters": _hyperparameters(cfg, cell),
    }
    if cell.classifier is not None:
        doc["classifier"] = cell.classifier
    if cell.settings:
        doc["axes"] = dict(cell.settings)
    # fitted once (no random_state) is one measurement, unless each run had its own split
    if (runs[0].get("deterministic") and not cfg.split.resample) or _identical(runs):
        doc["deterministic"] = True  # fitted once, or its seeds changed nothing: its runs are one measurement
    for key in runs[0]["metrics"]:
        agg = aggregate([r["metrics"][key] for r in runs])
        doc[f"{key}_mean"], doc[f"{key}_std"], doc[f"{key}_ci95"] = agg["mean"], agg["std"], agg["ci95"]
    doc["per_run_results"] = [
        {"run": r["run"], "seed": r["seed"], **r["metrics"], "best_epoch": r["best_epoch"],
         "epochs_run": r["epochs_run"], "train_time_s": r["train_time_s"], "device": r["device"],
         **({"torch_threads": int(t)} if (t := _threads(r)) else {})}
        for r in runs
    ]
    doc["learning_curves"] = [r["learning_curve"] for r in runs]
    doc["confusion_matrices"] = [r["confusion_matrices"] for r in runs]
    doc["per_class"] = [r["per_class"] for r in runs]
    if all(r.get("predictions") for r in runs):
        doc["predictions"] = [r["predictions"] for r in runs]  # merge's statistics; not in results.json
        doc["split_sizes"] = runs[0]["split_sizes"]
    duration = sum(float(r["train_time_s"]) for r in runs)  # each run's share: the cell's training wall time
    doc["duration_s"] = duration
    doc["meta"] = _meta(cell, duration, runs[-1]["device"])
    return doc


def _threads(run: RunCheckpoint) -> str | None:
    """The torch thread count a run was trained with, as its meta records it."""
    return ((run.get("meta") or {}).get("versions") or {}).get("torch_threads")


def _identical(runs: list[RunCheckpoint]) -> bool:
    """Several runs whose seeds changed nothing: the same test predictions and the same metrics (an
    estimator that takes random_state and ignores it, such as LogisticRegression with lbfgs)."""
    if len(runs) < 2 or not all(r.get("predictions") for r in runs):
        return False
    first = runs[0]
    return all(r["predictions"] == first["predictions"] and r["metrics"] == first["metrics"] for r in runs[1:])


def _ranges(ks: list[int]) -> str:
    return f"{ks[0]}-{ks[-1]}" if len(ks) > 1 and ks == list(range(ks[0], ks[-1] + 1)) else ",".join(map(str, ks))
