"""Commands about the data and what can be computed from it: ``import`` (the original script's cells),
``inspect`` (a dataset), ``reps`` (representations and classifiers), ``features`` (an export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ablation_cli import logs
from ablation_cli.cli.options import (
    AsJson,
    CacheDir,
    ConfigOpt,
    DatasetOpt,
    Format,
    LabelField,
    Labels,
    NoCache,
    OutputDir,
    Verbose,
    names,
    only_layer_configs,
)
from ablation_cli.reports import terminal

if TYPE_CHECKING:
    from ablation_cli.data.sources import DatasetOptions


def import_original(
    source: Annotated[Path, typer.Argument(help="The original script's output folder, the one holding "
                                                "checkpoints/ (e.g. results_50k/visual_ablation_50k).")],
    output_dir: OutputDir = Path("results"),
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name \\[default: from its "
                                                "results.json, or the folder name].")] = None,
    experiment: Annotated[str, typer.Option(help="Experiment name of the new folder.")] = "visual_ablation",
) -> None:
    """Make an ablate experiment of the original script's finished cells (the source is only read).

    Status shows them as imported; merge writes tables and plots from them; compare sets them beside
    an ablate run. Exit 0, 1 if a file was skipped (each named), 2 if none could be read.
    """
    from ablation_cli.importer import import_original as run_import
    from ablation_cli.reports.merge import format_merge_summary

    report = run_import(source, output_dir, dataset, experiment)
    for line in report.skipped:
        typer.secho(f"skipped {line}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"Imported {len(report.imported)} cell(s) from {source} into {report.store.root}"
               + (f"; skipped {len(report.skipped)} file(s)" if report.skipped else ""))
    typer.echo(format_merge_summary(report.results, report.paths, report.store.root))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def inspect(
    dataset: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A name from datasets.toml, or a path: a "
                                                "folder of LoRA files or a Hugging Face save_to_disk folder.")],
    as_json: AsJson = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML whose datasets.toml "
                                                "to use.")] = None,
    data_format: Format = None,
    labels: Labels = None,
    label_field: LabelField = None,
    cache_dir: CacheDir = Path(".feature_cache"),
) -> None:
    """Show what a dataset holds (layout, key style, LoRAs, classes, layers, shapes, ranks) and its problems.

    Exit 0 when it is ready to run, 2 when a problem would stop `ablate run`.
    """
    logs.setup_console(False)
    from ablation_cli.config import dataset_source, load_config
    from ablation_cli.data.summary import format_summary, summarize

    cfg, cfg_path = load_config(config)
    options: DatasetOptions = {"layout": data_format, "labels": labels, "label_field": label_field}
    summary = summarize(dataset_source(cfg, cfg_path, options, cache_dir, dataset=dataset))
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if summary["problems"]:
        raise typer.Exit(2)


def reps(config: ConfigOpt = None) -> None:
    """List the available representations, their versions and feature counts per matrix (or module):
    the built-in ones, then plugins (installed packages' entry points, the config's `plugins`) with
    where each comes from; then the classifiers."""
    from ablation_cli import features
    from ablation_cli.config import load_config

    load_config(config)  # registers the plugins it names (and the installed ones)
    for name in features.available():
        r = features.get(name)
        dim = (f"{r.dim_per_layer:>3}" if r.dim_per_layer is not None else
               "varies" if r.plugin or r.module_names is not None else "out*in")
        extra = "" if r.default or r.plugin else "  [not in the default grid]"
        extra += "  [invariant]" if r.invariant else ""
        typer.echo(f"{name:<16} v{r.version}  {dim:>6} per {r.unit:<6}  {r.description}{extra}")
        if r.plugin:
            typer.echo(f"{'':<16} plugin from {r.origin}, source sha256 {(r.source_sha or '')[:12]}")
    from ablation_cli.training import classifiers

    typer.echo("\nclassifiers: mlp, linear, [estimators.<name>] tables of the config" +
               "".join(f", {p.name}" for p in classifiers.plugins()))
    for p in classifiers.plugins():
        typer.echo(f"{p.name:<16} v{p.version}  {p.description}{'' if p.seeded else '  [no randomness]'}")
        typer.echo(f"{'':<16} plugin from {p.origin}, source sha256 {p.source_sha[:12]}")
    for line in features.broken_entry_points():
        typer.secho(f"plugin {line}: failed to import", fg=typer.colors.YELLOW, err=True)


def export_features(
    out: Annotated[Path, typer.Option("--out", help="Folder to write REP.npy, labels.npy and index.json to.")],
    dataset: DatasetOpt = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations \\[default: the config's].")]
    = None,
    layer_config: Annotated[str, typer.Option(help="Layer config selecting the columns.")] = "all_layers",
    config: ConfigOpt = None,
    data_format: Format = None,
    labels: Labels = None,
    label_field: LabelField = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files of an earlier export in --out.")] = False,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    verbose: Verbose = False,
) -> None:
    """Export features for your own analysis: one float32 row per LoRA, in dataset order.

    Writes OUT/REP.npy, OUT/labels.npy and OUT/index.json (sample_ids, layers, label_mapping, columns).
    Uses and fills the feature cache.
    """
    terminal.setup(verbose)
    from ablation_cli.config import dataset_source, load_config
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.export import export

    cfg, cfg_path = load_config(config, {"dataset": dataset, "representations": names(reps)})
    only_layer_configs(cfg, [layer_config], "--layer-config")
    options: DatasetOptions = {"layout": data_format, "labels": labels, "label_field": label_field}
    source = dataset_source(cfg, cfg_path, options, cache_dir)
    cache = None if no_cache_features else FeatureCache.under(cache_dir)
    written = export(source, cfg, layer_config, out, cache, force=force)
    typer.echo(f"Wrote {', '.join(p.name for p in written)} to {out}")
