"""``ablate compare``: how each cell's accuracy changes across datasets (e.g. 10k vs 50k).

Experiments are paired by cell name (layer config, representation), never by position. Where they differ
in more than their data (hyperparameters, classes, split), ``compare_warnings`` names what: a change of
accuracy is then not the dataset's alone.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation_cli.durable import atomic_write_text
from ablation_cli.errors import ExperimentError
from ablation_cli.reports.plots import have_matplotlib, pyplot, save_figure
from ablation_cli.reports.tables import cells_by_name, layer_configs, representations
from ablation_cli.store import ExperimentStore
from ablation_cli.training.classifiers import EXECUTION_ONLY


def load_results(path: Path, experiment: str | None = None) -> Mapping[str, Any]:
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


def _size(results: Mapping[str, Any]) -> int:
    return int((results.get("dataset_info") or {}).get("num_samples") or 0)


def order(all_results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Smallest dataset first (then by name), whatever order the folders were given in."""
    return sorted(all_results, key=lambda r: (_size(r), r["dataset"]))


# the resolved config's sections (experiment.json's `config`, copied into results.json) whose settings
# change what a cell's accuracy means; the execution-only ones (how runs are scheduled) do not
HYPERPARAMETERS = ("classifier", "training", "estimators")
SCHEDULING_ONLY = {f"training.{key}" for key in EXECUTION_ONLY}
_NONE = object()


def _flat(value: object, prefix: str) -> dict[str, object]:
    """A config section as dotted keys: ``{"training.lr": 0.001, ...}``."""
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _show(value: object) -> str:
    if value is _NONE or value is None:
        return "(none)"
    return value if isinstance(value, str) else json.dumps(value)


def _changes(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    return [f"{key}: {_show(old.get(key, _NONE))} -> {_show(new.get(key, _NONE))}"
            for key in sorted(set(old) | set(new)) if old.get(key, _NONE) != new.get(key, _NONE)]


def _sections(results: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, object] | None:
    """The config's ``names`` sections as dotted keys; None for a results.json without a resolved config
    (the original script's, or an imported experiment's): nothing to compare."""
    config = results.get("config") or {}
    if not any(name in config for name in names):
        return None
    flat: dict[str, object] = {}
    for name in names:
        if name in config:
            flat.update(_flat(config[name], name))
    return {k: v for k, v in flat.items() if k not in SCHEDULING_ONLY}


def _class_changes(old: Mapping[str, Any], new: Mapping[str, Any], most: int = 6) -> list[str]:
    changes = []
    if old.get("num_classes") is not None and new.get("num_classes") is not None \
            and old["num_classes"] != new["num_classes"]:
        changes.append(f"num_classes: {old['num_classes']} -> {new['num_classes']}")
    a, b = old.get("label_mapping"), new.get("label_mapping")
    if isinstance(a, dict) and isinstance(b, dict) and a != b:
        names = sorted(set(a) | set(b), key=lambda n: (min(x for x in (a.get(n), b.get(n)) if x is not None), n))
        moved = [f"{n}: {_show(a.get(n, _NONE))} -> {_show(b.get(n, _NONE))}" for n in names if a.get(n) != b.get(n)]
        more = f", and {len(moved) - most} more" if len(moved) > most else ""
        changes.append(f"label_mapping: {', '.join(moved[:most])}{more}")
    return changes


def _labels(ordered: Sequence[Mapping[str, Any]]) -> list[str]:
    """How a warning names each experiment: as the table's columns, with more where two would look alike."""
    labels = [f"{r['dataset']} (n={_size(r)})" for r in ordered]
    if len(set(labels)) < len(labels):
        labels = [f"{r.get('experiment', '?')} on {label}" for r, label in zip(ordered, labels)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{i}]" for i, label in enumerate(labels, start=1)]
    return labels


def compare_warnings(all_results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per way each experiment differs from the first (the smallest dataset) beyond its data:
    hyperparameters (the config's classifier, training and estimators settings), classes (num_classes,
    label_mapping) and split (the config's ``split``), each differing field named ``old -> new``."""
    ordered = order(all_results)
    labels = _labels(ordered)
    first = ordered[0]
    lines = []
    for label, other in zip(labels[1:], ordered[1:]):
        found = []
        for what, names in (("hyperparameters", HYPERPARAMETERS), ("split", ("split",))):
            old, new = _sections(first, names), _sections(other, names)
            if old is not None and new is not None and (changes := _changes(old, new)):
                found.append((what, changes))
        if classes := _class_changes(first, other):
            found.append(("classes", classes))
        order_of = {"hyperparameters": 0, "classes": 1, "split": 2}
        for what, changes in sorted(found, key=lambda item: order_of[item[0]]):
            verb = "differs" if what == "split" else "differ"
            lines.append(f"{what} {verb} from {labels[0]} to {label}: {'; '.join(changes)}")
    return lines


@dataclass(frozen=True)
class CompareRow:
    """One cell across the experiments, smallest dataset first: its test accuracy in each (None: absent)."""

    layer_config: str
    representation: str
    test_acc: list[float | None]
    test_acc_std: list[float | None]
    change: float | None  # the last dataset's mean minus the first's


def comparison_rows(all_results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[CompareRow]]:
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
            rows.append(CompareRow(lc, rep, accs, stds, change))
    return names, rows


def format_compare_md(all_results: Sequence[Mapping[str, Any]]) -> str:
    names, rows = comparison_rows(all_results)
    header = ["layer config", "representation", *names, "change (first -> last)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        accs = [f"{a:.4f} ± {s:.4f}" if a is not None else "-" for a, s in zip(row.test_acc, row.test_acc_std)]
        change = f"{row.change:+.4f}" if row.change is not None else "-"
        lines.append("| " + " | ".join([row.layer_config, row.representation, *accs, change]) + " |")
    lines += ["", "Test accuracy: mean ± std over each experiment's runs (population std, ddof 0, the original "
                  "script's convention); change: the last dataset's mean minus the first's (unpaired: the "
                  "datasets share no test rows)."]
    if warnings := compare_warnings(all_results):
        lines += ["", "Warning: these experiments differ in more than their dataset, so a change is not the "
                      "dataset's alone:", *(f"- {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


def format_compare_csv(all_results: Sequence[Mapping[str, Any]]) -> str:
    ordered = order(all_results)
    _, rows = comparison_rows(all_results)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer_config", "representation", "dataset", "num_samples", "test_acc_mean", "test_acc_std"])
    for row in rows:
        for res, acc, std in zip(ordered, row.test_acc, row.test_acc_std):
            if acc is not None:
                writer.writerow([row.layer_config, row.representation, res["dataset"], _size(res),
                                 repr(acc), repr(std)])
    return out.getvalue()


def compare_plot(all_results: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    plt = pyplot()
    ordered = order(all_results)
    _, rows = comparison_rows(all_results)
    lcs = list(dict.fromkeys(r.layer_config for r in rows))
    sizes = [_size(r) or i + 1 for i, r in enumerate(ordered)]
    fig, axes = plt.subplots(1, len(lcs), figsize=(4.6 * len(lcs), 3.8), squeeze=False, sharey=True)
    for j, lc in enumerate(lcs):
        ax = axes[0, j]
        for row in (r for r in rows if r.layer_config == lc):
            points = [(s, a) for s, a in zip(sizes, row.test_acc) if a is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1,
                    label=row.representation)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [r["dataset"] for r in ordered])
        ax.minorticks_off()
        ax.set_xlabel("Dataset (number of LoRAs, log scale)")
        ax.set_title(lc)
        if j == 0:
            ax.set_ylabel("Test accuracy (mean over runs)")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="Representation",
                       title_fontsize=7)
    fig.suptitle(f"Test accuracy by dataset: {' -> '.join(r['dataset'] for r in ordered)}")
    return save_figure(fig, folder, "comparison")


def write_comparison(all_results: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """comparison.md and comparison.csv in ``out``, and the plot when matplotlib is installed."""
    written = [out / "comparison.md", out / "comparison.csv"]
    atomic_write_text(written[0], format_compare_md(all_results))
    atomic_write_text(written[1], format_compare_csv(all_results))
    if have_matplotlib():
        written += compare_plot(all_results, out)
    return written
