"""The original script's result keys, derived from ablate's, so that the researcher's plotting and
table scripts read ablate's checkpoints and results.json unchanged.

One source of truth: the aliases are derived from ablate's own fields each time a document is
written (a cell checkpoint, a results.json entry), never kept beside them in memory. Std is the
population std (numpy's default), as the original's.

    per cell   name (<rep>_<layer_config>), val_/test_ f1, precision, recall (macro) _mean/_std,
               training_time_mean/_std/_total, best_epoch_mean/_std, val_/test_confusion_matrices,
               train_/val_/test_acc_all_runs (num_layers, feature_dim, *_acc_mean/_std are ablate's own)
    per run    val_/test_ f1, precision, recall, training_time, feature_dim
    per curve  val_acc_history, train_loss_history, best_epoch
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# the original's name -> ablate's metric (macro averages)
METRIC_ALIASES = {f"{split}_{short}": f"{split}_{ours}" for split in ("val", "test")
                  for short, ours in (("f1", "f1_macro"), ("precision", "precision_macro"), ("recall", "recall_macro"))}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def with_original_keys(cell: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an ablate cell document with the original script's keys added (those it already has,
    an imported cell's own values, are kept)."""
    doc = dict(cell)
    runs = [dict(r) for r in cell.get("per_run_results") or []]
    if not runs:
        return doc
    doc.setdefault("name", f"{cell['representation']}_{cell['layer_config']}")
    for alias, ours in METRIC_ALIASES.items():
        if f"{ours}_mean" in cell:
            doc.setdefault(f"{alias}_mean", cell[f"{ours}_mean"])
        if f"{ours}_std" in cell:  # an imported cell without the original's std gets none
            doc.setdefault(f"{alias}_std", cell[f"{ours}_std"])
    for run in runs:
        for alias, ours in METRIC_ALIASES.items():
            if ours in run:
                run.setdefault(alias, run[ours])
        if "train_time_s" in run:
            run.setdefault("training_time", run["train_time_s"])
        if "feature_dim" in cell:
            run.setdefault("feature_dim", cell["feature_dim"])
    doc["per_run_results"] = runs
    if all("train_time_s" in r for r in runs) and "training_time_mean" not in doc:
        times = [float(r["train_time_s"]) for r in runs]
        doc["training_time_mean"], doc["training_time_std"] = _mean_std(times)
        doc["training_time_total"] = float(sum(times))
    if all("best_epoch" in r for r in runs) and "best_epoch_mean" not in doc:
        doc["best_epoch_mean"], doc["best_epoch_std"] = _mean_std([float(r["best_epoch"]) for r in runs])
    curves = cell.get("learning_curves")
    if curves:
        doc["learning_curves"] = [
            {"val_acc_history": curve.get("val_acc", []), "train_loss_history": curve.get("train_loss", []),
             "best_epoch": run.get("best_epoch"), **curve}
            for curve, run in zip(curves, runs)]
    matrices = cell.get("confusion_matrices")
    if matrices:
        doc.setdefault("val_confusion_matrices", [m["val"] for m in matrices])
        doc.setdefault("test_confusion_matrices", [m["test"] for m in matrices])
    for split in ("train", "val", "test"):
        if all(f"{split}_acc" in r for r in runs):
            doc.setdefault(f"{split}_acc_all_runs", [r[f"{split}_acc"] for r in runs])
    return doc


def from_original_cell(orig: Mapping[str, Any], layer_config: str, representation: str) -> dict[str, Any]:
    """An ablate cell document (without meta) from a cell checkpoint of the original script: ablate's
    keys derived from the original's, every original key kept as it was."""
    runs = []
    for r in orig["per_run_results"]:
        run = dict(r)
        for alias, ours in METRIC_ALIASES.items():
            if alias in run:
                run.setdefault(ours, run[alias])
        if "training_time" in run:
            run.setdefault("train_time_s", run["training_time"])
        runs.append(run)
    doc: dict[str, Any] = {
        **orig, "cell": f"{layer_config}_{representation}", "name": orig.get("representation"),
        "representation": representation, "layer_config": layer_config, "num_runs": len(runs),
        "per_run_results": runs,
    }
    if doc["name"] is None:
        doc["name"] = f"{representation}_{layer_config}"
    for alias, ours in METRIC_ALIASES.items():
        if f"{alias}_mean" in orig:
            doc.setdefault(f"{ours}_mean", orig[f"{alias}_mean"])
        if f"{alias}_std" in orig:  # never a std the original did not write
            doc.setdefault(f"{ours}_std", orig[f"{alias}_std"])
    curves = orig.get("learning_curves") or []
    doc["learning_curves"] = [{"val_acc": c.get("val_acc_history", []), "train_loss": c.get("train_loss_history", []),
                               **c} for c in curves]
    val, test = orig.get("val_confusion_matrices"), orig.get("test_confusion_matrices")
    if val and test:
        doc["confusion_matrices"] = [{"val": v, "test": t} for v, t in zip(val, test)]
    if "training_time_total" in orig:
        doc.setdefault("duration_s", float(orig["training_time_total"]))
    else:
        doc.setdefault("duration_s", float(sum(float(r.get("training_time", 0.0)) for r in runs)))
    return doc
