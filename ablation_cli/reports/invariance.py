"""The invariance audit's document (invariance.json), its table (invariance.md) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np

from ablation_cli.durable import atomic_write_json, atomic_write_text
from ablation_cli.reports.plots import have_matplotlib, pyplot, save_figure


class FeatureChange(TypedDict):
    """One representation under one transform. Per feature: its largest change over the LoRAs relative to
    its largest magnitude (before or after); the largest and the median of those, and the share above
    the tolerance."""

    max_rel_change: float
    median_rel_change: float
    features_moved: float


class RepAudit(TypedDict):
    name: str
    invariant: bool  # flagged invariant in the registry
    in_experiment: bool | None  # None: no experiment was audited
    change: dict[str, FeatureChange]  # transform -> change


class CellDrop(TypedDict):
    """One finished cell: its run 1 trained again, scored on the test set before and after each transform."""

    cell: str
    representation: str
    layer_config: str
    classifier: str | None
    test_acc: float  # run 1's checkpoint
    retrained_test_acc: float
    reproduced: bool  # the retrained run scores as its checkpoint did
    transformed_test_acc: dict[str, float]
    drop: dict[str, float]  # retrained_test_acc - transformed_test_acc


class InvarianceReport(TypedDict):
    dataset: str
    num_loras: int
    seed: int
    transforms: list[str]
    tolerance: float
    representations: list[RepAudit]
    cells: list[CellDrop]
    experiment: str | None
    retrain: bool
    stale_cells: list[str]  # finished under another fingerprint: not retrained (rerun `ablate run` first)
    duration_s: float


def verdict(rep: RepAudit, tolerance: float) -> str:
    worst = max((c["max_rel_change"] for c in rep["change"].values()), default=0.0)
    if rep["invariant"]:
        return "invariant" if worst <= tolerance else "FAILS (flagged invariant)"
    return "unchanged" if worst <= tolerance else "changes"


def markdown(report: InvarianceReport) -> str:
    transforms = report["transforms"]
    lines = [f"# Invariance audit: {report['dataset']}", "",
             f"{report['num_loras']} LoRAs, each reparametrised by every transform (seed {report['seed']}) without "
             "changing its update dW = (alpha / r) up @ down. Per representation: the largest change of any "
             "feature, relative to that feature's largest magnitude (0 = untouched; float32 round-off is about "
             f"1e-7). Tolerance {report['tolerance']:g}.", "",
             "| representation | " + " | ".join(transforms) + " | verdict |",
             "|---|" + "---:|" * len(transforms) + "---|"]
    for rep in report["representations"]:
        name = rep["name"] + (" *" if rep["in_experiment"] is False else "")
        cells = [f"{rep['change'][t]['max_rel_change']:.1e}" for t in transforms]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict(rep, report['tolerance'])} |")
    if any(rep["in_experiment"] is False for rep in report["representations"]):
        lines += ["", "\\* not in the experiment's grid (audited for comparison)."]
    if report["experiment"] is not None and not report["cells"]:
        why = ("--no-retrain" if not report["retrain"] else
               "the experiment has no finished cell (with its run 1) of the audited representations")
        lines += ["", f"No cell was trained again ({why}): the table covers the features only."]
    if report["stale_cells"]:
        lines += ["", f"Not trained again, stale (made under other settings or representation versions; rerun "
                      f"`ablate run` first): {', '.join(report['stale_cells'])}."]
    if report["cells"]:
        lines += ["", "## Test accuracy after each transform", "",
                  "Each finished cell's run 1, trained again with its seed and split, scored on the original test "
                  "set and on each transformed one. A drop means the classifier learned the factors' "
                  "parametrisation, not only the adapter.", "",
                  "| cell | test acc | " + " | ".join(transforms) + " |",
                  "|---|---:|" + "---:|" * len(transforms)]
        for c in report["cells"]:
            mark = "" if c["reproduced"] else " †"
            after = c["transformed_test_acc"]
            accs = [f"{after[t]:.3f} ({after[t] - c['retrained_test_acc']:+.3f})" for t in transforms]
            lines.append(f"| {c['cell']} | {c['retrained_test_acc']:.3f}{mark} | " + " | ".join(accs) + " |")
        if not all(c["reproduced"] for c in report["cells"]):
            lines += ["", "† the retrained run scored differently from its checkpoint (a GPU's non-deterministic "
                          "kernels, or a changed library): its drop is measured against the retrained run."]
    return "\n".join(lines) + "\n"


def plot(report: InvarianceReport, folder: Path) -> list[Path]:
    """Bars: each representation's largest relative feature change per transform (log scale)."""
    plt = pyplot()
    reps = report["representations"]
    transforms = report["transforms"]
    floor = 1e-12
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(reps) + 2), 3.6))
    width = 0.8 / max(len(transforms), 1)
    x = np.arange(len(reps))
    for k, t in enumerate(transforms):
        values = [max(r["change"][t]["max_rel_change"], floor) for r in reps]
        ax.bar(x + (k - (len(transforms) - 1) / 2) * width, values, width, label=t)
    ax.axhline(report["tolerance"], color="black", linestyle="--", linewidth=0.8, label="tolerance")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 4)
    ax.set_xticks(x, [r["name"] for r in reps], rotation=35, ha="right")
    ax.set_ylabel("largest relative feature change (0 drawn at 1e-12)")
    ax.set_title(f"Invariance audit: {report['dataset']} ({report['num_loras']} LoRAs)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, folder, "invariance")


def write_report(report: InvarianceReport, folder: Path) -> list[Path]:
    """invariance.json, invariance.md and (with matplotlib) invariance.png/.pdf in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "invariance.json", report)
    atomic_write_text(folder / "invariance.md", markdown(report))
    paths = [folder / "invariance.json", folder / "invariance.md"]
    return paths + (plot(report, folder) if have_matplotlib() else [])
