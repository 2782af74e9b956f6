"""``ablate reset`` and ``ablate restore``: delete cell checkpoints, or bring superseded ones back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ablation_cli.cli.options import ExperimentOpt, OutputDir, PickDataset, key_value
from ablation_cli.errors import ConfigError


def reset(
    rep: Annotated[str | None, typer.Option("--rep", help="Representation whose cells to reset.")] = None,
    layer_config: Annotated[str | None, typer.Option("--layer-config", help="Only this layer config.")] = None,
    classifier: Annotated[str | None, typer.Option("--classifier", help="Classifier whose cells to reset "
                                                   "(with --rep: only that representation's).")] = None,
    where: Annotated[list[str] | None, typer.Option("--where", metavar="KEY=VALUE", help="Only the cells with "
                     "this value of a swept setting (repeatable), e.g. --where training.lr=3e-4.")] = None,
    all_cells: Annotated[bool, typer.Option("--all", help="Reset every cell.")] = False,
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cell and run checkpoints so the next `ablate run` recomputes them (the feature cache stays)."""
    from ablation_cli.store import ExperimentStore

    store = ExperimentStore.find(output_dir, dataset, experiment)
    chosen = dict(key_value(item, "--where", "training.lr=3e-4") for item in where or [])
    targets = store.reset_targets(rep, layer_config, all_cells, classifier, chosen)
    files = {cid: store.cell_files(cid) for cid in targets}
    total = sum(len(f) for f in files.values())
    for cid in targets:
        typer.echo(f"  {cid}: {len(files[cid])} file(s)")
    if total == 0:
        typer.echo("Nothing to delete.")
        return
    if dry_run:
        typer.echo(f"Dry run: would delete {total} file(s) in {len(targets)} cell(s).")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to delete without confirmation", hint="pass --yes")
        typer.confirm(f"Delete {total} file(s) in {len(targets)} cell(s)?", abort=True)
    with store.lock(purpose="reset"), store.claim_all(targets):  # never a cell a Slurm task trains now
        deleted = sum(store.delete_cell(cid) for cid in targets)
    typer.echo(f"Deleted {deleted} file(s); the next `ablate run` recomputes {len(targets)} cell(s).")
    from ablation_cli.tracking import supersede_reset

    if note := supersede_reset(store, targets):
        typer.echo(note, err=note.startswith("warning"))


def restore(
    cells: Annotated[list[str] | None, typer.Option("--cell", help="Cell id to bring back (repeatable).")] = None,
    all_cells: Annotated[bool, typer.Option("--all", help="Every cell with superseded checkpoints.")] = False,
    list_only: Annotated[bool, typer.Option("--list", help="Only list what can be restored.")] = False,
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
) -> None:
    """Bring superseded checkpoints back (those `run --restart-stale` moved to checkpoints/.superseded/).

    Per cell, the newest superseded version returns: its cell checkpoint and the runs made under the same
    settings. A cell with checkpoints now is refused (reset it first). Restored cells count as done
    again only under the settings they were made with (e.g. `ablate run --resume DIR` after the
    experiment's settings were changed back).
    """
    from ablation_cli import superseded
    from ablation_cli.store import ExperimentStore

    store = ExperimentStore.find(output_dir, dataset, experiment)
    doc = store.read_experiment()
    current = {c["id"]: c for c in doc["cells"]}
    if cells and all_cells:
        raise ConfigError("give --cell ID (repeatable) or --all, not both")
    unknown = [c for c in cells or [] if c not in current]
    if unknown:
        raise ConfigError(f"--cell: unknown cell '{unknown[0]}' (this experiment has: {', '.join(current)})")
    found = superseded.restorable(store, list(cells or current))
    for item in found:
        typer.echo("  " + superseded.describe(item, current[item.cell_id]))
    missing = [c for c in cells or [] if c not in {i.cell_id for i in found}]
    if missing:
        raise ConfigError(f"nothing superseded to restore for {', '.join(missing)} (in {store.superseded_dir})")
    if not found:
        typer.echo("Nothing superseded to restore.")
        return
    if list_only or not (cells or all_cells):
        typer.echo(f"{len(found)} cell(s) can be restored: ablate restore --cell ID (or --all)"
                   f"{'' if list_only else ' (nothing was changed)'}")
        return
    with store.lock(purpose="restore"), store.claim_all([i.cell_id for i in found]):
        if busy := [i.cell_id for i in found if store.cell_files(i.cell_id)]:
            reset_hint = " or ".join(f"ablate reset --rep {current[c]['representation']} --layer-config "
                                     f"{current[c]['layer_config']} --yes" for c in busy[:2])
            raise ConfigError(f"{', '.join(busy)} {'has' if len(busy) == 1 else 'have'} checkpoints now; refusing to "
                              "overwrite them; nothing was restored", hint=f"reset first: {reset_hint}")
        moved = sum(superseded.restore(store, item) for item in found)
    typer.echo(f"Restored {moved} file(s) of {len(found)} cell(s) into {store.checkpoints}.")
