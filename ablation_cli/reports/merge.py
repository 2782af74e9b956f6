"""``ablate merge``: results.json (the researcher's layout plus config and provenance), results.md,
.csv, .tex and plots/, from the verified cell checkpoints. Nothing here imports torch."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ablation_cli import __version__, runtime, tracking
from ablation_cli.data.layers import count_group
from ablation_cli.durable import atomic_write_json, atomic_write_text, now_iso
from ablation_cli.errors import ConfigError, ExperimentError
from ablation_cli.original import with_original_keys
from ablation_cli.records import CellCheckpoint
from ablation_cli.reports import findings, statistics, tables
from ablation_cli.store import ExperimentStore


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_results(store: ExperimentStore, partial: bool) -> tuple[dict[str, CellCheckpoint], list[str]]:
    """Verified cell checkpoints by cell id; raises unless every cell is mergeable (or ``partial``)."""
    record = store.experiment()
    done: dict[str, CellCheckpoint] = {}
    missing, stale = [], []
    for spec in record.cells:
        v = store.cell_state(spec.id, spec.expected, record.num_runs)
        if (cell := v.cell()) is not None:
            done[spec.id] = cell
        elif v.state == "stale":
            stale.append(f"{spec.id} ({'; '.join(v.changes)})")
        else:
            missing.append(spec.id)
    if stale and not partial:
        raise ExperimentError(f"refusing to merge checkpoints made under another configuration: "
                              f"{', '.join(stale)}", hint="rerun `ablate run`, or merge the rest with --partial")
    if missing and not partial:
        raise ExperimentError(f"{len(missing)} of {len(record.cells)} cells are not finished: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                              hint="finish them with `ablate run`, or merge what exists with --partial")
    return done, missing + [s.split(" ")[0] for s in stale]


def build_results(store: ExperimentStore, partial: bool = False,
                  pivot_axes: tuple[str, str] | None = None) -> dict[str, Any]:
    """results.json as a document: the researcher's keys, then config, provenance and statistics."""
    record = store.experiment()
    done, missing = collect_results(store, partial)
    first = next(iter(done.values()), None)
    dataset_layers = record.dataset_layers()
    versions = first.meta.versions if first is not None else {}
    results: dict[str, Any] = {
        "dataset": record.dataset_name,
        "experiment": record.experiment,
        "num_runs": record.num_runs,
        "num_classes": first.doc.get("num_classes") if first is not None else None,
        "num_all_layers": len(dataset_layers),
        "num_visual_layers": count_group(dataset_layers, "attn1"),
        "num_text_layers": count_group(dataset_layers, "attn2"),
        "label_mapping": first.doc.get("label_mapping") if first is not None else None,
    }
    for lc in record.layer_configs:
        results[f"{lc}_results"] = [_public(done[spec.id]) for spec in record.cells
                                    if spec.layer_config == lc and spec.id in done]
    results.update(record.layer_counts)  # an imported experiment: the original's own counts
    if derived := {lc: info["derived"] for lc, info in record.layer_configs.items() if info.get("derived")}:
        results["derived_layer_configs"] = derived  # drop_top: what each dropped, from which ranking
    results["missing"] = missing
    if record.imported:
        results["imported"] = {**record.imported, "cells": [c for c, cell in done.items() if cell.meta.imported]}
    results["config"] = record.config
    results["dataset_info"] = record.dataset
    results["provenance"] = {
        "ablate_version": __version__, "git_commit": runtime.git_commit(), "host": socket.gethostname(),
        "torch_version": versions.get("torch") or _package_version("torch"),
        "numpy_version": versions.get("numpy") or _package_version("numpy"),
        "created_at": now_iso(),
    }
    in_grid_order = {spec.id: done[spec.id] for spec in record.cells if spec.id in done}
    docs = [{"cell": cid, **cell.doc} for cid, cell in in_grid_order.items()]
    add_statistics(results, docs)
    if axes := pivot_axes or ((record.config.get("reports") or {}).get("pivot")):
        try:
            results["pivot"] = statistics.pivot(docs, axes[0], axes[1])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if mixed := mixed_threads(in_grid_order):
        results["warnings"] = [mixed]
    return results


def mixed_threads(cells: Mapping[str, CellCheckpoint]) -> str | None:
    """A warning when the CPU runs of one experiment were trained under different torch thread counts:
    on the CPU a thread count changes training trajectories, not only the last bits."""
    counts: dict[int, list[str]] = {}
    for cid, cell in cells.items():
        for run in cell.per_run_results:
            threads = run.get("torch_threads") or cell.meta.torch_threads
            if threads and str(run.get("device", "cpu")).startswith("cpu"):
                ids = counts.setdefault(int(threads), [])
                if cid not in ids:
                    ids.append(cid)
    if len(counts) < 2:
        return None
    shown = "; ".join(f"{n} thread(s): {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                      for n, ids in sorted(counts.items()))
    return (f"CPU runs were trained under different torch thread counts ({shown}); on the CPU a thread count "
            "changes training trajectories, so compare cells trained alike (--threads, Slurm --cpus-per-task)")


def add_statistics(results: dict[str, Any], docs: Sequence[Mapping[str, Any]]) -> None:
    """``statistics``, ``comparisons`` and ``findings`` of ``results``, and each cell's CI over test rows and
    runs, from the cell checkpoints ``docs`` in grid order (their stored predictions)."""
    config = results.get("config") or {}
    lcs = tables.layer_configs(results)
    results["statistics"] = statistics.analyse(
        docs, {d["cell"]: tables.row_key(d) for d in docs}, lcs, tables.comparison_pairs(results),
        statistics.Settings.from_config(config), bool((config.get("split") or {}).get("resample")))
    for lc in lcs:
        for cell in results[f"{lc}_results"]:
            boot = results["statistics"]["cells"].get(cell.get("cell"))
            cell["test_acc_ci95_rows_runs"] = boot["test_acc_ci95_rows_runs"] if boot else None
    every_pair = tables.comparisons(results)
    pairs = tables.comparison_pairs(results)
    # "comparisons" keeps its meaning for the researcher's scripts (one row per representation: the first
    # pair, all_layers -> visual_only where both exist); every declared pair is in "pair_comparisons"
    results["comparisons"] = [r for r in every_pair if pairs and (r["from"], r["to"]) == pairs[0]]
    results["pair_comparisons"] = every_pair
    results["findings"] = findings.build(results)


def _public(cell: CellCheckpoint) -> dict[str, Any]:
    """A cell as results.json lists it: the original's keys, its fingerprint, no meta or predictions."""
    out = with_original_keys({k: v for k, v in cell.doc.items() if k not in ("meta", "predictions")})
    out["fingerprint"] = cell.meta.fingerprint.fingerprint
    return out


def write_merge(store: ExperimentStore, partial: bool = False, plots: bool = True,
                pivot_axes: tuple[str, str] | None = None) -> tuple[Mapping[str, Any], list[Path]]:
    """results.json/.md/.csv/.tex, and plots/ when matplotlib is installed (and ``plots``); ``pivot_axes``
    (rows, columns) in place of the config's ``[reports] pivot``."""
    results = build_results(store, partial, pivot_axes)
    texts = {
        "md": tables.format_results_md(results),
        "csv": tables.format_results_csv(results),
        "tex": tables.format_results_tex(results),
    }
    paths = []
    for fmt, text in texts.items():
        atomic_write_text(store.results_path(fmt), text)
        paths.append(store.results_path(fmt))
    if plots:
        from ablation_cli.reports import plots as plotting  # numpy; matplotlib only if installed

        if plotting.have_matplotlib():
            paths += plotting.write_all(results, store.plots_dir)
    # results.json last: once it is newer than every cell, the whole merge is on disk (a merge killed
    # halfway is redone by the next `ablate run`; see ExperimentStore.merged)
    atomic_write_json(store.results_path("json"), results)
    tracking.notify_merge(tracking.configured_uri(store), store)
    return results, [store.results_path("json"), *paths]


def format_merge_summary(results: Mapping[str, Any], paths: list[Path], root: Path) -> str:
    """What `ablate merge` says it wrote (and what it could not)."""
    from ablation_cli.reports.plots import have_matplotlib  # numpy; matplotlib only if installed

    merged = sum(len(v) for k, v in results.items() if k.endswith("_results"))
    tables = [p.name for p in paths if p.parent == root]
    plots = [p for p in paths if p.parent != root]
    lines = [f"Merged {merged} cell(s) into {root}: {', '.join(tables)}"]
    if plots:
        lines.append(f"Plots: {len(plots)} files in {plots[0].parent}")
    elif not have_matplotlib():
        lines.append("No plots: matplotlib is not installed (pip install 'ablate[plots]').")
    if results["missing"]:
        lines.append(f"Missing (not merged): {', '.join(results['missing'])}")
    lines += [f"warning: {w}" for w in results.get("warnings", [])]
    if (results.get("findings") or {}).get("text"):
        lines += ["", "Findings:", results["findings"]["text"]]
    return "\n".join(lines)
