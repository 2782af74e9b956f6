"""The ``ablate`` command line: parse, call, render; the only package that imports Typer.

One module per command group; ``root`` holds the app and maps every expected failure (AblateError,
the machine's refusals) to one red line and its exit code. Each command imports what it needs inside
its body, so that ``ablate status`` never loads pydantic, numpy or torch. Rendering lives in ``reports``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ablation_cli.cli import audit, cache, checkpoints, data, results, run, status, track
from ablation_cli.cli.root import app

__all__ = ["app", "flush_tracking", "main"]

# every command, in the order `ablate --help` lists them
COMMANDS: dict[str, Callable[..., None]] = {
    "run": run.run, "status": status.status, "reset": checkpoints.reset, "restore": checkpoints.restore,
    "merge": results.merge, "compare": results.compare, "import": data.import_original, "inspect": data.inspect,
    "reps": data.reps, "features": data.export_features,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(cache.cache_app, name="cache")
app.add_typer(track.track_app, name="track")
app.add_typer(audit.audit_app, name="audit")


def main() -> None:
    """The console script ``ablate`` (and ``python -m ablation_cli``)."""
    from ablation_cli.runtime import apply_env, skip_the_last_collection

    apply_env()  # before torch is first imported, in this process and every child
    skip_the_last_collection()
    try:
        app()
    finally:
        flush_tracking()


def flush_tracking() -> None:
    """Queued MLflow logging, while the interpreter still runs: at exit, mlflow's artifact upload could not
    start its thread pool ("can't register atexit after shutdown")."""
    if (tracking := sys.modules.get("ablation_cli.tracking")) is not None:
        tracking.flush()
