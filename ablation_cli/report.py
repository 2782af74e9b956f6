"""Compute-then-render: status tables and the outputs of ``ablate merge``.

``format_*`` functions return strings or values; ``print_*`` only render. Nothing
here imports torch.
"""

from __future__ import annotations

import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from ablation_cli import __version__
from ablation_cli.data.layers import count_group
from ablation_cli.errors import ExperimentError
from ablation_cli.store import (
    ExperimentStore,
    atomic_write_json,
    atomic_write_text,
    expected_fingerprint,
    now_iso,
    verify,
)

# -- status ----------------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_cell(c: dict[str, Any]) -> str:
    text = _format_state(c)
    job = c.get("slurm")
    if job and c["state"] != "done":
        reason = f": {job['reason']}" if job.get("reason") else ""
        text += f" [job {job['job']} {job['state'].lower()}{reason}]"
    return text


def _format_state(c: dict[str, Any]) -> str:
    state = c["state"]
    if state == "done":
        return f"done {c['test_acc_mean']:.3f}±{c['test_acc_std']:.3f} ({format_duration(c['duration_s'])})"
    if state == "running":
        where = (f"run {c['current_run']}, epoch {c.get('epoch')}" if c.get("current_run") is not None
                 else "starting")
        return f"running {c['runs_done']}/{c['runs_total']} ({where})"
    if state in ("interrupted", "pending") and c["runs_done"]:
        return f"{state} {c['runs_done']}/{c['runs_total']}"
    return state


def status_grid(model: dict[str, Any]) -> list[list[str]]:
    """Rows: header, then one per representation; columns: one per layer config."""
    by_id = {(c["representation"], c["layer_config"]): c for c in model["cells"]}
    rows = [["representation", *model["layer_configs"]]]
    for rep in model["representations"]:
        rows.append([rep, *(format_cell(by_id[(rep, lc)]) if (rep, lc) in by_id else "-"
                            for lc in model["layer_configs"])])
    return rows


def format_totals(model: dict[str, Any]) -> str:
    counts = model["counts"]
    pct = 100.0 * model["done"] / model["total"] if model["total"] else 100.0
    extra = ", ".join(f"{counts[s]} {s}" for s in ("running", "failed", "stale", "interrupted") if counts[s])
    line = (f"Total: {model['done']}/{model['total']} cells done ({pct:.1f}%)"
            f"{', ' + extra if extra else ''}; runs {model['runs_done']}/{model['runs_total']}")
    if model["done"] < model["total"]:
        line += f"; ETA {format_duration(model['eta_s'])}"
    return line


def format_status_plain(model: dict[str, Any]) -> str:
    rows = status_grid(model)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{model['experiment']} on {model['dataset']}  ({model['folder']})"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(format_totals(model))
    lines.extend(f"  {c['id']}: {c['state']}: {c['error']}" for c in model["cells"] if c["error"])
    return "\n".join(lines)


_STYLE = {"done": "green", "running": "cyan", "failed": "red", "stale": "yellow", "interrupted": "magenta",
          "pending": "dim"}


def status_table(model: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{model['experiment']} on {model['dataset']}", caption=format_totals(model))
    rows = status_grid(model)
    for name in rows[0]:
        table.add_column(name)
    by_id = {(c["representation"], c["layer_config"]): c for c in model["cells"]}
    for rep, *texts in rows[1:]:
        styled = []
        for lc, text in zip(model["layer_configs"], texts):
            c = by_id.get((rep, lc))
            styled.append(f"[{_STYLE[c['state']]}]{text}[/]" if c else text)
        table.add_row(rep, *styled)
    return table


# -- merge ------------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_results(store: ExperimentStore, partial: bool) -> tuple[dict[str, Any], list[str]]:
    """Verified cell checkpoints by cell id; raises unless every cell is mergeable (or ``partial``)."""
    record = store.read_experiment()
    num_runs = int(record["num_runs"])
    docs: dict[str, Any] = {}
    missing, stale = [], []
    for spec in record["cells"]:
        v = verify(store.cell_path(spec["id"]), "cell", expected_fingerprint(spec))
        if v.state == "ok" and v.doc is not None and v.doc["num_runs"] == num_runs:
            docs[spec["id"]] = v.doc
        elif v.state == "stale":
            stale.append(f"{spec['id']} ({'; '.join(v.changes)})")
        else:
            missing.append(spec["id"])
    if stale and not partial:
        raise ExperimentError(f"refusing to merge checkpoints made under another configuration: "
                              f"{', '.join(stale)}", hint="rerun `ablate run`, or merge the rest with --partial")
    if missing and not partial:
        raise ExperimentError(f"{len(missing)} of {len(record['cells'])} cells are not finished: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                              hint="finish them with `ablate run`, or merge what exists with --partial")
    return docs, missing + [s.split(" ")[0] for s in stale]


def build_results(store: ExperimentStore, partial: bool = False) -> dict[str, Any]:
    record = store.read_experiment()
    docs, missing = collect_results(store, partial)
    first: dict[str, Any] = next(iter(docs.values()), {})
    all_layers = record["layer_configs"].get("all_layers", {}).get("layers")
    dataset_layers = all_layers or sorted({name for lc in record["layer_configs"].values() for name in lc["layers"]})
    versions = first.get("meta", {}).get("versions", {})
    results: dict[str, Any] = {
        "dataset": record["dataset"]["name"],
        "experiment": record["experiment"],
        "num_runs": record["num_runs"],
        "num_classes": first.get("num_classes"),
        "num_all_layers": len(dataset_layers),
        "num_visual_layers": count_group(dataset_layers, "attn1"),
        "num_text_layers": count_group(dataset_layers, "attn2"),
        "label_mapping": first.get("label_mapping"),
    }
    for lc in record["layer_configs"]:
        results[f"{lc}_results"] = [
            _public(docs[spec["id"]]) for spec in record["cells"]
            if spec["layer_config"] == lc and spec["id"] in docs
        ]
    results["missing"] = missing
    results["config"] = record["config"]
    results["dataset_info"] = record["dataset"]
    results["provenance"] = {
        "ablate_version": __version__, "git_commit": _git_commit(), "host": socket.gethostname(),
        "torch_version": versions.get("torch") or _package_version("torch"),
        "numpy_version": versions.get("numpy") or _package_version("numpy"),
        "created_at": now_iso(),
    }
    return results


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k != "meta"}
    out["fingerprint"] = doc["meta"]["fingerprint"]
    return out


def write_merge(store: ExperimentStore, partial: bool = False,
                plots: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """results.json/.md/.csv/.tex, and plots/ when matplotlib is installed (and ``plots``)."""
    from ablation_cli import tables

    results = build_results(store, partial)
    results["comparisons"] = tables.comparisons(results)
    outputs = {
        "results.json": None,
        "results.md": tables.format_results_md(results),
        "results.csv": tables.format_results_csv(results),
        "results.tex": tables.format_results_tex(results),
    }
    paths = []
    for name, text in outputs.items():
        path = store.root / name
        if text is None:
            atomic_write_json(path, results)
        else:
            atomic_write_text(path, text)
        paths.append(path)
    if plots:
        from ablation_cli import plots as plotting

        if plotting.have_matplotlib():
            paths += plotting.write_all(results, store.root / "plots")
    return results, paths
