"""Estimators: what fits a cell's runs when it is not the torch trainer.

- an estimator: a scikit-learn-style class by import path with parameters (``[estimators.<name>]``),
  fitted on the standardised train split; its ``predict_proba`` scores every split.
- a plugin: a factory ``(seed) -> estimator`` (training/plugins.py), with the same contract.

Seeds go to ``random_state`` where an estimator has one; one without (kNN, a plugin declared
``seeded=False``) is fitted once and its result reported for every run, marked ``deterministic``.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ablation_cli.errors import ConfigError, PluginError
from ablation_cli.training.plugins import ClassifierPlugin
from ablation_cli.training.results import RunDoneCallback, RunResult


@dataclass(frozen=True)
class EstimatorSpec:
    """What fits a cell's runs when it is not the torch trainer."""

    name: str
    make: Callable[[int], Any] = field(compare=False)  # seed -> a fresh estimator
    seeded: bool  # False: every run is the same fit


def estimator_class(path: str, name: str) -> type:
    """The class at ``path`` (``package.module.Class``), or a ConfigError naming the classifier."""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"estimators.{name}: cannot import {path} ({type(exc).__name__}: {exc})",
                          "an import path such as sklearn.linear_model.LogisticRegression") from None
    if not inspect.isclass(cls):
        raise ConfigError(f"estimators.{name}: {path} is not a class")
    return cls


def estimator_spec(name: str, path: str, params: Mapping[str, Any]) -> EstimatorSpec:
    """Check the estimator now (it imports, takes these parameters, predicts probabilities)."""
    cls = estimator_class(path, name)
    try:
        probe = cls(**params)
    except TypeError as exc:
        raise ConfigError(f"estimators.{name}: {path} does not take these params ({exc})") from None
    if not hasattr(probe, "fit") or not hasattr(probe, "predict_proba"):
        raise ConfigError(f"estimators.{name}: {path} has no fit/predict_proba",
                          "a classifier with predict_proba (SVC: probability = true)")
    seeded = "random_state" in (probe.get_params() if hasattr(probe, "get_params") else {})
    if seeded and "random_state" in params:
        raise ConfigError(f"estimators.{name}: params.random_state is set by ablate (run k: seed + k - 1)")

    def make(seed: int) -> Any:
        return cls(**params, **({"random_state": seed} if seeded else {}))

    return EstimatorSpec(name, make, seeded)


def plugin_spec(p: ClassifierPlugin) -> EstimatorSpec:
    def make(seed: int) -> Any:
        try:
            est = p.factory(seed)
        except Exception as exc:
            raise PluginError(f"classifier {p.name} ({p.origin}) failed to build: {type(exc).__name__}: {exc}") \
                from None
        if not hasattr(est, "fit") or not hasattr(est, "predict_proba"):
            raise PluginError(f"classifier {p.name} ({p.origin}) returned {type(est).__name__}, which has no "
                              "fit/predict_proba")
        return est

    return EstimatorSpec(p.name, make, p.seeded)


# -- training ---------------------------------------------------------------------------------------

def train_runs(data: Any, spec: EstimatorSpec, seeds: list[int], on_epoch: Any = None,
               on_done: RunDoneCallback | None = None) -> list[RunResult]:
    """Fit one estimator per seed on the standardised train split (once, for one without randomness),
    score train/val/test with its predict_proba, and hand each run's result to ``on_done``."""
    from ablation_cli.training.metrics import evaluate

    splits = {s: (_numpy(data.x[s]), data.y[s].cpu().numpy()) for s in ("train", "val", "test")}
    results: list[RunResult] = []
    fitted: RunResult | None = None
    for pos, seed in enumerate(seeds):
        if fitted is not None and not spec.seeded:
            result: RunResult = {**fitted, "train_time_s": 0.0}  # the same fit: nothing trained again
        else:
            started = time.perf_counter()
            est = spec.make(seed)
            est.fit(*splits["train"])
            scores = evaluate(((split, y, _proba(est, x, data.num_classes, spec.name))
                               for split, (x, y) in splits.items()), data.num_classes)
            result = {
                **scores,
                "learning_curve": {"train_loss": [], "val_loss": [], "val_acc": [], "lr": []},
                "best_epoch": 0, "epochs_run": 0, "train_time_s": time.perf_counter() - started,
                "feature_dim": int(splits["train"][0].shape[1]), "device": "cpu",
                "deterministic": not spec.seeded,
            }
            fitted = result
        results.append(result)
        if on_done is not None:
            on_done(pos, result)
    return results


def _numpy(x: Any) -> np.ndarray:
    """A split's standardised features as one float32 array (estimators fit in memory)."""
    rows = x[slice(None)] if not hasattr(x, "detach") else x
    return rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)


def _proba(est: Any, x: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """predict_proba in the columns of every class (a class absent from the train split: 0)."""
    try:
        proba = np.asarray(est.predict_proba(x), dtype=np.float64)
    except Exception as exc:
        raise PluginError(f"classifier {name}: predict_proba failed: {type(exc).__name__}: {exc}") from None
    classes = np.asarray(getattr(est, "classes_", np.arange(proba.shape[1])))
    if proba.ndim != 2 or proba.shape != (len(x), len(classes)):
        raise PluginError(f"classifier {name}: predict_proba returned shape {proba.shape} for {len(x)} rows "
                          f"and {len(classes)} classes")
    if not np.isfinite(proba).all():
        raise PluginError(f"classifier {name}: predict_proba returned non-finite values")
    full = np.zeros((len(x), num_classes))
    full[:, classes.astype(int)] = proba
    total = full.sum(axis=1, keepdims=True)  # float32 inputs give sums a few ulps off 1: renormalise
    return np.divide(full, total, out=np.full_like(full, 1.0 / num_classes), where=total > 0)
