"""``ablate audit invariance``: how much each representation, and each trained classifier, depends on how a
LoRA's factors happen to be parametrised (docs/invariance.md).

For each transform (features/transforms.py) every LoRA of the dataset is reparametrised, its features
are computed again, and each representation's largest feature change is reported. For an experiment
with finished cells, each cell's run 1 is trained again (the same config, seed and split: on the CPU the
same model as its checkpoint's, which the audit checks) and scored on the original test set and on each
transformed one, in one training: the transformed test rows are appended to the data, and neither the
standardisation (train rows) nor the training (train and validation rows) reads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.executors.cell import run_split
from ablation_cli.features.stream_pass import units
from ablation_cli.features.transforms import TRANSFORMS, TransformedSource
from ablation_cli.grid import Cell, expand
from ablation_cli.reports.invariance import CellDrop, FeatureChange, InvarianceReport
from ablation_cli.store import ExperimentStore
from ablation_cli.training.classifiers import resolve_classifier
from ablation_cli.training.results import RunResult
from ablation_cli.training.split import Split
from ablation_cli.workspace import Workspace

log = logging.getLogger(__name__)

TOLERANCE = 1e-5  # a representation flagged invariant must not move by more (float32 features)


def audited_reps(cfg: ExperimentConfig, chosen: Sequence[str] | None) -> list[str]:
    """``chosen``, else the experiment's representations followed by the built-in invariant ones."""
    if chosen:
        return list(chosen)
    invariant = features.registry.invariant_built_ins()
    return list(dict.fromkeys([*cfg.representations, *invariant]))


BLOCK_COLUMNS = 2048  # float64 temporaries of the comparison: a block of columns at a time


def feature_change(before: np.ndarray, after: np.ndarray) -> FeatureChange:
    """Per feature: its largest change over the LoRAs, relative to its largest magnitude before or after."""
    rel = np.zeros(before.shape[1])
    for lo in range(0, before.shape[1], BLOCK_COLUMNS):
        a, b = before[:, lo:lo + BLOCK_COLUMNS].astype(np.float64), after[:, lo:lo + BLOCK_COLUMNS].astype(np.float64)
        delta = np.abs(b - a).max(axis=0, initial=0.0)
        size = np.maximum(np.abs(a).max(axis=0, initial=0.0), np.abs(b).max(axis=0, initial=0.0))
        rel[lo:lo + BLOCK_COLUMNS] = np.divide(delta, size, out=np.zeros_like(delta), where=size > 0)
    return {"max_rel_change": float(rel.max(initial=0.0)), "median_rel_change": float(np.median(rel)),
            "features_moved": float((rel > TOLERANCE).mean())}


def unit_columns(rep_name: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, slice]:
    """Each unit's columns in ``Workspace.features(rep, every layer)``: units in order, a composite's parts
    side by side within each unit (as ``Workspace.feature_view`` lays them)."""
    rep, out, offset = features.get(rep_name), {}, 0
    for unit in units(rep, sorted(shapes)):
        width = sum(part.unit_dim(unit, shapes) for part in rep.base)
        out[unit] = slice(offset, offset + width)
        offset += width
    return out


def audit_invariance(cfg: ExperimentConfig, workspace: Workspace, reps: list[str], transforms: list[str],
                     seed: int = 0, store: ExperimentStore | None = None, retrain: bool = True) -> InvarianceReport:
    """The features of ``reps`` after each transform against before; with ``store`` (an experiment) and
    ``retrain``, each finished cell's run 1 trained again and scored on each transformed test set.

    One transform's features are in memory at a time, beside the original ones; what the retraining
    needs of them (the test rows) is kept."""
    started = time.perf_counter()
    index = workspace.index
    layers = list(index.layers)
    workspace.prepare(reps)
    cells, stale = _finished_cells(cfg, workspace, store, reps) if store is not None and retrain else ([], [])
    tests = {cell.id: np.asarray(run_split(cell.config(cfg), workspace, 1).test) for cell in cells}
    rows = np.unique(np.concatenate(list(tests.values()))) if tests else np.zeros(0, dtype=np.intp)
    changes: dict[str, dict[str, FeatureChange]] = {rep: {} for rep in reps}
    kept: dict[tuple[str, str], np.ndarray] = {}  # (transform, rep) -> its features of the test rows
    for i, t in enumerate(transforms, 1):
        log.info("Audit: features of %d LoRAs after the %s transform (%d/%d)", len(index.labels), t, i,
                 len(transforms))
        moved = Workspace(TransformedSource(workspace.source, t, seed), cfg.split, None, cfg.device)
        moved.prepare(reps)
        for rep in reps:
            after = moved.features(rep, layers)
            changes[rep][t] = feature_change(workspace.features(rep, layers), after)
            if any(c.representation == rep for c in cells):
                kept[(t, rep)] = after[rows]
            del after
        del moved
    drops = []
    for i, cell in enumerate(cells, 1):
        log.info("Audit: %s, run 1 trained again and scored on %d test sets (%d/%d)", cell.id,
                 1 + len(transforms), i, len(cells))
        columns = unit_columns(cell.representation, index.shapes)
        chosen = np.concatenate([np.arange(columns[u].start, columns[u].stop)
                                 for u in units(features.get(cell.representation), cell.layers)])
        at = np.searchsorted(rows, tests[cell.id])
        blocks = [kept[(t, cell.representation)][np.ix_(at, chosen)] for t in transforms]
        assert store is not None
        drops.append(_cell_drop(cell, cfg, workspace, dict(zip(transforms, blocks)), store))
    return {
        "dataset": workspace.info.name, "num_loras": len(index.labels), "seed": seed,
        "transforms": transforms, "tolerance": TOLERANCE,
        "representations": [{"name": rep, "invariant": features.get(rep).invariant,
                             "in_experiment": rep in cfg.representations if store is not None else None,
                             "change": changes[rep]} for rep in reps],
        "cells": drops, "experiment": str(store.root) if store is not None else None,
        "retrain": retrain, "stale_cells": stale,
        "duration_s": round(time.perf_counter() - started, 1),
    }


def _finished_cells(cfg: ExperimentConfig, workspace: Workspace, store: ExperimentStore,
                    reps: list[str]) -> tuple[list[Cell], list[str]]:
    """The cells with a valid cell checkpoint and run 1 (imported ones have no predictions to compare), and
    those left out as stale: made under another fingerprint than today's (a representation's new
    version), so that retraining them would not be the run of their checkpoint."""
    specs = {c.id: c for c in store.experiment().cells}
    found, stale = [], []
    for cell in expand(cfg, workspace.info):
        spec = specs.get(cell.id)
        if spec is None or cell.representation not in reps:
            continue
        runs, done = store.current_checkpoints(spec)
        if done is None or 1 not in runs or done.meta.imported:
            continue
        if spec.expected.fingerprint != cell.fingerprint.digest:
            stale.append(cell.id)
        else:
            found.append(cell)
    return found, stale


def _cell_drop(cell: Cell, cfg: ExperimentConfig, workspace: Workspace, moved: dict[str, np.ndarray],
               store: ExperimentStore) -> CellDrop:
    """Run 1 of ``cell`` trained once on its data with each transform's test rows (``moved``) appended."""
    from ablation_cli.training import trainer  # torch loads where a classifier trains

    cfg = cell.config(cfg)
    index = workspace.index
    split = run_split(cfg, workspace, 1)
    test = np.asarray(split.test)
    n, k = len(index.labels), len(test)
    x = np.concatenate([workspace.features(cell.representation, cell.layers), *moved.values()])
    labels = np.concatenate([index.labels, *(index.labels[test] for _ in moved)])
    augmented = Split(split.train, split.val, np.concatenate([test, n + np.arange(k * len(moved))]))
    classifier = resolve_classifier(cfg, cell.classifier)
    device = trainer.resolve_device(workspace.device) if classifier.torch else trainer.torch.device("cpu")
    data = trainer.prepare(x, labels, augmented, index.num_classes, device)
    results: list[RunResult] = []
    classifier.train_runs(data, [cfg.seed], on_done=lambda _pos, result: results.append(result))
    right = np.asarray(results[0]["test_pred"]) == labels[augmented.test]
    acc = [float(right[j * k:(j + 1) * k].mean()) for j in range(1 + len(moved))]
    spec = next(c for c in store.experiment().cells if c.id == cell.id)
    recorded = float(store.current_checkpoints(spec)[0][1].metrics["test_acc"])
    return {"cell": cell.id, "representation": cell.representation, "layer_config": cell.layer_config,
            "classifier": cell.classifier, "test_acc": recorded, "retrained_test_acc": acc[0],
            "reproduced": abs(acc[0] - recorded) < 1e-9,
            "transformed_test_acc": dict(zip(moved, acc[1:])),
            "drop": {t: acc[0] - a for t, a in zip(moved, acc[1:])}}


__all__ = ["TOLERANCE", "TRANSFORMS", "audit_invariance", "audited_reps", "feature_change"]
