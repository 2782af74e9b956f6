"""``ablate cache ls | verify | prune``: the feature cache shared by experiments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ablation_cli.cli.options import AsJson, CacheDir

cache_app = typer.Typer(help="List, verify or prune the feature cache (--cache-dir, default .feature_cache).",
                        no_args_is_help=True)


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = Path(".feature_cache"), as_json: AsJson = False) -> None:
    """Every cached feature array: dataset, representation and version, shape, size, age."""
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.cache_view import format_cache_ls

    cache = FeatureCache.under(cache_dir)
    entries = cache.entries()
    typer.echo(json.dumps([e.to_json() for e in entries], indent=1) if as_json
               else format_cache_ls(entries, cache.root))


@cache_app.command("verify")
def cache_verify(cache_dir: CacheDir = Path(".feature_cache")) -> None:
    """Check every byte of every cached feature array against its sha256 (a load checks only its size and
    a sample). A corrupt entry is deleted: the next run recomputes it. Exit 0 when all are whole, 1 if
    any was corrupt."""
    import time

    from ablation_cli.features.cache import FeatureCache

    cache = FeatureCache.under(cache_dir)
    entries = cache.entries()
    bad = 0
    for i, entry in enumerate(entries, 1):
        started = time.perf_counter()
        problem = cache.verify(entry)
        bad += problem is not None
        verdict = f"CORRUPT ({problem}): deleted, the next run recomputes it" if problem else "ok"
        typer.echo(f"[{i}/{len(entries)}] {entry.dataset} {entry.representation}-v{entry.version} "
                   f"({entry.bytes / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s): {verdict}")
    typer.echo(f"{len(entries) - bad} of {len(entries)} entries whole in {cache.root}" +
               (f"; {bad} corrupt, deleted" if bad else ""))
    if bad:
        raise typer.Exit(1)


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDir = Path(".feature_cache"),
    older_than: Annotated[float | None, typer.Option(help="Remove entries older than this many days.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Remove the entries of this dataset "
                                                "(name as `cache ls` shows it).")] = None,
    remove_all: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
) -> None:
    """Remove cache entries. Always: entries of old representation versions, and leftovers of
    interrupted writes. Also, as asked: --older-than DAYS, --dataset NAME, or --all.
    Entries in use by a running process are kept."""
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.cache_view import format_prune_plan, format_pruned

    cache = FeatureCache.under(cache_dir)
    chosen = cache.select_for_prune(older_than, dataset, remove_all)
    leftovers = list(cache.leftovers())
    if dry_run:
        typer.echo(format_prune_plan(chosen, leftovers))
        return
    kept, freed = cache.prune(chosen, leftovers)
    typer.echo(format_pruned(chosen, kept, leftovers, freed))
