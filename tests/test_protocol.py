"""The classifier protocol of DOMAIN.md in numbers: a tiny deterministic training pinned in a golden file,
and each rule of the protocol checked on its own (the schedule, the first best epoch, train-only
standardisation, the stratified validation split, macro F1 on unbalanced classes).

Every test here kills a mutant of scripts/mutants.py that the rest of the suite let pass.
Regenerate the golden file with ``ABLATE_UPDATE_GOLDEN=1 pytest tests/test_protocol.py`` and review its diff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ablation_cli.training.metrics import classification_metrics, per_class_and_confusion
from ablation_cli.training.split import Split, make_split
from ablation_cli.training.trainer import TrainParams, prepare, train_run, train_runs

GOLDEN = Path(__file__).parent / "golden" / "tiny_training.json"
UPDATE = os.environ.get("ABLATE_UPDATE_GOLDEN") == "1"

# small enough for well under a second on two cores; plateau_patience 2 and a 10-row validation set make
# plateaus, halvings and tied best epochs certain
PARAMS = TrainParams(hidden_dim=16, num_hidden_layers=1, dropout=0.1, lr=0.01, batch_size=8, max_epochs=30,
                     patience=12, plateau_patience=2)
SEEDS = [0, 1]
PINNED_METRICS = ("train_acc", "val_acc", "test_acc", "val_f1_macro", "test_f1_macro", "test_balanced_acc")


def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    """48 rows, 5 features, 3 unbalanced classes (24 / 14 / 10); one feature on another scale and offset, so
    that standardisation matters."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 2], [24, 14, 10])
    x = rng.normal(size=(3, 5))[labels] * 0.8 + rng.normal(size=(48, 5))
    x[:, 0] = x[:, 0] * 5 + 10
    return x.astype(np.float32), labels.astype(np.int64)


def pinned(split: Split, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers the golden file holds: the split, and per run its curves, schedule, best epoch, accuracies
    and confusion matrices (never timings, nor keys added later)."""
    return {
        "params": dataclasses.asdict(PARAMS),
        "split": {name: getattr(split, name).tolist() for name in ("train", "val", "test")},
        "runs": [{
            "seed": seed,
            "best_epoch": r["best_epoch"],
            "epochs_run": r["epochs_run"],
            "learning_curve": {k: r["learning_curve"][k] for k in ("lr", "val_acc", "train_loss", "val_loss")},
            "metrics": {k: r["metrics"][k] for k in PINNED_METRICS},
            "confusion_matrices": r["confusion_matrices"],
        } for seed, r in zip(SEEDS, runs)],
    }


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: the same bits on every machine, and no waiting on a busy one's second core
    (tiny batches spend their time in thread hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> tuple[Split, list[dict[str, Any]]]:
    x, y = tiny_data()
    split = make_split(y, 0.6, 0.2, 0.2, seed=42, stratify=True)
    with one_thread():
        return split, train_runs(prepare(x, y, split, 3, torch.device("cpu")), PARAMS, SEEDS)


def test_tiny_training_matches_the_golden_numbers(tiny):
    got = pinned(*tiny)
    if UPDATE:
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert {k: got["params"].get(k) for k in want["params"]} == want["params"]  # a new field may join later
    assert got["split"] == want["split"]
    for g, w in zip(got["runs"], want["runs"], strict=True):
        assert (g["seed"], g["best_epoch"], g["epochs_run"]) == (w["seed"], w["best_epoch"], w["epochs_run"])
        assert g["learning_curve"]["lr"] == w["learning_curve"]["lr"]
        assert g["learning_curve"]["val_acc"] == w["learning_curve"]["val_acc"]
        for key in ("train_loss", "val_loss"):  # float32 training: equal up to the last bits of another CPU
            assert g["learning_curve"][key] == pytest.approx(w["learning_curve"][key], rel=1e-4)
        assert g["metrics"] == pytest.approx(w["metrics"], abs=1e-12)
        assert g["confusion_matrices"] == w["confusion_matrices"]


def expected_schedule(val_acc: list[float], params: TrainParams) -> list[float]:
    """The lr of each epoch under ReduceLROnPlateau on validation accuracy (mode max), written out: after
    more than ``plateau_patience`` epochs in a row without a better accuracy, the lr is multiplied by
    ``plateau_factor`` and the count starts again. The lr of an epoch is the one it trained with."""
    lr, best, bad, out = params.lr, -1.0, 0, []
    for acc in val_acc:
        out.append(lr)
        if acc > best:
            best, bad = acc, 0
        else:
            bad += 1
        if bad > params.plateau_patience:
            lr, bad = lr * params.plateau_factor, 0
    return out


def test_lr_halves_only_after_plateau_patience_epochs_without_a_better_val_acc(tiny):
    _, runs = tiny
    for r in runs:
        curve = r["learning_curve"]
        assert curve["lr"] == pytest.approx(expected_schedule(curve["val_acc"], PARAMS), rel=1e-12)
        assert min(curve["lr"]) < PARAMS.lr  # the case: the schedule did act
        for epoch in range(1, len(curve["lr"])):  # a halving follows plateau_patience + 1 epochs with no new best
            if curve["lr"][epoch] < curve["lr"][epoch - 1]:
                assert curve["lr"][epoch] == curve["lr"][epoch - 1] * PARAMS.plateau_factor
                window = curve["val_acc"][epoch - PARAMS.plateau_patience - 1 : epoch]
                assert max(window) <= max(curve["val_acc"][: epoch - PARAMS.plateau_patience - 1], default=-1.0)


def test_the_first_of_tied_best_epochs_is_kept(tiny):
    _, runs = tiny
    for r in runs:
        acc = r["learning_curve"]["val_acc"]
        assert acc.count(max(acc)) > 1  # the case: the best validation accuracy is reached more than once
        assert r["best_epoch"] == acc.index(max(acc)) + 1
        assert r["metrics"]["val_acc"] == max(acc)
        assert r["epochs_run"] == min(r["best_epoch"] + PARAMS.patience, PARAMS.max_epochs)


def test_a_constructed_tie_keeps_the_first_epoch():
    """lr 0 and no hidden layer: the weights never move, every epoch has the same validation accuracy, so
    the first epoch is the best and early stopping ends the run patience epochs later."""
    x, y = tiny_data()
    split = make_split(y, 0.6, 0.2, 0.2, seed=42, stratify=True)
    frozen = TrainParams(num_hidden_layers=0, dropout=0.0, lr=0.0, batch_size=8, max_epochs=20, patience=3)
    with one_thread():
        r = train_run(prepare(x, y, split, 3, torch.device("cpu")), frozen, seed=0)
    assert len(set(r["learning_curve"]["val_acc"])) == 1
    assert (r["best_epoch"], r["epochs_run"]) == (1, 4)


def test_standardisation_statistics_come_from_the_train_rows_only():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 4)) * [1.0, 3.0, 0.5, 2.0] + [0.0, 5.0, -2.0, 1.0]
    split = make_split(y, 0.6, 0.2, 0.2, seed=42, stratify=True)
    x[split.test] += 50.0  # a shifted test set: statistics over all rows would be far from the train rows'
    x[:, 3] = 7.0  # a constant column: std 0 is taken as 1
    x = x.astype(np.float32)
    data = prepare(x, y, split, 3, torch.device("cpu"))
    train = x[split.train].astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)  # population std, over the train rows
    std[std == 0] = 1.0
    for name in ("train", "val", "test"):
        rows = getattr(split, name)
        got = data.x[name][0 : len(rows)].numpy()
        np.testing.assert_allclose(got, ((x[rows] - mean) / std).astype(np.float32), rtol=1e-6, atol=1e-6)
        assert data.y[name].tolist() == y[rows].tolist()
    standardised = data.x["train"][0 : len(split.train)].numpy().astype(np.float64)
    np.testing.assert_allclose(standardised.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(standardised.std(axis=0), [1.0, 1.0, 1.0, 0.0], atol=1e-6)
    assert data.x["test"][0 : len(split.test)].numpy()[:, :3].mean() > 10  # the shift survives: no leak


@pytest.mark.parametrize("seed", range(10))
def test_the_validation_and_test_parts_are_stratified(seed):
    y = np.repeat([0, 1, 2], [60, 30, 10])
    split = make_split(y, 0.7, 0.1, 0.2, seed=seed, stratify=True)
    assert np.bincount(y[split.test]).tolist() == [12, 6, 2]
    assert np.bincount(y[split.val]).tolist() == [6, 3, 1]
    assert np.bincount(y[split.train]).tolist() == [42, 21, 7]
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(100))


def test_macro_f1_precision_and_recall_on_unbalanced_classes():
    """6 / 3 / 1 rows per class: macro (each class counts once) and weighted (by support) averages differ."""
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    proba = np.full((10, 3), 0.1)
    proba[np.arange(10), pred] = 0.8
    m = classification_metrics(y, proba, 3, "test")
    # per class: precision 1, 2/3, 1/2; recall 5/6, 2/3, 1; F1 10/11, 2/3, 2/3
    assert m["test_acc"] == pytest.approx(0.8)
    assert m["test_f1_macro"] == pytest.approx((10 / 11 + 2 / 3 + 2 / 3) / 3)  # 0.7475
    assert m["test_f1_weighted"] == pytest.approx((6 * 10 / 11 + 3 * 2 / 3 + 1 * 2 / 3) / 10)  # 0.8121
    assert m["test_precision_macro"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert m["test_recall_macro"] == pytest.approx((5 / 6 + 2 / 3 + 1) / 3)
    assert m["test_balanced_acc"] == pytest.approx(5 / 6)
    assert m["test_f1_macro"] == pytest.approx(0.7474747474747475)
    from sklearn import metrics as skm

    assert m["test_f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    d = per_class_and_confusion(y, proba, 3)
    assert d["per_class"]["f1"] == pytest.approx([10 / 11, 2 / 3, 2 / 3])
    assert d["per_class"]["support"] == [6, 3, 1]
    assert d["confusion_matrix"] == [[5, 1, 0], [0, 2, 1], [0, 0, 1]]
