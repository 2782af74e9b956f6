"""``ablate run --dry-run``: the grid a run would walk, before anything is read, trained or written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ablation_cli.config import ExperimentConfig
from ablation_cli.grid import Cell, sweep_axes
from ablation_cli.status import CellStatus

MAX_CELLS_LISTED = 40


def format_plan(cfg: ExperimentConfig, dataset: str, cells: Sequence[Cell],
                existing: Mapping[str, CellStatus] | None = None, folder: str | None = None,
                run_bytes: float | None = None, feature_bytes: int | None = None) -> str:
    """The axes of the grid (layer configs with their layer counts, representations, classifiers, swept
    settings), the number of cells and runs, and the cells' ids (the first 40 of a larger grid). With the
    ``existing`` experiment's cells (in ``folder``): what is done, and the time the rest would take at the
    mean time of its finished runs (and ``run_bytes``, the mean size of its run checkpoints); with a
    feature cache, the bytes it would gain (``feature_bytes``)."""
    layer_configs: dict[str, int] = {}
    derived: dict[str, str] = {}
    for cell in cells:
        layer_configs.setdefault(cell.layer_config, len(cell.layers))
        if (d := cell.derivation) is not None:
            derived[cell.layer_config] = (f" (drops the top {d['drop_top']} of {d['ranked_by']} by {d['ranked_rep']} "
                                          f"on validation: {', '.join(d['dropped'])})")
    lines = [f"Experiment {cfg.name} on dataset {dataset}: {len(cells)} cells x {cfg.num_runs} runs = "
             f"{len(cells) * cfg.num_runs} runs"]
    if cfg.layer_sweep is not None:
        lines.append(f"Layer sweep: by {cfg.layer_sweep.by}, mode {cfg.layer_sweep.mode}")
    lines.append(f"Layer configs ({len(layer_configs)}):")
    width = max(len(name) for name in layer_configs)
    lines += [f"  {name:<{width}}  {n} layers{derived.get(name, '')}" for name, n in layer_configs.items()]
    lines.append(f"Representations ({len(cfg.representations)}): {', '.join(cfg.representations)}")
    lines.append(f"Classifiers ({len(cfg.classifiers)}): {', '.join(cfg.classifiers)}")
    for axis in sweep_axes(cfg):
        limited = f" (classifiers: {', '.join(axis.classifiers)})" if axis.classifiers is not None else ""
        lines.append(f"Axis {axis.key} ({axis.label} in cell ids): {', '.join(map(str, axis.values))}{limited}")
    if existing is not None:
        lines.append(_progress(cfg, cells, existing, folder, run_bytes))
    if feature_bytes is not None:
        lines.append(f"Feature cache: about {feature_bytes / 1e6:.1f} MB to write" if feature_bytes else
                     "Feature cache: holds every representation of the grid (nothing to compute)")
    lines.append("Cells:")
    lines += [f"  {cell.id}" for cell in cells[:MAX_CELLS_LISTED]]
    if len(cells) > MAX_CELLS_LISTED:
        lines.append(f"  ... and {len(cells) - MAX_CELLS_LISTED} more")
    lines.append("Nothing was run or written (--dry-run).")
    return "\n".join(lines)


def _progress(cfg: ExperimentConfig, cells: Sequence[Cell], existing: Mapping[str, CellStatus],
              folder: str | None, run_bytes: float | None = None) -> str:
    done = {c.id: min(existing[c.id].runs_done, cfg.num_runs) for c in cells if c.id in existing
            and existing[c.id].state not in ("stale", "corrupt")}
    runs_done = sum(done.values())
    left = len(cells) * cfg.num_runs - runs_done
    times = [t for row in existing.values() for t in row.run_times]
    line = f"In {folder}: {runs_done} of {len(cells) * cfg.num_runs} runs done"
    if left and times:
        mean = sum(times) / len(times)
        line += (f"; the other {left} would take about {_duration(mean * left)} here (mean run time {mean:.1f}s "
                 f"over its {len(times)} finished runs)")
    if left and run_bytes:
        line += f" and write about {run_bytes * left / 1e6:.1f} MB of run checkpoints"
    return line + "."


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes >= 60 else f"{max(minutes, 1)} min"
