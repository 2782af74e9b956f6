"""Pure builders of the paper tables: results.md, results.csv, results.tex, and the
all_layers -> visual_only comparison (Welch's t-test, effect size) behind them.

Cells are always looked up by (row, layer config) name, never by list position: the order of the
lists in results.json does not change any table. A row is a representation, or on a grid with a
classifier axis a (representation, classifier) pair, shown as ``<representation> / <classifier>``.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ablation_cli.config import default_comparison_pairs
from ablation_cli.records import DEFAULT_CLASSIFIER, axis_value_text, classifier_name
from ablation_cli.status import row_label

_ID_COLUMNS = ("layer_config", "representation", "cell", "num_layers", "feature_dim", "num_runs")


def layer_configs(results: Mapping[str, Any]) -> list[str]:
    configured = list((results.get("config") or {}).get("layer_configs") or {})
    present = [k.removesuffix("_results") for k in results if k.endswith("_results")]
    return [lc for lc in configured if lc in present] + sorted(lc for lc in present if lc not in configured)


def swept_layer_configs(results: Mapping[str, Any]) -> list[str]:
    """The layer configs a ``[layer_sweep]`` generated: those of the results that the config does not name."""
    config = results.get("config") or {}
    if not config.get("layer_sweep"):
        return []
    named = set(config.get("layer_configs") or {})
    return [lc for lc in layer_configs(results) if lc not in named]


def plotted_layer_configs(results: Mapping[str, Any]) -> list[str]:
    """The layer configs the plots draw one by one: all but a layer sweep's (plots/layer_sweep draws those)."""
    swept = set(swept_layer_configs(results))
    return [lc for lc in layer_configs(results) if lc not in swept]


def row_key(cell: Mapping[str, Any]) -> str:
    """A cell's row: its representation, and its classifier on a grid with a classifier axis (the drop
    chart and the Welch tests pair cells by it: same representation, same classifier)."""
    return row_label(cell["representation"], cell.get("classifier"), cell.get("axes"))


def cells_by_name(results: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(row_key(c), lc): c for lc in layer_configs(results) for c in results[f"{lc}_results"]}


def representations(results: Mapping[str, Any]) -> list[str]:
    """The rows, in the config's order (representation major, then classifier)."""
    present = list(dict.fromkeys(key for key, _ in cells_by_name(results)))
    config = results.get("config") or {}
    reps = list(config.get("representations") or [])
    classifiers = list(config.get("classifiers") or [DEFAULT_CLASSIFIER])
    axis = classifiers != [DEFAULT_CLASSIFIER]
    configured = [row_label(r, c) for r in reps for c in classifiers] if axis else reps
    return [r for r in configured if r in present] + [r for r in present if r not in configured]  # grid order


def has_classifiers(results: Mapping[str, Any]) -> bool:
    return any(c.get("classifier") for c in cells_by_name(results).values())


def _var(x: list[float]) -> float:
    """Sample variance; exactly 0 for identical runs (a deterministic classifier's), where np.var can
    leave ~1e-34 of rounding (the mean of three 0.3375 is not 0.3375) and Cohen's d would be 1e16."""
    return 0.0 if len(set(x)) == 1 else float(np.var(x, ddof=1))


def _welch(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """Welch's t-test p-value and Cohen's d (pooled sd) of a vs b; None where undefined."""
    from scipy import stats  # slow to import: only for the statistics between layer configs

    if len(a) < 2 or len(b) < 2:
        return None, None
    va, vb = _var(a), _var(b)
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    d = (float(np.mean(a)) - float(np.mean(b))) / pooled if pooled > 0 else None
    if va == 0 and vb == 0:
        return None, d
    with warnings.catch_warnings():  # near-identical runs: scipy warns about precision, p is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return (p if math.isfinite(p) else None), d


def comparison_pairs(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The layer-config pairs compared per row: ``[reports] compare`` where configured, else every layer
    config against the first, with all_layers minus visual_only first wherever both exist."""
    present = layer_configs(results)
    configured = ((results.get("config") or {}).get("reports") or {}).get("compare")
    if configured is not None:
        return [(a, b) for a, b in configured if a in present and b in present]
    return default_comparison_pairs(present)


def _effects(results: Mapping[str, Any]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    """The paired layer-config differences of results.json's statistics, by (from, to, row)."""
    out = {}
    for effect in (results.get("statistics") or {}).get("layer_effects") or []:
        for rec in effect["rows"]:
            out[(effect["from"], effect["to"], rec["row"])] = rec
    return out


def comparisons(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per declared pair of layer configs and per row with both cells: the drop from one to the other,
    the paired difference (CI, p, Holm-adjusted p) where predictions were stored, and the unpaired
    Welch test and Cohen's d over runs that earlier versions reported."""
    by, effects = cells_by_name(results), _effects(results)
    rows: list[dict[str, Any]] = []
    for src, dst in comparison_pairs(results):
        for rep in representations(results):
            a, b = by.get((rep, src)), by.get((rep, dst))
            if not a or not b:
                continue
            runs_a = [r["test_acc"] for r in a["per_run_results"]]
            runs_b = [r["test_acc"] for r in b["per_run_results"]]
            p, d = _welch(runs_a, runs_b)
            drop = a["test_acc_mean"] - b["test_acc_mean"]
            paired = effects.get((src, dst, rep)) or {}
            rows.append({
                "representation": rep, "from": src, "to": dst,
                f"{src}_test_acc": a["test_acc_mean"], f"{dst}_test_acc": b["test_acc_mean"],
                "drop_abs": drop, "drop_rel": drop / a["test_acc_mean"] if a["test_acc_mean"] else None,
                "welch_p": p, "cohens_d": d, "n_runs": [len(runs_a), len(runs_b)],
                "paired_diff": paired.get("diff"), "paired_ci95": paired.get("ci95"),
                "paired_p": paired.get("p"), "paired_p_holm": paired.get("p_holm"),
                "paired_p_bound": paired.get("p_bound"),
            })
    return rows


def _pm(cell: Mapping[str, Any] | None, key: str = "test_acc") -> str:
    if not cell:
        return "-"
    return f"{cell[key + '_mean']:.4f} ± {cell[key + '_std']:.4f}" + ("*" if cell.get("deterministic") else "")


def _p(value: float | None, bound: bool = False) -> str:
    """A p-value; ``bound``: one from a bootstrap p at its floor 1/B, only an upper bound ("≤")."""
    if value is None:
        return "n/a"
    if bound:
        return f"≤{value:.2g}"
    return "<0.001" if value < 1e-3 else f"{value:.3f}"


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "n/a"


def _runs_ci(cell: Mapping[str, Any] | None, key: str = "test_acc") -> str:
    """The t-interval over runs: mean ± half-width; n/a for one run (no spread to measure)."""
    if not cell or cell.get(f"{key}_ci95") is None:
        return "n/a" if cell else "-"
    mean, half = cell[f"{key}_mean"], cell[f"{key}_ci95"]
    return f"[{mean - half:.4f}, {mean + half:.4f}]" + ("*" if cell.get("deterministic") else "")


def split_note(results: Mapping[str, Any]) -> str:
    """n_test and the split sizes, from the statistics (the rows every run was tested on)."""
    stats = results.get("statistics") or {}
    sizes = stats.get("split_sizes")
    if not sizes:
        return "Split sizes: not recorded (cells made before ablate stored predictions)."
    how = " (resampled per run)" if (stats.get("settings") or {}).get("split") == "resampled per run" else ""
    return (f"n_test = {sizes['test']} rows; split{how}: {sizes['train']} / {sizes['val']} / {sizes['test']} "
            "(train / val / test).")


def vs_best_table(results: Mapping[str, Any]) -> list[str]:
    """Per layer config: the best cell on validation, and every other cell compared with it."""
    stats = results.get("statistics") or {}
    if not stats.get("vs_best"):
        return ["No paired comparisons: the cells have no stored test predictions (made before ablate stored "
                "them, or imported); `ablate reset` and `ablate run` retrain them with predictions."]
    settings = stats["settings"]
    ids = {c["cell"]: c for c in cells_by_name(results).values() if "cell" in c}
    lines = [f"Best: the highest validation accuracy (mean over runs; ties: the grid's order). Each other cell "
             f"minus the best, {settings['paired_test']} over the same test rows and runs; p Holm-adjusted over "
             f"the comparisons of each layer config; tied: adjusted p >= {settings['alpha']:g}; ≤: a bound, "
             "the bootstrap's resolution.", "",
             "| layer config | row | val acc | test acc | diff vs best [95% CI] | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for lc, block in stats["vs_best"].items():
        lines.append(f"| {lc} | {block['best_row']} | {block['best_val_acc']:.4f} | {block['best_test_acc']:.4f} "
                     "| - | - | - | best (validation) |")
        for rec in block["comparisons"]:
            cell = ids.get(rec["cell"], {})
            val, acc = cell.get("val_acc_mean", float("nan")), cell.get("test_acc_mean", float("nan"))
            lines.append(f"| {lc} | {row_key(cell) if cell else rec['cell']} | {val:.4f} "
                         f"| {acc:.4f} | {rec['diff']:+.4f} {_ci(rec['ci95'])} "
                         f"| {_p(rec['p'], rec.get('p_bound', False))} "
                         f"| {_p(rec['p_holm'], rec.get('p_bound', False))} | {rec['verdict']} |")
        for cid in block.get("not_compared") or []:
            cell = ids.get(cid, {})
            why = "the best has no stored predictions" if not block.get("best_has_predictions", True) else \
                "no stored predictions, or other test rows"
            lines.append(f"| {lc} | {row_key(cell) if cell else cid} | {cell.get('val_acc_mean', float('nan')):.4f} "
                         f"| {cell.get('test_acc_mean', float('nan')):.4f} | n/a | n/a | n/a | not compared ({why}) |")
    return lines


def effects_table(results: Mapping[str, Any]) -> list[str]:
    rows = comparisons(results)
    if not rows:
        return []
    lines = ["Drop: the first layer config's test accuracy minus the second's (mean over runs). Paired: the same "
             "difference with its 95% CI and p over the same test rows and runs, Holm-adjusted over the rows of "
             "each pair. Welch p and Cohen's d: unpaired, over runs only (earlier versions' test).", "",
             "| layer configs | row | drop (abs) | drop (rel) | paired diff [95% CI] | p (Holm) | Welch p "
             "| Cohen's d |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel, d = r["drop_rel"], r["cohens_d"]
        paired = (f"{r['paired_diff']:+.4f} {_ci(r['paired_ci95'])}" if r["paired_diff"] is not None else "n/a")
        rel_text = f"{100 * rel:+.1f}%" if rel is not None else "-"
        d_text = f"{d:.2f}" if d is not None else "-"
        holm_p = _p(r["paired_p_holm"], bool(r["paired_p_bound"]))
        lines.append(f"| {r['from']} - {r['to']} | {r['representation']} | {r['drop_abs']:+.4f} | {rel_text} "
                     f"| {paired} | {holm_p} | {_p(r['welch_p'])} | {d_text} |")
    return lines


def main_effects_table(results: Mapping[str, Any]) -> list[str]:
    """A sweep's main effects: per axis, each value's mean over the other axes and its paired difference
    from the axis's first value."""
    effects = (results.get("statistics") or {}).get("main_effects") or []
    if not effects:
        return []
    test = (results.get("statistics") or {}).get("settings", {}).get("paired_test", "paired bootstrap")
    lines = ["Each value of an axis: its cells' mean test accuracy (over the other axes), and its difference "
             "from the axis's first value, averaged over the pairs of cells equal on every other axis, with "
             f"the 95% CI and p of the {test} over the same test rows and runs (Holm over the values of each "
             "axis)."]
    for effect in effects:
        lines += ["", f"### {effect['axis']}", "", "| value | cells | mean test acc | diff vs "
                  f"{_value(effect['baseline'])} [95% CI] | pairs | p (Holm) |", "|---|---|---|---|---|---|"]
        for row in effect["values"]:
            if "diff" not in row:
                lines.append(f"| {_value(row['value'])} | {row['cells']} | {row['mean_test_acc']:.4f} | - | - | - |")
                continue
            diff = f"{row['diff']:+.4f} {_ci(row['ci95'])}" if row.get("diff") is not None else "n/a"
            lines.append(f"| {_value(row['value'])} | {row['cells']} | {row['mean_test_acc']:.4f} | {diff} "
                         f"| {row['pairs']} | {_p(row.get('p_holm'), bool(row.get('p_bound')))} |")
    return lines


def pivot_table(results: Mapping[str, Any]) -> list[str]:
    """The pivot of ``[reports] pivot`` / ``merge --rows --cols``: mean test accuracy by two axes."""
    pv = results.get("pivot")
    if not pv:
        return []
    lines = [f"Mean test accuracy by {pv['rows_axis']} (rows) and {pv['cols_axis']} (columns), each entry over the "
             "cells with both values (the other axes averaged; their number in brackets).", "",
             "| " + " | ".join([f"{pv['rows_axis']} \\ {pv['cols_axis']}", *map(_value, pv["cols"])]) + " |",
             "|" + "|".join("---" for _ in range(len(pv["cols"]) + 1)) + "|"]
    for r, means, counts in zip(pv["rows"], pv["mean_test_acc"], pv["cells"]):
        entries = [f"{m:.4f} ({n})" if m is not None else "-" for m, n in zip(means, counts)]
        lines.append("| " + " | ".join([_value(r), *entries]) + " |")
    return lines


def _value(value: Any) -> str:
    return axis_value_text(value) if isinstance(value, (int, float)) else str(value)


def format_results_md(results: Mapping[str, Any]) -> str:
    lcs, by, reps = layer_configs(results), cells_by_name(results), representations(results)
    header = ["representation / classifier" if has_classifiers(results) else "representation"]
    for lc in lcs:
        header += [f"{lc} test acc", f"{lc} CI runs", f"{lc} CI rows×runs", f"{lc} macro F1"]
    lines = [f"# {results['experiment']} on {results['dataset']} ({results['num_runs']} runs per cell)", ""]
    text = (results.get("findings") or {}).get("text")
    if text:
        lines += ["## Findings", "", text, ""]
    lines += ["## Test accuracy", "",
              "Test acc: mean ± std over runs (population std, ddof 0, the original script's convention). "
              "CI runs: 95% t-interval over runs (seed variance only; sample std, ddof 1). CI rows×runs: 95% "
              "percentile bootstrap over test rows and runs (includes the sampling of the test set). Macro F1: "
              "mean over runs. " + split_note(results), "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rep in reps:
        row = [rep]
        for lc in lcs:
            c = by.get((rep, lc))
            row += [_pm(c), _runs_ci(c), _ci(c.get("test_acc_ci95_rows_runs")) if c else "-",
                    f"{c['test_f1_macro_mean']:.4f}" if c else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Compared with the best cell of each layer config", "", *vs_best_table(results)]
    effects = effects_table(results)
    if effects:
        lines += ["", "## Layer configs compared", "", *effects]
    if main := main_effects_table(results):
        lines += ["", "## Main effects", "", *main]
    if pv := pivot_table(results):
        lines += ["", f"## Pivot: {results['pivot']['rows_axis']} x {results['pivot']['cols_axis']}", "", *pv]
    if any(c.get("deterministic") for c in by.values()):
        lines += ["", "* deterministic: the seeds change nothing (no random_state, or one that the estimator "
                      "ignores), so its runs are one measurement (std 0 is not a measured spread)."]
    if results.get("missing"):
        lines += ["", f"Missing cells (partial merge): {', '.join(results['missing'])}"]
    if results.get("imported"):
        lines += ["", imported_note(results)]
    return "\n".join(lines) + "\n"


def imported_note(results: Mapping[str, Any]) -> str:
    """The footnote of a table made from cells imported from the original script."""
    imported = results["imported"]
    return (f"Imported from the original script's output ({imported.get('source')}), "
            f"{len(imported.get('cells') or [])} cell(s): its own split and training protocol, numbers as it wrote "
            "them (not recomputed or verified by ablate).")


def metric_columns(results: Mapping[str, Any]) -> list[str]:
    keys: set[str] = set()
    for cell in cells_by_name(results).values():
        keys.update(k for k in cell if k.endswith(("_mean", "_std", "_ci95")))
    return sorted(keys)


def format_results_csv(results: Mapping[str, Any]) -> str:
    """Tidy: one row per cell, every aggregate metric a column."""
    by, metrics = cells_by_name(results), metric_columns(results)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    axis = has_classifiers(results)
    columns = [*_ID_COLUMNS[:2], "classifier", "deterministic", *_ID_COLUMNS[2:]] if axis else list(_ID_COLUMNS)
    writer.writerow([*columns, *metrics, *STATISTICS_COLUMNS])
    for lc in layer_configs(results):
        for row in representations(results):
            c = by.get((row, lc))
            if c is None:
                continue
            rep = c["representation"]
            ids = [lc, rep, c.get("cell", f"{lc}_{rep}"), c["num_layers"], c["feature_dim"], c["num_runs"]]
            if axis:
                ids[2:2] = [classifier_name(c.get("classifier")), str(bool(c.get("deterministic"))).lower()]
            writer.writerow([*ids, *(_number(c.get(m)) for m in metrics), *_statistics_columns(results, c)])
    return out.getvalue()


STATISTICS_COLUMNS = ("test_acc_ci95_rows_runs_lo", "test_acc_ci95_rows_runs_hi", "vs_best", "vs_best_diff",
                      "vs_best_p", "vs_best_p_holm", "vs_best_p_is_bound", "above_chance", "above_chance_p_holm")


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def vs_best(results: Mapping[str, Any], cell: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The cell's comparison with the best of its layer config ({"verdict": "best"} for the best)."""
    block = ((results.get("statistics") or {}).get("vs_best") or {}).get(cell["layer_config"])
    if not block:
        return None
    if block["best"] == cell.get("cell"):
        return {"verdict": "best"}
    return next((rec for rec in block["comparisons"] if rec["cell"] == cell.get("cell")), None)


def _statistics_columns(results: Mapping[str, Any], cell: Mapping[str, Any]) -> list[str]:
    boot = cell.get("test_acc_ci95_rows_runs") or [None, None]
    rec = vs_best(results, cell) or {}
    chance = ((results.get("statistics") or {}).get("chance") or {}).get(cell.get("cell")) or {}
    above = chance.get("above")
    bound = rec.get("p_bound")
    return [_number(boot[0]), _number(boot[1]), rec.get("verdict", ""), _number(rec.get("diff")),
            _number(rec.get("p")), _number(rec.get("p_holm")), "" if bound is None else str(bound).lower(),
            "" if above is None else str(above).lower(),
            _number(chance.get("p_holm"))]


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def best_on_validation(results: Mapping[str, Any], lc: str,
                       cells: list[Mapping[str, Any]] | None = None) -> Mapping[str, Any] | None:
    """The layer config's best cell by validation accuracy (never test), ties broken by the table's
    row order; None where no cell recorded a validation accuracy. ``cells``: choose among these."""
    by = cells_by_name(results)
    ordered = [by[(rep, lc)] for rep in representations(results) if (rep, lc) in by]
    if cells is not None:
        ordered = [c for c in ordered if any(c is x for x in cells)]
    return first_best(ordered)


def first_best(cells: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The cell of best mean validation accuracy (to 9 decimals: means of different runs differ in the last
    bits), the first of those tied; None where no cell recorded one."""
    scored = [(round(float(c["val_acc_mean"]), 9), -i) for i, c in enumerate(cells)
              if c.get("val_acc_mean") is not None]
    return cells[-max(scored)[1]] if scored else None


def format_results_tex(results: Mapping[str, Any]) -> str:
    """A booktabs table (needs \\usepackage{booktabs}): per layer config accuracy, macro F1 and the
    Holm-adjusted p against the best cell on validation (in bold); a dagger marks a cell worse than it."""
    lcs, by, reps = layer_configs(results), cells_by_name(results), representations(results)
    best = {lc: best_on_validation(results, lc) for lc in lcs}
    lines = [
        "% Generated by ablate merge. Requires \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex(results['experiment'])} on {_tex(results['dataset'])}: test accuracy "
        f"(mean $\\pm$ population std over {results['num_runs']} runs) and macro F1. Bold: the best cell of each "
        "layer config on validation accuracy; $p$: paired against it, Holm-adjusted; $\\dagger$: worse than it. "
        f"{_tex(split_note(results))}}}",
        f"\\begin{{tabular}}{{l{'ccc' * len(lcs)}}}",
        "\\toprule",
        " & ".join(["Representation", *(f"\\multicolumn{{3}}{{c}}{{{_tex(lc)}}}" for lc in lcs)]) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(lcs))),
        " & ".join(["", *(["Accuracy", "Macro F1", "$p$"] * len(lcs))]) + " \\\\",
        "\\midrule",
    ]
    for rep in reps:
        cells = [_tex(rep)]
        for lc in lcs:
            c = by.get((rep, lc))
            if c is None:
                cells += ["--"] * 3
                continue
            acc = f"{c['test_acc_mean']:.3f} $\\pm$ {c['test_acc_std']:.3f}"
            f1 = f"{c['test_f1_macro_mean']:.3f}"
            rec = vs_best(results, c) or {}
            if c is best[lc]:
                acc, f1 = f"\\textbf{{{acc}}}", f"\\textbf{{{f1}}}"
            elif rec.get("verdict") == "worse":
                acc += "$^\\dagger$"
            p = "--" if c is best[lc] or "p_holm" not in rec else \
                _p(rec["p_holm"], rec.get("p_bound", False)).replace("<", "$<$").replace("≤", "$\\leq$")
            cells += [acc, f1, p]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if results.get("imported"):
        lines.append(f"\\par\\footnotesize {_tex(imported_note(results))}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
