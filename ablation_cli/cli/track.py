"""``ablate track sync``: MLflow, as a view of the checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from ablation_cli.cli.options import ExperimentOpt, MlflowOpt, OutputDir, PickDataset
from ablation_cli.errors import AblateError, ConfigError

track_app = typer.Typer(help="Experiment tracking in MLflow: a view of the checkpoints, browsable in `mlflow ui`.",
                        no_args_is_help=True)


@track_app.command("sync")
def track_sync(output_dir: OutputDir = Path("results"), experiment: ExperimentOpt = None, dataset: PickDataset = None,
               mlflow: MlflowOpt = None) -> None:
    """Log to MLflow whatever it lacks of an experiment: its runs, cells and merge (imported cells too).

    Idempotent: a second sync adds nothing. Runs replaced on disk since (reset) are marked superseded.
    The URI defaults to the one the experiment ran with ([tracking] mlflow or --mlflow).
    """
    from ablation_cli.store import ExperimentStore
    from ablation_cli.tracking import Tracker, absolute_uri, configured_uri, sync_failure

    store = ExperimentStore.find(output_dir, dataset, experiment)
    uri = absolute_uri(mlflow) if mlflow else configured_uri(store)
    if not uri:
        raise ConfigError(f"{store.root} was run without tracking: no MLflow URI to sync to",
                          hint="pass one, e.g. --mlflow sqlite:///mlflow.db")
    with store.lock(purpose="track sync"):
        try:
            report = Tracker(uri, store).sync()
        except AblateError:
            raise
        except Exception as exc:
            raise sync_failure(uri, exc) from exc
    typer.echo(f"Synced {store.root} to MLflow at {uri}: {report.runs} run(s), {report.cells} cell(s), "
               f"{report.merges} merge(s) logged" + (f"; {report.superseded} marked superseded"
                                                     if report.superseded else ""))
