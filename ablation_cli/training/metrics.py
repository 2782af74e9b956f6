"""Classification metrics, computed with scikit-learn (never by hand)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ablation_cli.training.results import Evaluation, SplitDetails


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, num_classes: int, prefix: str) -> dict[str, float]:
    """Scalar metrics of one split, keys prefixed (``test_acc``, ``test_f1_macro``, ...)."""
    from sklearn import metrics as skm  # slow to import: only where runs are scored

    labels = list(range(num_classes))
    y_pred = proba.argmax(axis=1)
    out = {
        "acc": skm.accuracy_score(y_true, y_pred),
        "balanced_acc": skm.balanced_accuracy_score(y_true, y_pred),
        "f1_macro": skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "f1_weighted": skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
        "precision_macro": skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "log_loss": skm.log_loss(y_true, np.clip(proba, 1e-12, 1.0), labels=labels),
    }
    if num_classes > 2:
        out["top2_acc"] = skm.top_k_accuracy_score(y_true, proba, k=2, labels=labels)
    return {f"{prefix}_{k}": float(v) for k, v in out.items()}


def per_class_and_confusion(y_true: np.ndarray, proba: np.ndarray, num_classes: int) -> SplitDetails:
    from sklearn import metrics as skm  # slow to import: only where runs are scored

    labels = list(range(num_classes))
    y_pred = proba.argmax(axis=1)
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "per_class": {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.tolist()},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate(splits: Iterable[tuple[str, np.ndarray, np.ndarray]], num_classes: int) -> Evaluation:
    """A trained model's scores from its class probabilities on each split ``(name, y_true, proba)``:
    every metric of val and test, the train accuracy, per-class scores and confusion matrices of val and
    test, and the predicted class of each test row (in the split's order)."""
    metrics: dict[str, float] = {}
    details: dict[str, SplitDetails] = {}
    test_pred: list[int] = []
    for split, y, proba in splits:
        m = classification_metrics(y, proba, num_classes, split)
        metrics.update(m if split != "train" else {"train_acc": m["train_acc"]})
        if split != "train":
            details[split] = per_class_and_confusion(y, proba, num_classes)
        if split == "test":
            test_pred = proba.argmax(axis=1).tolist()
    return {
        "metrics": metrics,
        "test_pred": test_pred,
        "confusion_matrices": {s: details[s]["confusion_matrix"] for s in ("val", "test")},
        "per_class": {s: details[s]["per_class"] for s in ("val", "test")},
    }


def aggregate(values: list[float]) -> dict[str, float | None]:
    """mean, std (population, ddof 0, as the original script computed it) and the half-width of the
    t-based 95% CI over runs (sample std, ddof 1). One run: no CI (None). Identical runs: std and CI
    exactly 0 (numpy leaves ~1e-17 of rounding: the mean of three 0.3375 is not 0.3375)."""
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if len(set(arr.tolist())) == 1:
        return {"mean": float(arr[0]), "std": 0.0, "ci95": 0.0 if arr.size > 1 else None}
    from scipy import stats  # slow to import: only where runs are aggregated

    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size))
    return {"mean": mean, "std": float(arr.std()), "ci95": half}
