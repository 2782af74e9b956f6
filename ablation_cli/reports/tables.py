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
from typing import Any

import numpy as np

from ablation_cli.status import row_label

DROP_FROM, DROP_TO = "all_layers", "visual_only"
_ID_COLUMNS = ("layer_config", "representation", "cell", "num_layers", "feature_dim", "num_runs")


def layer_configs(results: dict[str, Any]) -> list[str]:
    configured = list((results.get("config") or {}).get("layer_configs") or {})
    present = [k.removesuffix("_results") for k in results if k.endswith("_results")]
    return [lc for lc in configured if lc in present] + sorted(lc for lc in present if lc not in configured)


def row_key(cell: dict[str, Any]) -> str:
    """A cell's row: its representation, and its classifier on a grid with a classifier axis (the drop
    chart and the Welch tests pair cells by it: same representation, same classifier)."""
    return row_label(cell["representation"], cell.get("classifier"))


def cells_by_name(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row_key(c), lc): c for lc in layer_configs(results) for c in results[f"{lc}_results"]}


def representations(results: dict[str, Any]) -> list[str]:
    """The rows, in the config's order (representation major, then classifier)."""
    present = {key for key, _ in cells_by_name(results)}
    config = results.get("config") or {}
    reps = list(config.get("representations") or [])
    classifiers = list(config.get("classifiers") or ["mlp"])
    configured = [row_label(r, c) for r in reps for c in classifiers] if classifiers != ["mlp"] else reps
    return [r for r in configured if r in present] + sorted(present - set(configured))


def has_classifiers(results: dict[str, Any]) -> bool:
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


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per representation with both cells: the drop all_layers -> visual_only and its significance."""
    by = cells_by_name(results)
    rows = []
    for rep in representations(results):
        a, b = by.get((rep, DROP_FROM)), by.get((rep, DROP_TO))
        if not a or not b:
            continue
        runs_a = [r["test_acc"] for r in a["per_run_results"]]
        runs_b = [r["test_acc"] for r in b["per_run_results"]]
        p, d = _welch(runs_a, runs_b)
        drop = a["test_acc_mean"] - b["test_acc_mean"]
        rows.append({
            "representation": rep,
            f"{DROP_FROM}_test_acc": a["test_acc_mean"], f"{DROP_TO}_test_acc": b["test_acc_mean"],
            "drop_abs": drop, "drop_rel": drop / a["test_acc_mean"] if a["test_acc_mean"] else None,
            "welch_p": p, "cohens_d": d, "n_runs": [len(runs_a), len(runs_b)],
        })
    return rows


def _pm(cell: dict[str, Any] | None, key: str = "test_acc") -> str:
    if not cell:
        return "-"
    return f"{cell[key + '_mean']:.4f} ± {cell[key + '_std']:.4f}" + ("*" if cell.get("deterministic") else "")


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 1e-3 else f"{value:.3f}"


def format_results_md(results: dict[str, Any]) -> str:
    lcs, by, reps = layer_configs(results), cells_by_name(results), representations(results)
    comp = {c["representation"]: c for c in comparisons(results)}
    with_drop = DROP_FROM in lcs and DROP_TO in lcs
    header = ["representation / classifier" if has_classifiers(results) else "representation"]
    for lc in lcs:
        header += [f"{lc} test acc", f"{lc} macro F1"]
    if with_drop:
        header += ["drop (abs)", "drop (rel)", "Welch p", "Cohen's d"]
    lines = [f"# {results['experiment']} on {results['dataset']} ({results['num_runs']} runs per cell)", "",
             "Test accuracy mean ± std over runs; macro F1 mean. Drop: all_layers minus visual_only.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rep in reps:
        row = [rep]
        for lc in lcs:
            c = by.get((rep, lc))
            row += [_pm(c), f"{c['test_f1_macro_mean']:.4f}" if c else "-"]
        if with_drop:
            cmp_ = comp.get(rep)
            if cmp_:
                rel = cmp_["drop_rel"]
                d = cmp_["cohens_d"]
                row += [f"{cmp_['drop_abs']:+.4f}", f"{100 * rel:+.1f}%" if rel is not None else "-",
                        _p(cmp_["welch_p"]), f"{d:.2f}" if d is not None else "-"]
            else:
                row += ["-"] * 4
        lines.append("| " + " | ".join(row) + " |")
    if any(c.get("deterministic") for c in by.values()):
        lines += ["", "* deterministic: the classifier does not depend on the seed, so it was fitted once and "
                      "its runs are identical (std 0 is not a measured spread)."]
    if results.get("missing"):
        lines += ["", f"Missing cells (partial merge): {', '.join(results['missing'])}"]
    if results.get("imported"):
        lines += ["", imported_note(results)]
    return "\n".join(lines) + "\n"


def imported_note(results: dict[str, Any]) -> str:
    """The footnote of a table made from cells imported from the original script."""
    imported = results["imported"]
    return (f"Imported from the original script's output ({imported.get('source')}), "
            f"{len(imported.get('cells') or [])} cell(s): its own split and training protocol, numbers as it wrote "
            "them (not recomputed or verified by ablate).")


def metric_columns(results: dict[str, Any]) -> list[str]:
    keys: set[str] = set()
    for cell in cells_by_name(results).values():
        keys.update(k for k in cell if k.endswith(("_mean", "_std", "_ci95")))
    return sorted(keys)


def format_results_csv(results: dict[str, Any]) -> str:
    """Tidy: one row per cell, every aggregate metric a column."""
    by, metrics = cells_by_name(results), metric_columns(results)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    axis = has_classifiers(results)
    columns = [*_ID_COLUMNS[:2], "classifier", "deterministic", *_ID_COLUMNS[2:]] if axis else list(_ID_COLUMNS)
    writer.writerow([*columns, *metrics])
    for lc in layer_configs(results):
        for row in representations(results):
            c = by.get((row, lc))
            if c is None:
                continue
            rep = c["representation"]
            ids = [lc, rep, c.get("cell", f"{lc}_{rep}"), c["num_layers"], c["feature_dim"], c["num_runs"]]
            if axis:
                ids[2:2] = [c.get("classifier") or "mlp", str(bool(c.get("deterministic"))).lower()]
            writer.writerow([*ids, *(repr(float(c[m])) if m in c else "" for m in metrics)])
    return out.getvalue()


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def format_results_tex(results: dict[str, Any]) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); best value of each column in bold."""
    lcs, by, reps = layer_configs(results), cells_by_name(results), representations(results)
    columns: list[tuple[str, str]] = [(lc, key) for lc in lcs for key in ("test_acc", "test_f1_macro")]
    best = {}
    for lc, key in columns:
        values = [by[(rep, lc)][f"{key}_mean"] for rep in reps if (rep, lc) in by]
        best[(lc, key)] = max(values) if values else None
    lines = [
        "% Generated by ablate merge. Requires \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex(results['experiment'])} on {_tex(results['dataset'])}: test accuracy "
        f"(mean $\\pm$ std over {results['num_runs']} runs) and macro F1. Best per column in bold.}}",
        f"\\begin{{tabular}}{{l{'cc' * len(lcs)}}}",
        "\\toprule",
        " & ".join(["Representation", *(f"\\multicolumn{{2}}{{c}}{{{_tex(lc)}}}" for lc in lcs)]) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(lcs))),
        " & ".join(["", *(["Accuracy", "Macro F1"] * len(lcs))]) + " \\\\",
        "\\midrule",
    ]
    for rep in reps:
        cells = [_tex(rep)]
        for lc, key in columns:
            c = by.get((rep, lc))
            if c is None:
                cells.append("--")
                continue
            mean = c[f"{key}_mean"]
            text = f"{mean:.3f} $\\pm$ {c[f'{key}_std']:.3f}" if key == "test_acc" else f"{mean:.3f}"
            cells.append(f"\\textbf{{{text}}}" if mean == best[(lc, key)] else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if results.get("imported"):
        lines.append(f"\\par\\footnotesize {_tex(imported_note(results))}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
