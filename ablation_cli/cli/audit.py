"""``ablate audit invariance``: how much the representations and the trained classifiers depend on the LoRA
factors' parametrisation rather than on the adapters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ablation_cli.cli.options import CacheDir, ConfigOpt, ExperimentOpt, NoCache, OutputDir, Verbose, names
from ablation_cli.errors import ConfigError, NoExperimentError
from ablation_cli.reports import terminal

if TYPE_CHECKING:
    from ablation_cli.data.sources import DatasetOptions

audit_app = typer.Typer(help="Audits of an experiment's representations and classifiers.", no_args_is_help=True)

TRANSFORM_HELP = ("Comma-separated reparametrisations, each leaving every dW unchanged: gl (random invertible "
                  "R: up R, R^-1 down), scale (c up, down / c), sign (c = -1), alpha (alpha c, up / c) "
                  "\\[default: all four].")


@audit_app.command("invariance")
def invariance(
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", metavar="NAME|PATH", help="The dataset: its "
                       "experiment under --output-dir if there is one, else the dataset alone (features only).")]
    = None,
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    config: ConfigOpt = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations \\[default: the experiment's, "
                    "then the invariant ones: delta_spectral, delta_canonical, delta_sketch].")] = None,
    transform: Annotated[str | None, typer.Option("--transform", help=TRANSFORM_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random reparametrisations.")] = 0,
    retrain: Annotated[bool, typer.Option("--retrain/--no-retrain", help="For an experiment: train each finished "
                       "cell's run 1 again and score it on the transformed test sets.")] = True,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write invariance.md/.json/.png \\[default: "
                   "the experiment folder's audit/, else OUTPUT_DIR/audit_DATASET].")] = None,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    verbose: Verbose = False,
) -> None:
    """Reparametrise every LoRA without changing its update dW = (alpha / r) up @ down, and report per
    representation the largest relative change of any feature (a representation flagged invariant must stay
    under 1e-5) and, for an experiment with finished cells, each cell's test accuracy on the transformed
    test sets against the original (the drop). Writes invariance.md, invariance.json and a plot; exit 0.
    """
    terminal.setup(verbose)
    from ablation_cli.audit import TRANSFORMS, audit_invariance, audited_reps
    from ablation_cli.config import dataset_source, load_config
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.invariance import markdown, write_report
    from ablation_cli.session import recorded_settings
    from ablation_cli.store import ExperimentStore
    from ablation_cli.workspace import Workspace

    transforms = names(transform) or list(TRANSFORMS)
    if unknown := [t for t in transforms if t not in TRANSFORMS]:
        raise ConfigError(f"--transform {unknown[0]}: unknown transform (allowed: {', '.join(TRANSFORMS)})")
    store = None
    try:
        store = ExperimentStore.find(output_dir, dataset, experiment)
    except NoExperimentError:
        if experiment is not None or dataset is None:
            raise
    options: DatasetOptions = {}
    if store is not None:
        recorded = recorded_settings(store.root, {}, {}, doing="Auditing")
        cfg, cfg_path, options = recorded.cfg, recorded.config_path, recorded.options
    else:
        cfg, cfg_path = load_config(config, {"dataset": dataset})
    chosen = audited_reps(cfg, names(reps))
    from ablation_cli import features

    if unknown := [r for r in chosen if not features.known(r)]:
        raise ConfigError(f"--reps: unknown representation '{unknown[0]}' (allowed: {', '.join(features.available())})")
    source = dataset_source(cfg, cfg_path, options, cache_dir)
    cache = None if no_cache_features else FeatureCache.under(cache_dir)
    workspace = Workspace(source, cfg.split, cache, cfg.device)
    report = audit_invariance(cfg, workspace, chosen, transforms, seed, store, retrain)
    folder = out or (store.root / "audit" if store is not None else output_dir / f"audit_{workspace.info.name}")
    paths = write_report(report, folder)
    typer.echo(markdown(report))
    typer.echo(f"Wrote {', '.join(p.name for p in paths)} to {folder}")
