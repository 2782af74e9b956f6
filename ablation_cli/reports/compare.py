"""``ablate compare``: how each cell's accuracy changes across datasets (e.g. 10k vs 50k).

Experiments are paired by cell name (layer config, representation), never by position.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ablation_cli.durable import atomic_write_text
from ablation_cli.errors import ExperimentError
from ablation_cli.reports.plots import have_matplotlib, pyplot, save_figure
from ablation_cli.reports.tables import cells_by_name, layer_configs, representations
from ablation_cli.store import ExperimentStore


def load_results(path: Path, experiment: str | None = None) -> dict[str, Any]:
    """A results.json, an experiment folder, or an output folder holding one experiment (or ``experiment``,
    by folder or experiment name, among several)."""
    target = path if path.is_file() else ExperimentStore.find(path, experiment=experiment).results_file
    try:
        doc = json.loads(target.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"no results.json in {target.parent}", hint="run `ablate merge` there first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{target} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or not any(k.endswith("_results") for k in doc):
        raise ExperimentError(f"{target} is not an ablate results.json")
    return doc


def _size(results: dict[str, Any]) -> int:
    return int((results.get("dataset_info") or {}).get("num_samples") or 0)


def order(all_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Smallest dataset first (then by name), whatever order the folders were given in."""
    return sorted(all_results, key=lambda r: (_size(r), r["dataset"]))


def comparison_rows(all_results: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    ordered = order(all_results)
    names = [f"{r['dataset']} (n={_size(r)})" for r in ordered]
    lcs = list(dict.fromkeys(lc for r in ordered for lc in layer_configs(r)))
    reps = list(dict.fromkeys(rep for r in ordered for rep in representations(r)))
    maps = [cells_by_name(r) for r in ordered]
    rows = []
    for lc in lcs:
        for rep in reps:
            accs = [m[(rep, lc)]["test_acc_mean"] if (rep, lc) in m else None for m in maps]
            stds = [m[(rep, lc)]["test_acc_std"] if (rep, lc) in m else None for m in maps]
            if all(a is None for a in accs):
                continue
            first, last = accs[0], accs[-1]
            change = last - first if first is not None and last is not None else None
            rows.append({"layer_config": lc, "representation": rep, "test_acc": accs, "test_acc_std": stds,
                         "change": change})
    return names, rows


def format_compare_md(all_results: list[dict[str, Any]]) -> str:
    names, rows = comparison_rows(all_results)
    header = ["layer config", "representation", *names, "change (first -> last)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        accs = [f"{a:.4f} ± {s:.4f}" if a is not None else "-" for a, s in zip(row["test_acc"], row["test_acc_std"])]
        change = f"{row['change']:+.4f}" if row["change"] is not None else "-"
        lines.append("| " + " | ".join([row["layer_config"], row["representation"], *accs, change]) + " |")
    lines += ["", "Test accuracy: mean ± std over each experiment's runs (population std, ddof 0, the original "
                  "script's convention); change: the last dataset's mean minus the first's (unpaired: the "
                  "datasets share no test rows)."]
    return "\n".join(lines) + "\n"


def format_compare_csv(all_results: list[dict[str, Any]]) -> str:
    ordered = order(all_results)
    _, rows = comparison_rows(all_results)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer_config", "representation", "dataset", "num_samples", "test_acc_mean", "test_acc_std"])
    for row in rows:
        for res, acc, std in zip(ordered, row["test_acc"], row["test_acc_std"]):
            if acc is not None:
                writer.writerow([row["layer_config"], row["representation"], res["dataset"], _size(res),
                                 repr(acc), repr(std)])
    return out.getvalue()


def compare_plot(all_results: list[dict[str, Any]], folder: Path) -> list[Path]:
    plt = pyplot()
    ordered = order(all_results)
    _, rows = comparison_rows(all_results)
    lcs = list(dict.fromkeys(r["layer_config"] for r in rows))
    sizes = [_size(r) or i + 1 for i, r in enumerate(ordered)]
    fig, axes = plt.subplots(1, len(lcs), figsize=(4.6 * len(lcs), 3.8), squeeze=False, sharey=True)
    for j, lc in enumerate(lcs):
        ax = axes[0, j]
        for row in (r for r in rows if r["layer_config"] == lc):
            points = [(s, a) for s, a in zip(sizes, row["test_acc"]) if a is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1,
                    label=row["representation"])
        ax.set_xscale("log")
        ax.set_xticks(sizes, [r["dataset"] for r in ordered])
        ax.minorticks_off()
        ax.set_xlabel("Dataset (number of LoRAs, log scale)")
        ax.set_title(lc)
        if j == 0:
            ax.set_ylabel("Test accuracy (mean over runs)")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, folder, "comparison")


def write_comparison(all_results: list[dict[str, Any]], out: Path) -> list[Path]:
    """comparison.md and comparison.csv in ``out``, and the plot when matplotlib is installed."""
    written = [out / "comparison.md", out / "comparison.csv"]
    atomic_write_text(written[0], format_compare_md(all_results))
    atomic_write_text(written[1], format_compare_csv(all_results))
    if have_matplotlib():
        written += compare_plot(all_results, out)
    return written
