"""Status views as text: the progress grid, one cell's state, the totals line. Compute, then render:
these return strings; ``reports.terminal`` draws the same grid with rich."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ablation_cli.records import axis_value_text
from ablation_cli.status import row_label


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_cell(c: Mapping[str, Any]) -> str:
    text = _format_state(c)
    job = c.get("slurm")
    if job and c["state"] != "done":
        reason = f": {job['reason']}" if job.get("reason") else ""
        text += f" [job {job['job']} {job['state'].lower()}{reason}]"
    return text


def _format_state(c: Mapping[str, Any]) -> str:
    state = c["state"]
    if state == "done":
        return f"done {c['test_acc_mean']:.3f}±{c['test_acc_std']:.3f} ({format_duration(c['duration_s'])})"
    if state == "imported":
        return f"imported {c['test_acc_mean']:.3f}±{c['test_acc_std']:.3f}"
    if state == "running":
        where = (f"run {c['current_run']}, epoch {c.get('epoch')}" if c.get("current_run") is not None
                 else "starting")
        return f"running {c['runs_done']}/{c['runs_total']} ({where})"
    if state in ("interrupted", "pending") and c["runs_done"]:
        return f"{state} {c['runs_done']}/{c['runs_total']}"
    return state


def status_grid(model: Mapping[str, Any]) -> list[list[str]]:
    """Rows: header, then one per representation; columns: one per layer config."""
    by_id = {(row_label(c["representation"], c.get("classifier"), c.get("axes")), c["layer_config"]): c
             for c in model["cells"]}
    rows = [["representation", *model["layer_configs"]]]
    for rep in model["representations"]:
        rows.append([rep, *(format_cell(by_id[(rep, lc)]) if (rep, lc) in by_id else "-"
                            for lc in model["layer_configs"])])
    return rows


def format_totals(model: Mapping[str, Any]) -> str:
    counts = model["counts"]
    pct = 100.0 * model["done"] / model["total"] if model["total"] else 100.0
    extra = ", ".join(f"{counts[s]} {s}" for s in ("imported", "running", "failed", "stale", "interrupted")
                      if counts.get(s))
    line = (f"Total: {model['done']}/{model['total']} cells done ({pct:.1f}%)"
            f"{', ' + extra if extra else ''}; runs {model['runs_done']}/{model['runs_total']}")
    if model["done"] + counts.get("imported", 0) < model["total"] and not model.get("imported"):
        running = model.get("running", True)
        line += f"; ETA {format_duration(model['eta_s'])}" if running else "; not running"
    if tracking := model.get("tracking"):
        missing = tracking["untracked_runs"]
        line += (f"; MLflow: {missing} run(s) not logged yet (ablate track sync)" if missing
                 else "; MLflow: every run logged")
    return line


def format_notes(model: Mapping[str, Any]) -> list[str]:
    """Lines under the totals: whether results.json still holds the cells done now."""
    results = model.get("results")
    if not results or results["up_to_date"]:
        return []
    if model["done"] + model["counts"].get("imported", 0) == model["total"]:
        hint = "run `ablate merge`"
    elif model.get("imported"):
        hint = "run `ablate merge --partial`"
    elif model.get("running"):
        hint = "run `ablate merge` once the grid is done"
    else:
        hint = "finish the grid with `ablate run` (it merges at the end), or run `ablate merge --partial`"
    return [f"results.json is out of date ({results['reason']}): {hint}"]


def format_status_plain(model: Mapping[str, Any]) -> str:
    rows = status_grid(model)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{model['experiment']} on {model['dataset']}  ({model['folder']})"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(format_totals(model))
    lines.extend(format_notes(model))
    lines.extend(f"  {c['id']}: {c['state']}: {c['error']}" for c in model["cells"] if c["error"])
    return "\n".join(lines)


def format_groups(axis: str, groups: Sequence[Mapping[str, Any]]) -> str:
    """``ablate status --by AXIS``: one line per value of the axis."""
    names = [axis_value_text(g["value"]) if isinstance(g["value"], (int, float)) else str(g["value"])
             for g in groups]
    width = max([len(axis), *map(len, names)])
    lines = [f"{axis:<{width}}  cells done  runs done  mean test acc (finished cells)"]
    for name, g in zip(names, groups):
        acc = f"{g['test_acc_mean']:.4f}" if g["test_acc_mean"] is not None else "-"
        lines.append(f"{name:<{width}}  {g['done']:>4}/{g['cells']:<5}  {g['runs_done']:>4}/{g['runs_total']:<4}  "
                     f"{acc}")
    return "\n".join(lines)
