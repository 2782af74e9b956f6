"""``ablate status``: where the grid stands, once, as JSON, or refreshed with --watch (files only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ablation_cli.cli.options import ExperimentOpt, OutputDir, PickDataset

if TYPE_CHECKING:
    from ablation_cli.status import StatusModel


def status(
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (keys in docs/outputs.md).")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    by: Annotated[str | None, typer.Option("--by", metavar="AXIS", help="Also group the cells by an axis: "
                  "layer_config, representation, classifier or a swept setting (training.lr).")] = None,
) -> None:
    """Progress table: state of every cell, test accuracy of finished ones, time spent, ETA. Reads files only."""
    from ablation_cli.executors.slurm_queue import status_with_queue
    from ablation_cli.reports.terminal import show_status, watch_status
    from ablation_cli.store import ExperimentStore
    from ablation_cli.tracking import configured_uri, untracked_runs

    store = ExperimentStore.find(output_dir, dataset, experiment)

    def model() -> StatusModel:
        doc = status_with_queue(store)
        if uri := configured_uri(store):
            doc["tracking"] = {"mlflow": uri, "untracked_runs": untracked_runs(store, uri)}
        return doc

    if by is not None:
        from ablation_cli.reports.status_view import format_groups
        from ablation_cli.status import group_by

        doc = model()
        groups = group_by(doc, by)
        if as_json:
            typer.echo(json.dumps({**doc, "by": {"axis": by, "groups": groups}}, indent=1))
        else:
            show_status(doc)
            typer.echo(format_groups(by, groups))
    elif as_json:
        typer.echo(json.dumps(model(), indent=1))
    elif watch:
        watch_status(model, interval)
    else:
        show_status(model())
