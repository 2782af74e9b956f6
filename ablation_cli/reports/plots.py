"""Paper plots from results.json (matplotlib, optional extra ``ablate[plots]``).

Every figure is written as PNG and PDF, deterministically (no timestamps in the files). Titles, legends
and axes name what the config names (its experiment, dataset, layer configs, representations and
classes) and say what is plotted, in which unit; no other text assumes what a layer config holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli.durable import atomic_write
from ablation_cli.reports.tables import (
    best_on_validation,
    cells_by_name,
    comparisons,
    first_best,
    has_classifiers,
    plotted_layer_configs,
    representations,
    row_key,
    swept_layer_configs,
)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 150, "font.size": 9, "svg.hashsalt": "ablate"})
    return plt


def save_figure(fig: Any, folder: Path, name: str) -> list[Path]:
    """``<name>.png`` and ``<name>.pdf``, each rendered to a temp file and renamed (atomic)."""
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    atomic_write(paths[0], lambda fh: fig.savefig(fh, format="png", metadata={"Software": None},
                                                  bbox_inches="tight"))
    atomic_write(paths[1], lambda fh: fig.savefig(fh, format="pdf", bbox_inches="tight",
                                                  metadata={"CreationDate": None, "Producer": None, "Creator": None}))
    pyplot().close(fig)  # pyplot keeps every figure until closed: a long merge session would pile them up
    return paths


def best_cell(results: Mapping[str, Any], lc: str, with_curves: bool = False) -> Mapping[str, Any] | None:
    """The layer config's best cell by validation accuracy, never test (``with_curves``: among cells
    trained by epochs; an estimator such as logreg has no learning curve)."""
    cells = [c for c in results.get(f"{lc}_results") or []
             if not with_curves or any(curve.get("val_acc") for curve in c.get("learning_curves") or [])]
    return best_on_validation(results, lc, cells)


def _rows_label(results: Mapping[str, Any]) -> str:
    """What a row of the tables (an x tick of the bar charts) is."""
    return "Representation / classifier" if has_classifiers(results) else "Representation"


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def accuracy_bars(results: Mapping[str, Any], folder: Path) -> list[Path]:
    plt = pyplot()
    lcs, by, reps = plotted_layer_configs(results), cells_by_name(results), representations(results)
    if not lcs:
        return []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(reps) + 2), 3.8))
    width = 0.8 / max(len(lcs), 1)
    x = np.arange(len(reps))
    boot = all(by[key].get("test_acc_ci95_rows_runs") for key in by)
    for i, lc in enumerate(lcs):
        means = [by[(r, lc)]["test_acc_mean"] if (r, lc) in by else np.nan for r in reps]
        errs = np.array([_error_bar(by.get((r, lc)), boot) for r in reps]).T  # (2, rows): below, above
        ax.bar(x + (i - (len(lcs) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=lc)
    rates = sorted({c["majority_rate"] for c in ((results.get("statistics") or {}).get("chance") or {}).values()})
    if rates:  # the test set's majority-class rate (not 1/C: classes may be unbalanced)
        ax.axhline(rates[-1], color="gray", linestyle="--", linewidth=1, label="chance (majority class)")
    elif results.get("num_classes"):
        ax.axhline(1 / results["num_classes"], color="gray", linestyle="--", linewidth=1, label="chance (1/classes)")
    ax.set_xticks(x, reps, rotation=30, ha="right")
    ax.set_xlabel(_rows_label(results))
    ax.set_ylabel("Test accuracy (mean; 95% CI over\n" + ("test rows and runs)" if boot else "runs)"))
    ax.set_ylim(0, 1)
    ax.set_title(f"{results['experiment']} on {results['dataset']}: test accuracy by layer config "
                 f"({_runs(int(results['num_runs']))} per cell)")
    ax.legend(loc="upper right", fontsize=8, title="Layer config", title_fontsize=8)
    return save_figure(fig, folder, "accuracy_by_representation")


def _error_bar(cell: Mapping[str, Any] | None, boot: bool) -> tuple[float, float]:
    """(below, above) the mean: the bootstrap CI over test rows and runs where every cell has one, else
    the t-interval over runs clipped to [0, 1]; none for one run or a missing cell."""
    if cell is None:
        return (0.0, 0.0)
    mean = cell["test_acc_mean"]
    if boot:
        lo, hi = cell["test_acc_ci95_rows_runs"]
        return (max(0.0, mean - lo), max(0.0, hi - mean))
    half = cell.get("test_acc_ci95")
    if half is None:
        return (0.0, 0.0)
    return (min(half, mean), min(half, 1.0 - mean))  # clipped to the axis: an accuracy lies in [0, 1]


def _pair_name(src: str, dst: str) -> str:
    """A pair's file-name part; the default pair keeps the name earlier versions gave its files."""
    return "all_to_visual" if (src, dst) == ("all_layers", "visual_only") else f"{src}_to_{dst}"


def drop_chart(results: Mapping[str, Any], folder: Path) -> list[Path]:
    paths: list[Path] = []
    for (src, dst), rows in _plotted_pairs(results).items():
        paths += _drop_chart(rows, src, dst, folder, _rows_label(results))
    return paths


def _plotted_pairs(results: Mapping[str, Any]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The compared pairs of layer configs, but those with a layer sweep's (results.md tables them)."""
    swept = set(swept_layer_configs(results))
    return {pair: rows for pair, rows in _by_pair(comparisons(results)).items() if not swept & set(pair)}


def _by_pair(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["from"], r["to"]), []).append(r)
    return out


def _drop_chart(rows: Sequence[Mapping[str, Any]], src: str, dst: str, folder: Path,
                xlabel: str = "Representation") -> list[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 3.5))
    x = np.arange(len(rows))
    drops = [100 * r["drop_abs"] for r in rows]  # percentage points: 0.62 - 0.36 is a drop of 26 points
    bars = ax.bar(x, drops, color="tab:red")
    for bar, r in zip(bars, rows):
        if r["drop_rel"] is not None:
            ax.annotate(f"{100 * r['drop_rel']:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, [r["representation"] for r in rows], rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Test accuracy drop (points)\n{src} minus {dst}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylim(min(0.0, 1.2 * min(drops)), max(0.0, 1.2 * max(drops)) or 5.0)  # room for the labels
    ax.set_title(f"{src} -> {dst}: test accuracy drop (bar labels: drop relative to {src})")
    return save_figure(fig, folder, f"drop_{_pair_name(src, dst)}")


def learning_curves(results: Mapping[str, Any], folder: Path) -> list[Path]:
    lcs = [lc for lc in plotted_layer_configs(results) if best_cell(results, lc, with_curves=True)]
    if not lcs:
        return []
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(lcs), figsize=(4.2 * len(lcs), 5.5), squeeze=False)
    for j, lc in enumerate(lcs):
        cell = best_cell(results, lc, with_curves=True)
        assert cell is not None
        for k, curve in enumerate(cell["learning_curves"], start=1):
            epochs = np.arange(1, len(curve["val_acc"]) + 1)
            axes[0, j].plot(epochs, curve["val_acc"], linewidth=1, label=f"run {k}")
            axes[1, j].plot(epochs, curve["train_loss"], linewidth=1)
        axes[0, j].set_title(f"{lc}: {row_key(cell)} (best on validation)")
        axes[0, j].set_ylabel("Validation accuracy")
        axes[1, j].set_ylabel("Training loss (cross-entropy)")
        axes[1, j].set_xlabel("Epoch")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(cell["learning_curves"]) <= 10:
            axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, folder, "learning_curves_best")


def mean_confusion(cell: Mapping[str, Any], split: str = "test") -> np.ndarray:
    """Mean over runs of the row-normalised confusion matrix (rows: true class)."""
    mats = []
    for cm in cell["confusion_matrices"]:
        m = np.asarray(cm[split], dtype=np.float64)
        rows = m.sum(axis=1, keepdims=True)
        mats.append(np.divide(m, rows, out=np.zeros_like(m), where=rows > 0))
    return np.mean(mats, axis=0)


def _class_names(results: Mapping[str, Any], n: int) -> list[str]:
    mapping: dict[str, int] = results.get("label_mapping") or {}
    names = sorted(mapping, key=lambda name: mapping[name])
    return names if len(names) == n else [str(i) for i in range(n)]


def confusion_matrices(results: Mapping[str, Any], folder: Path) -> list[Path]:
    lcs = [lc for lc in plotted_layer_configs(results) if best_cell(results, lc)]
    if not lcs:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(lcs), figsize=(4.6 * len(lcs), 4.2), squeeze=False)
    image = None
    for j, lc in enumerate(lcs):
        cell = best_cell(results, lc)
        assert cell is not None
        m = mean_confusion(cell)
        names = _class_names(results, m.shape[0])
        ax = axes[0, j]
        image = ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("Predicted class (test set)")
        if j == 0:
            ax.set_ylabel("True class")
        ax.set_title(f"{lc}: {row_key(cell)} (best on validation)", fontsize=9)
    fig.subplots_adjust(wspace=0.45)
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.8, label="Fraction of true class (mean over runs)")
    return save_figure(fig, folder, "confusion_best")


def per_class_f1(cell: Mapping[str, Any]) -> np.ndarray:
    """Mean over runs of per-class F1, computed from each run's test confusion matrix."""
    scores = []
    for cm in cell["confusion_matrices"]:
        m = np.asarray(cm["test"], dtype=np.float64)
        tp = np.diag(m)
        denom = m.sum(axis=0) + m.sum(axis=1)
        scores.append(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0))
    return np.mean(scores, axis=0)


def per_class_f1_drop(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Per declared pair: per-class F1 of the row whose first cell is best on validation."""
    by = cells_by_name(results)
    paths: list[Path] = []
    for (src, dst), rows in _plotted_pairs(results).items():
        candidates = [by[(r["representation"], src)] for r in rows]
        best = best_on_validation(results, src, candidates) or candidates[0]
        paths += _per_class_f1_pair(results, row_key(best), src, dst, folder)
    return paths


def _per_class_f1_pair(results: Mapping[str, Any], rep: str, src: str, dst: str, folder: Path) -> list[Path]:
    by = cells_by_name(results)
    full, visual = per_class_f1(by[(rep, src)]), per_class_f1(by[(rep, dst)])
    names = _class_names(results, len(full))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, full, 0.4, label=src)
    ax.bar(x + 0.2, visual, 0.4, label=dst)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_xlabel("Class")
    ax.set_ylabel("Test F1 per class (mean over runs)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{src} -> {dst}: test F1 per class, {rep} (best on validation in {src})")
    ax.legend(fontsize=8, title="Layer config", title_fontsize=8)
    name = "per_class_f1_drop" if (src, dst) == ("all_layers", "visual_only") else f"per_class_f1_{src}_to_{dst}"
    return save_figure(fig, folder, name)


def pivot_heatmap(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """plots/pivot_<rows>_x_<cols>: the pivot's mean test accuracy as a heatmap, values written in."""
    pv = results.get("pivot")
    if not pv:
        return []
    from ablation_cli.records import axis_value_text

    def label(v: Any) -> str:
        return axis_value_text(v) if isinstance(v, (int, float)) else str(v)

    plt = pyplot()
    grid = np.array([[np.nan if m is None else m for m in row] for row in pv["mean_test_acc"]], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(pv["cols"]) + 2), max(2.5, 0.45 * len(pv["rows"]) + 1.5)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(np.arange(len(pv["cols"])), [label(c) for c in pv["cols"]], rotation=30, ha="right")
    ax.set_yticks(np.arange(len(pv["rows"])), [label(r) for r in pv["rows"]])
    ax.set_xlabel(pv["cols_axis"])
    ax.set_ylabel(pv["rows_axis"])
    low, high = np.nanmin(grid), np.nanmax(grid)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):  # dark text on the bright end of viridis, white on the dark end
            bright = high > low and (value - low) / (high - low) > 0.6
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="black" if bright else "white", fontsize=8)
    fig.colorbar(image, ax=ax, label="mean test accuracy")
    ax.set_title(f"{results['experiment']} on {results['dataset']}: mean test accuracy")
    name = f"pivot_{pv['rows_axis']}_x_{pv['cols_axis']}".replace(".", "-")
    return save_figure(fig, folder, name)


def layer_sweep(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """plots/layer_sweep: each row's mean test accuracy in every layer config a [layer_sweep] generated, in
    U-Net order, the validation choice marked, beside the named layer configs' as dashed lines."""
    swept = swept_layer_configs(results)
    if not swept:
        return []
    plt = pyplot()
    by, reps = cells_by_name(results), representations(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(swept) + 3), 4.2))
    x = np.arange(len(swept))
    for k, rep in enumerate(reps):
        color = f"C{k % 10}"
        cells = [by.get((rep, lc)) for lc in swept]
        ax.plot(x, [c["test_acc_mean"] if c else np.nan for c in cells], marker="o", markersize=3, linewidth=1,
                color=color, label=rep)
        if (best := first_best([c for c in cells if c is not None])) is not None:  # as the findings name it
            ax.plot(swept.index(best["layer_config"]), best["test_acc_mean"], marker="*", markersize=12, color=color)
        for lc in plotted_layer_configs(results):
            if (rep, lc) in by:
                ax.axhline(by[(rep, lc)]["test_acc_mean"], color=color, linestyle="--", linewidth=0.8)
    ax.set_xticks(x, swept, rotation=90, fontsize=6)
    ax.set_ylabel("Test accuracy (mean over runs)")
    ax.set_ylim(0, 1)
    sweep = (results.get("config") or {}).get("layer_sweep") or {}
    ax.set_title(f"{results['experiment']} on {results['dataset']}: layer sweep by {sweep.get('by')} "
                 f"({sweep.get('mode')}); star: best on validation; dashed: "
                 f"{', '.join(plotted_layer_configs(results)) or 'no named layer config'}", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, folder, "layer_sweep")


def write_all(results: Mapping[str, Any], folder: Path) -> list[Path]:
    paths: list[Path] = []
    for plot in (accuracy_bars, drop_chart, learning_curves, confusion_matrices, per_class_f1_drop, pivot_heatmap,
                 layer_sweep):
        paths += plot(results, folder)
    return paths
