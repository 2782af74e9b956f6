"""``ablate merge`` and ``ablate compare``: the results of one experiment, and of several side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ablation_cli.cli.options import ExperimentOpt, OutputDir, PickDataset
from ablation_cli.errors import ConfigError


def merge(
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    partial: Annotated[bool, typer.Option("--partial", help="Merge the finished cells; list the rest.")] = False,
    rows: Annotated[str | None, typer.Option("--rows", metavar="AXIS", help="With --cols: a pivot table and heatmap "
                    "of mean test accuracy by two axes (layer_config, representation, classifier or a swept "
                    "setting) \\[default: the config's \\[reports] pivot].")] = None,
    cols: Annotated[str | None, typer.Option("--cols", metavar="AXIS", help="The pivot's columns (with --rows).")]
    = None,
) -> None:
    """Write the results from the verified cell checkpoints into the experiment folder.

    Outputs: results.json (the researcher's layout, config, provenance, statistics and findings),
    results.md (tables and findings), results.csv, results.tex, and plots/ (PNG and PDF:
    accuracy_by_representation, drop_FROM_to_TO per pair of layer configs, learning_curves_best,
    confusion_best, per_class_f1_drop) when matplotlib is installed. Exit 2 if a cell is unfinished
    or stale (use --partial).
    """
    from ablation_cli.reports.merge import format_merge_summary, write_merge
    from ablation_cli.store import ExperimentStore

    if (rows is None) != (cols is None):
        raise ConfigError("--rows and --cols go together: --rows representation --cols training.lr")
    store = ExperimentStore.find(output_dir, dataset, experiment)
    results, paths = write_merge(store, partial=partial, pivot_axes=(rows, cols) if rows and cols else None)
    typer.echo(format_merge_summary(results, paths, store.root))


def compare(
    folders: Annotated[list[Path], typer.Argument(help="Two or more output folders, experiment folders or "
                                                       "results.json files (e.g. results_10k results_50k).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write comparison.md/.csv and the plot.")] = Path(
        "comparison"),
    experiment: Annotated[str | None, typer.Option("--experiment", "-e", help="In each output folder holding "
                          "several experiments, the one of this folder or experiment name (or pass experiment "
                          "folders).")] = None,
) -> None:
    """Compare experiments across datasets: one table and one plot of each cell's test accuracy by dataset size."""
    from ablation_cli.reports import compare as cmp

    if len(folders) < 2:
        raise ConfigError("compare needs at least two experiments (e.g. results_10k results_50k)")
    loaded = [cmp.load_results(f, experiment) for f in folders]
    written = cmp.write_comparison(loaded, out)
    typer.echo(written[0].read_text())
    if len(written) > 2:
        typer.echo(f"Wrote {out}/comparison.md, comparison.csv, {', '.join(p.name for p in written[2:])}")
    else:
        typer.echo(f"Wrote {out}/comparison.md and comparison.csv; no plot: matplotlib is not installed "
                   "(pip install 'ablate[plots]').")
    for warning in cmp.compare_warnings(loaded):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
