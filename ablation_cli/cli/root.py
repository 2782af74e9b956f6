"""The root of the ``ablate`` command line: the Typer app, and the one place where an expected failure
becomes its exit code, for every command (as httpx maps transport errors in one place)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ablation_cli import __version__, logs
from ablation_cli.errors import AblateError, environment_failure


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """An expected failure becomes one red line (also in run.log, when one is open) and its exit code."""
    try:
        yield
    except OSError as exc:  # a full disk, a read-only folder: one line too, not a traceback
        failure = environment_failure(exc)
        if failure is None:
            raise
        typer.secho(f"error: {failure}", fg=typer.colors.RED, err=True)
        raise typer.Exit(failure.exit_code) from None
    except AblateError as exc:
        logs.error_to_file(exc)
        if details := getattr(exc, "details", None):  # a plugin's own traceback: run.log, and -v
            logs.error_to_file(details.rstrip())
            logs.log.debug("%s", details.rstrip())
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exc.exit_code) from None


class AblateGroup(TyperGroup):
    """The root group. Every command, those of the sub-groups too, runs inside ``exit_codes``: none can
    opt out, and Typer's CliRunner sees what the console script does."""

    def invoke(self, ctx: Any) -> Any:
        with exit_codes():
            return super().invoke(ctx)


app = typer.Typer(
    name="ablate",
    cls=AblateGroup,
    help="Crash-proof, resumable ablation grids (layer config x representation) for LoRA weight-space "
    "classifiers. Every finished run and cell is checkpointed atomically; rerun the same command to resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """ablate: run long ablation grids that survive crashes, and know where they stand."""
