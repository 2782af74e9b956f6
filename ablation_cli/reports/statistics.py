"""The statistics behind results.md's findings, computed at merge from each run's stored test
predictions (docs/statistics.md has the formulas and references).

- per cell: a 95% percentile bootstrap CI of test accuracy over test rows and runs (beside the
  t-interval over runs that ``<metric>_ci95`` has always been);
- per layer config: the best cell on validation accuracy, and every other cell compared to it,
  paired (the same drawn rows and run indices for both cells), Holm-adjusted over the table;
- per declared pair of layer configs: the paired difference per row, Holm-adjusted over the rows;
- chance: the test rows' majority-class rate, one-sided bootstrap per cell, Holm over the cells.

With resampled splits (``[split] resample = true``) runs are not independent draws, so pairs are
compared with the corrected resampled t-test (Nadeau and Bengio, 2003) instead of the bootstrap.
Pure numpy and scipy; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ablation_cli.records import cell_axes
from ablation_cli.reports.statistics_docs import MainEffect, Pivot, Statistics
from ablation_cli.reports.tables import first_best
from ablation_cli.training.predictions import RunPredictions

BOOTSTRAP_CHUNK = 256  # resamples drawn at a time: bounds memory at chunk x n_test floats


@dataclass(frozen=True)
class Settings:
    resamples: int = 2000
    seed: int = 0
    alpha: float = 0.05

    @property
    def level(self) -> float:
        return 1.0 - self.alpha

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Settings:
        reports = (config or {}).get("reports") or {}
        return cls(int(reports.get("bootstrap_resamples", 2000)), int(reports.get("bootstrap_seed", 0)),
                   float(reports.get("alpha", 0.05)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: sort ascending, p_(i) * (m - i + 1), running maximum, capped at 1
    (statsmodels' ``multipletests(p, method="holm")[1]``; tested against it)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def bootstrap_p(diffs: np.ndarray, resamples: int) -> float:
    """Two-sided p of a bootstrap distribution of differences: 2 min(P(d <= 0), P(d >= 0)), floored at
    1/B (a bootstrap cannot show a smaller p) and capped at 1."""
    two_sided = 2.0 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return min(1.0, max(1.0 / resamples, two_sided))


def corrected_resampled_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_train: int, n_test: int,
                          level: float = 0.95) -> tuple[float, tuple[float, float] | None, float | None]:
    """Nadeau and Bengio's corrected resampled t-test of paired per-run accuracies: mean difference,
    its CI and the two-sided p (None where the differences do not vary)."""
    from scipy import stats  # slow to import: only where splits were resampled

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    r = d.size
    mean = float(d.mean())
    if r < 2 or len(set(d.tolist())) == 1:
        return mean, None, (1.0 if mean == 0 else None)
    se = math.sqrt((1.0 / r + n_test / n_train) * float(np.var(d, ddof=1)))
    t = mean / se
    half = float(stats.t.ppf(0.5 + level / 2, r - 1)) * se
    return mean, (mean - half, mean + half), float(2 * stats.t.sf(abs(t), r - 1))


@dataclass(frozen=True)
class CellSample:
    """One cell's test correctness, run by row (R x n), and what it is paired on."""

    id: str
    row: str
    layer_config: str
    correct: np.ndarray
    group: str  # cells of one group share their test rows run by run: they can be paired
    majority: float
    val_mean: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def run_accuracies(self) -> np.ndarray:
        return self.correct.mean(axis=1)


def sample_of(doc: Mapping[str, Any], row: str) -> CellSample | None:
    """The cell's sample from its stored predictions; None without predictions for every run."""
    stored = doc.get("predictions") or []
    if not stored or len(stored) != len(doc.get("per_run_results") or []):
        return None
    preds = [RunPredictions.from_json(p) for p in stored]
    if len({len(p.rows) for p in preds}) != 1 or not len(preds[0].rows):
        return None
    digest = hashlib.sha256()
    for p in preds:
        digest.update(p.rows.astype("<i8").tobytes())
        digest.update(b"|")
    majority = float(np.mean([np.bincount(p.true).max() / len(p.true) for p in preds]))
    return CellSample(id=doc["cell"], row=row, layer_config=doc["layer_config"],
                      correct=np.stack([p.correct for p in preds]), group=f"{len(preds)}:{digest.hexdigest()[:16]}",
                      majority=majority, val_mean=float(doc.get("val_acc_mean", float("nan"))))


def bootstrap_means(samples: Sequence[CellSample], settings: Settings) -> dict[str, np.ndarray]:
    """B bootstrap means of each cell's test accuracy: each resample draws R runs and n rows with
    replacement, the same draws for every cell of a group (so that differences are paired)."""
    out: dict[str, np.ndarray] = {}
    groups: dict[str, list[CellSample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    for members in groups.values():
        runs, n = members[0].correct.shape
        correct = {s.id: s.correct.T.astype(np.float32) for s in members}  # (n, R)
        parts: dict[str, list[np.ndarray]] = {s.id: [] for s in members}
        for start in range(0, settings.resamples, BOOTSTRAP_CHUNK):
            b = min(BOOTSTRAP_CHUNK, settings.resamples - start)
            rng = np.random.default_rng([settings.seed, start])
            counts = _counts(rng.integers(0, n, size=(b, n)), n).astype(np.float32)  # (b, n): times each row drawn
            weights = _counts(rng.integers(0, runs, size=(b, runs)), runs)  # (b, R): times each run drawn
            for s in members:
                per_run = (counts @ correct[s.id]).astype(np.float64) / n  # (b, R): accuracy on the drawn rows
                parts[s.id].append((per_run * weights).sum(axis=1) / runs)
        out.update({cid: np.concatenate(chunks) for cid, chunks in parts.items()})
    return out


def _counts(drawn: np.ndarray, size: int) -> np.ndarray:
    """Per row of ``drawn`` (indices in [0, size)), how often each index was drawn."""
    offsets = (np.arange(drawn.shape[0]) * size)[:, None]
    return np.bincount((drawn + offsets).ravel(), minlength=drawn.shape[0] * size).reshape(drawn.shape[0], size)


def _ci(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of cell ``a`` minus cell ``b``."""

    a: str
    b: str
    diff: float
    ci95: list[float] | None
    p: float | None

    def record(self, p_holm: float | None) -> dict[str, object]:
        return {"cell": self.a, "against": self.b, "diff": self.diff, "ci95": self.ci95, "p": self.p,
                "p_holm": p_holm}


class Analysis:
    """Paired comparisons among the samples of one experiment."""

    def __init__(self, samples: Sequence[CellSample], settings: Settings, resampled: bool,
                 split_sizes: Mapping[str, int] | None) -> None:
        self.samples = {s.id: s for s in samples}
        self.settings = settings
        self.resampled = resampled
        self.split_sizes = dict(split_sizes or {})
        self.boot = bootstrap_means(samples, settings)

    @property
    def resamples(self) -> int | None:
        """B where p comes from the bootstrap (floored at 1/B); None for the t-test."""
        return None if self.resampled else self.settings.resamples

    def cell_ci(self, cid: str) -> list[float]:
        return _ci(self.boot[cid], self.settings.level)

    def compare(self, a: str, b: str) -> Comparison | None:
        """a minus b, paired; None when the two cells do not share their test rows."""
        sa, sb = self.samples[a], self.samples[b]
        if sa.group != sb.group:
            return None
        if self.resampled and self.split_sizes.get("train"):
            diff, ci, p = corrected_resampled_t(sa.run_accuracies, sb.run_accuracies, self.split_sizes["train"],
                                                sa.correct.shape[1], self.settings.level)
            return Comparison(a, b, diff, list(ci) if ci else None, p)
        d = self.boot[a] - self.boot[b]
        return Comparison(a, b, sa.accuracy - sb.accuracy, _ci(d, self.settings.level),
                          bootstrap_p(d, self.settings.resamples))

    def above_chance_p(self, cid: str) -> float:
        """One-sided bootstrap p of 'accuracy <= the majority-class rate', floored at 1/B."""
        s = self.samples[cid]
        return max(1.0 / self.settings.resamples, float(np.mean(self.boot[cid] <= s.majority)))


def adjusted(comparisons: Sequence[Comparison], resamples: int | None = None) -> list[dict[str, object]]:
    """Each comparison's record with its Holm-adjusted p over the ones that have a p. ``p_bound``: a
    raw p at the bootstrap's floor 1/B is only a bound (the true p may be smaller), so is its Holm p."""
    ps = [c.p for c in comparisons if c.p is not None]
    holm_ps = iter(holm(ps)) if ps else iter(())
    out = []
    for c in comparisons:
        rec = c.record(next(holm_ps) if c.p is not None else None)
        rec["p_bound"] = bool(resamples and c.p is not None and c.p <= 1.0 / resamples)
        out.append(rec)
    return out


def verdict(rec: Mapping[str, Any], alpha: float) -> str:
    """tied / worse / better (than the best on validation), by the Holm-adjusted p."""
    p = rec.get("p_holm")
    if p is None:
        return "tied" if rec["diff"] == 0 else "n/a"
    if p >= alpha:
        return "tied"
    return "worse" if rec["diff"] < 0 else "better"


def analyse(cells: Sequence[Mapping[str, Any]], rows: Mapping[str, str], layer_configs: Sequence[str],
            pairs: Sequence[tuple[str, str]], settings: Settings, resampled: bool) -> Statistics:
    """Everything results.json's ``statistics`` holds, for ``cells`` in grid order (``rows``: each cell
    id's table row)."""
    samples = [s for s in (sample_of(c, rows[c["cell"]]) for c in cells) if s is not None]
    without = [c["cell"] for c in cells if c["cell"] not in {s.id for s in samples}]
    split_sizes = next((c.get("split_sizes") for c in cells if c.get("split_sizes")), None)
    out: Statistics = {
        "settings": {"bootstrap_resamples": settings.resamples, "bootstrap_seed": settings.seed,
                     "alpha": settings.alpha, "split": "resampled per run" if resampled else "fixed",
                     "paired_test": "corrected resampled t-test" if resampled else "paired bootstrap",
                     "correction": "holm"},
        "split_sizes": split_sizes,
        "without_predictions": without,
        "cells": {}, "vs_best": {}, "layer_effects": [], "chance": {},
        "comparisons_corrected": 0,  # last, as before: set once the comparisons are counted
    }
    if not samples:
        return out
    an = Analysis(samples, settings, resampled, split_sizes)
    for s in samples:
        out["cells"][s.id] = {"test_acc": s.accuracy, "test_acc_ci95_rows_runs": an.cell_ci(s.id),
                              "n_test": int(s.correct.shape[1]), "majority_rate": s.majority}
    corrected = 0
    by_id = {s.id: s for s in samples}
    for lc in layer_configs:
        docs = [c for c in cells if c.get("layer_config") == lc and c.get("val_acc_mean") is not None]
        if not docs:
            continue
        # the best among all the layer config's cells, predictions or not (the tables and plots choose the
        # same); ties (to 9 decimals: means of different runs differ in the last bits) go to the grid's order
        best_doc = first_best(docs)
        assert best_doc is not None  # docs: the cells with a validation accuracy
        best = by_id.get(best_doc["cell"])
        members = [by_id[c["cell"]] for c in docs if c["cell"] in by_id and c is not best_doc]
        pairs_vs_best = [] if best is None else \
            [c for c in (an.compare(s.id, best.id) for s in members) if c is not None]
        recs = adjusted(pairs_vs_best, an.resamples)
        for rec in recs:
            rec["verdict"] = verdict(rec, settings.alpha)
        compared = {rec["cell"] for rec in recs}
        out["vs_best"][lc] = {
            "best": best_doc["cell"], "best_row": rows[best_doc["cell"]],
            "best_val_acc": float(best_doc["val_acc_mean"]),
            "best_test_acc": best.accuracy if best is not None else float(best_doc.get("test_acc_mean", float("nan"))),
            "best_has_predictions": best is not None, "comparisons": recs,
            # other test rows, or no stored predictions (of the cell, or of the best)
            "not_compared": [c["cell"] for c in docs if c is not best_doc and c["cell"] not in compared]}
        corrected += len(recs)
    by_row = {(s.row, s.layer_config): s for s in samples}
    for a_lc, b_lc in pairs:
        found = [(row, by_row[(row, a_lc)], by_row[(row, b_lc)]) for row in dict.fromkeys(s.row for s in samples)
                 if (row, a_lc) in by_row and (row, b_lc) in by_row]
        comps = [(row, an.compare(a.id, b.id)) for row, a, b in found]
        paired = [(row, c) for row, c in comps if c is not None]
        recs = adjusted([c for _, c in paired], an.resamples)
        for (row, _), rec in zip(paired, recs):
            rec["row"] = row
        out["layer_effects"].append({"from": a_lc, "to": b_lc, "rows": recs})
        corrected += len(recs)
    if any(c.get("axes") for c in cells):  # a sweep: one table per axis
        out["main_effects"] = main_effects(cells, an)
        corrected += sum(len(e["values"]) - 1 for e in out["main_effects"])
    chance_ps = [an.above_chance_p(s.id) for s in samples]
    for s, p, p_adj in zip(samples, chance_ps, holm(chance_ps)):
        out["chance"][s.id] = {"majority_rate": s.majority, "p": p, "p_holm": p_adj,
                               "above": bool(p_adj < settings.alpha)}
    out["comparisons_corrected"] = corrected + len(chance_ps)
    return out


def main_effects(cells: Sequence[Mapping[str, Any]], an: Analysis) -> list[MainEffect]:
    """For each axis with more than one value: each value's mean test accuracy over its cells, and its
    difference from the first value, averaged over the pairs of cells equal on every other axis; the
    CI and p are paired (the same bootstrap draws of test rows and runs for every cell, or the corrected
    resampled t over runs), Holm-adjusted over the values of the axis."""
    coords = {c["cell"]: cell_axes(c) for c in cells}
    names = list(dict.fromkeys(k for xs in coords.values() for k in xs))
    out: list[MainEffect] = []
    for axis in names:
        on = [c for c in cells if axis in coords[c["cell"]]]
        values = list(dict.fromkeys(repr(coords[c["cell"]][axis]) for c in on))
        if len(values) < 2:
            continue
        value_of = {repr(v): v for c in on for v in [coords[c["cell"]][axis]]}

        def rest(cid: str, axis: str = axis) -> tuple[tuple[str, str], ...]:
            return tuple(sorted((k, repr(v)) for k, v in coords[cid].items() if k != axis))

        by_rest = {(rest(c["cell"]), repr(coords[c["cell"]][axis])): c["cell"] for c in on}
        base = values[0]
        rows: list[dict[str, object]] = []
        comps: list[Comparison | None] = []
        for v in values:
            members = [c for c in on if repr(coords[c["cell"]][axis]) == v]
            accs = [an.samples[c["cell"]].accuracy if c["cell"] in an.samples else float(c["test_acc_mean"])
                    for c in members]
            row: dict[str, object] = {"value": value_of[v], "cells": len(members),
                                      "mean_test_acc": float(np.mean(accs))}
            if v != base:
                pairs = [(c["cell"], by_rest[key]) for c in members
                         if (key := (rest(c["cell"]), base)) in by_rest]
                row["pairs"] = len(pairs)
                comps.append(_average_difference(an, pairs))
            rows.append(row)
        recs = iter(adjusted([c for c in comps if c is not None], an.resamples))
        for row, comp in zip(rows[1:], comps):
            rec = next(recs) if comp is not None else None
            row.update({"diff": rec["diff"] if rec else None, "ci95": rec["ci95"] if rec else None,
                        "p": rec["p"] if rec else None, "p_holm": rec["p_holm"] if rec else None,
                        "p_bound": rec["p_bound"] if rec else False})
        out.append({"axis": axis, "baseline": value_of[base], "values": rows})
    return out


def _average_difference(an: Analysis, pairs: Sequence[tuple[str, str]]) -> Comparison | None:
    """The mean over ``pairs`` (a, b) of a minus b, paired; None when a pair cannot be paired (no stored
    predictions, other test rows) or there is none."""
    if not pairs or any(a not in an.samples or b not in an.samples or an.samples[a].group != an.samples[b].group
                        for a, b in pairs):
        return None
    diff = float(np.mean([an.samples[a].accuracy - an.samples[b].accuracy for a, b in pairs]))
    if an.resampled and an.split_sizes.get("train"):
        a_runs = np.mean([an.samples[a].run_accuracies for a, _ in pairs], axis=0)
        b_runs = np.mean([an.samples[b].run_accuracies for _, b in pairs], axis=0)
        _, ci, p = corrected_resampled_t(a_runs, b_runs, an.split_sizes["train"],
                                         an.samples[pairs[0][0]].correct.shape[1], an.settings.level)
        return Comparison(pairs[0][0], pairs[0][1], diff, list(ci) if ci else None, p)
    d = np.mean([an.boot[a] - an.boot[b] for a, b in pairs], axis=0)
    return Comparison(pairs[0][0], pairs[0][1], diff, _ci(d, an.settings.level),
                      bootstrap_p(d, an.settings.resamples))


def pivot(cells: Sequence[Mapping[str, Any]], rows_axis: str, cols_axis: str) -> Pivot:
    """The cells' mean test accuracy by ``rows_axis`` x ``cols_axis`` (values in grid order), each entry the
    mean over the cells with both values (the other axes averaged); ValueError naming the allowed axes."""
    coords = [(cell_axes(c), float(c["test_acc_mean"])) for c in cells if c.get("test_acc_mean") is not None]
    allowed = list(dict.fromkeys(k for xs, _ in coords for k in xs))
    for axis in (rows_axis, cols_axis):
        if axis not in allowed:
            raise ValueError(f"pivot: {axis!r} is not an axis of this experiment (allowed: {', '.join(allowed)})")
    if rows_axis == cols_axis:
        raise ValueError(f"pivot: rows and columns are both {rows_axis!r}")
    on = [(xs, acc) for xs, acc in coords if rows_axis in xs and cols_axis in xs]
    rows = list({repr(xs[rows_axis]): xs[rows_axis] for xs, _ in on}.values())
    cols = list({repr(xs[cols_axis]): xs[cols_axis] for xs, _ in on}.values())
    means: list[list[float | None]] = []
    counts: list[list[int]] = []
    for r in rows:
        accs = [[acc for xs, acc in on if xs[rows_axis] == r and xs[cols_axis] == c] for c in cols]
        means.append([float(np.mean(a)) if a else None for a in accs])
        counts.append([len(a) for a in accs])
    return {"rows_axis": rows_axis, "cols_axis": cols_axis, "rows": rows, "cols": cols, "mean_test_acc": means,
            "cells": counts}
