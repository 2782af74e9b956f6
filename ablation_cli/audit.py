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
from collections.abc import Sequence

import numpy as np

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.features.transforms import TRANSFORMS, TransformedSource
from ablation_cli.grid import Cell, expand
from ablation_cli.reports.invariance import CellDrop, FeatureChange, InvarianceReport
from ablation_cli.store import ExperimentStore
from ablation_cli.training.classifiers import resolve_classifier
from ablation_cli.training.results import RunResult
from ablation_cli.training.split import Split, make_split
from ablation_cli.workspace import Workspace

log = logging.getLogger(__name__)

TOLERANCE = 1e-5  # a representation flagged invariant must not move by more (float32 features)


def audited_reps(cfg: ExperimentConfig, chosen: Sequence[str] | None) -> list[str]:
    """``chosen``, else the experiment's representations followed by the built-in invariant ones."""
    if chosen:
        return list(chosen)
    invariant = features.registry.invariant_built_ins()
    return list(dict.fromkeys([*cfg.representations, *invariant]))


def feature_change(before: np.ndarray, after: np.ndarray) -> FeatureChange:
    """Per feature: its largest change over the LoRAs, relative to its largest magnitude before or after."""
    delta = np.abs(after.astype(np.float64) - before).max(axis=0)
    size = np.maximum(np.abs(before).max(axis=0), np.abs(after).max(axis=0)).astype(np.float64)
    rel = np.divide(delta, size, out=np.zeros_like(delta), where=size > 0)
    return {"max_rel_change": float(rel.max(initial=0.0)), "median_rel_change": float(np.median(rel)),
            "features_moved": float((rel > TOLERANCE).mean())}


def audit_invariance(cfg: ExperimentConfig, workspace: Workspace, reps: list[str], transforms: list[str],
                     seed: int = 0, store: ExperimentStore | None = None, retrain: bool = True) -> InvarianceReport:
    """The features of ``reps`` after each transform against before; with ``store`` (an experiment) and
    ``retrain``, each finished cell's run 1 trained again and scored on each transformed test set."""
    started = time.perf_counter()
    layers = list(workspace.index.layers)
    workspace.prepare(reps)
    moved = {t: Workspace(TransformedSource(workspace.source, t, seed), cfg.split, None, cfg.device)
             for t in transforms}
    changes: dict[str, dict[str, FeatureChange]] = {rep: {} for rep in reps}
    for i, (t, tws) in enumerate(moved.items(), 1):
        log.info("Audit: features of %d LoRAs after the %s transform (%d/%d)", workspace.index.labels.shape[0], t, i,
                 len(moved))
        tws.prepare(reps)
        for rep in reps:
            changes[rep][t] = feature_change(workspace.features(rep, layers), tws.features(rep, layers))
    cells = _cell_drops(cfg, workspace, moved, reps, store) if store is not None and retrain else []
    report: InvarianceReport = {
        "dataset": workspace.info.name, "num_loras": int(workspace.index.labels.shape[0]), "seed": seed,
        "transforms": transforms, "tolerance": TOLERANCE,
        "representations": [{"name": rep, "invariant": features.get(rep).invariant,
                             "in_experiment": rep in cfg.representations if store is not None else None,
                             "change": changes[rep]} for rep in reps],
        "cells": cells, "experiment": str(store.root) if store is not None else None,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    return report


def _finished_cells(cfg: ExperimentConfig, workspace: Workspace, store: ExperimentStore,
                    reps: list[str]) -> list[Cell]:
    specs = {c.id: c for c in store.experiment().cells}
    found = []
    for cell in expand(cfg, workspace.info):
        spec = specs.get(cell.id)
        if spec is None or cell.representation not in reps:
            continue
        runs, done = store.current_checkpoints(spec)
        if done is not None and 1 in runs and not done.meta.imported:
            found.append(cell)
    return found


def _cell_drops(cfg: ExperimentConfig, workspace: Workspace, moved: dict[str, Workspace], reps: list[str],
                store: ExperimentStore) -> list[CellDrop]:
    cells = _finished_cells(cfg, workspace, store, reps)
    out = []
    for i, cell in enumerate(cells, 1):
        log.info("Audit: %s, run 1 trained again and scored on %d test sets (%d/%d)", cell.id, 1 + len(moved), i,
                 len(cells))
        out.append(_cell_drop(cell, cfg, workspace, moved, store))
    return out


def _split(cfg: ExperimentConfig, workspace: Workspace) -> Split:
    """Run 1's split: the experiment's, or with ``split.resample`` its own (seeded by its seed)."""
    if not cfg.split.resample:
        return workspace.split
    s, index = cfg.split, workspace.index
    return make_split(index.labels, s.train, s.val, s.test, cfg.seed, s.stratify, index.label_names)


def _cell_drop(cell: Cell, cfg: ExperimentConfig, workspace: Workspace, moved: dict[str, Workspace],
               store: ExperimentStore) -> CellDrop:
    from ablation_cli.training import trainer  # torch loads where a classifier trains

    cfg = cell.config(cfg)
    index = workspace.index
    split = _split(cfg, workspace)
    test = np.asarray(split.test)
    n = index.labels.shape[0]
    blocks = [workspace.features(cell.representation, cell.layers)]
    blocks += [m.feature_view(cell.representation, cell.layers).array()[test] for m in moved.values()]
    x = np.concatenate(blocks)
    labels = np.concatenate([index.labels, *(index.labels[test] for _ in moved)])
    tests = [test] + [n + k * len(test) + np.arange(len(test)) for k in range(len(moved))]
    augmented = Split(split.train, split.val, np.concatenate(tests))
    classifier = resolve_classifier(cfg, cell.classifier)
    device = trainer.resolve_device(workspace.device) if classifier.torch else trainer.torch.device("cpu")
    data = trainer.prepare(x, labels, augmented, index.num_classes, device)
    results: list[RunResult] = []
    classifier.train_runs(data, [cfg.seed], on_done=lambda _pos, result: results.append(result))
    pred = np.asarray(results[0]["test_pred"])
    truth = labels[augmented.test]
    acc = [float((pred[k * len(test):(k + 1) * len(test)] == truth[k * len(test):(k + 1) * len(test)]).mean())
           for k in range(1 + len(moved))]
    runs, _ = store.current_checkpoints(next(c for c in store.experiment().cells if c.id == cell.id))
    recorded = float(runs[1].metrics["test_acc"])
    return {"cell": cell.id, "representation": cell.representation, "layer_config": cell.layer_config,
            "classifier": cell.classifier, "test_acc": recorded, "retrained_test_acc": acc[0],
            "reproduced": abs(acc[0] - recorded) < 1e-9,
            "transformed_test_acc": dict(zip(moved, acc[1:])),
            "drop": {t: acc[0] - a for t, a in zip(moved, acc[1:])}}


__all__ = ["TOLERANCE", "TRANSFORMS", "audit_invariance", "audited_reps", "feature_change"]
