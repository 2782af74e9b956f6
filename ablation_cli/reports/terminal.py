"""Everything drawn with rich, the one module that imports it (lazily: `ablate status` in a pipe
never loads it): the console log handler, the live progress bars of a run, the status table."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ablation_cli import logs, progress
from ablation_cli.progress import PlainReporter, Reporter
from ablation_cli.reports.status_view import format_notes, format_status_plain, format_totals, status_grid
from ablation_cli.status import row_label

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)


def setup(verbose: bool) -> Console | None:
    """Console logging for a command: rich lines and bars on a terminal (returns the rich console
    the progress bars share), plain timestamped lines otherwise (returns None)."""
    if not sys.stderr.isatty():
        logs.setup_console(verbose)
        return None
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    logs.setup_console(verbose, RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=verbose,
                                            log_time_format="%H:%M:%S"))
    progress.use_bar(rich_bar)
    return console


def reporter(console: Console | None) -> Reporter:
    """Progress bars of a run on the terminal's console; periodic plain lines without one."""
    return RichReporter(console) if console is not None else PlainReporter()


class RichReporter(Reporter):
    """Bars for cells and for the runs and epochs of the current cell."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        )
        self._cells: Any = None
        self._runs: Any = None
        self._epochs: Any = None

    def start(self, total_cells: int, done_cells: int) -> None:
        self.progress.start()
        self._cells = self.progress.add_task("cells", total=total_cells, completed=done_cells, info="")

    def cell_start(self, cell_id: str, todo: list[int], num_runs: int) -> None:
        for task in (self._runs, self._epochs):
            if task is not None:
                self.progress.remove_task(task)
        self._runs = self.progress.add_task(f"  {cell_id} runs", total=num_runs,
                                            completed=num_runs - len(todo), info="")
        self._epochs = self.progress.add_task("    epochs", total=None, info="")

    def epoch(self, cell_id: str, k: int, num_runs: int, epoch: int, max_epochs: int, val_acc: float) -> None:
        if self._epochs is None:
            return
        info = "" if math.isnan(val_acc) else f"run {k}: val_acc {val_acc:.3f}"
        self.progress.update(self._epochs, completed=epoch, total=max_epochs, info=info)

    def run_end(self, cell_id: str, k: int, num_runs: int) -> None:
        if self._runs is not None:
            self.progress.advance(self._runs)

    def cell_end(self, cell_id: str) -> None:
        if self._cells is not None:
            self.progress.advance(self._cells)

    def close(self) -> None:
        self.progress.stop()


_STYLE = {"done": "green", "imported": "blue", "running": "cyan", "failed": "red", "stale": "yellow",
          "interrupted": "magenta", "pending": "dim"}


def status_table(model: Mapping[str, Any]) -> Any:
    from rich.table import Table

    caption = "\n".join([format_totals(model), *format_notes(model)])
    table = Table(title=f"{model['experiment']} on {model['dataset']}", caption=caption)
    rows = status_grid(model)
    for name in rows[0]:
        table.add_column(name)
    by_id = {(row_label(c["representation"], c.get("classifier"), c.get("axes")), c["layer_config"]): c
             for c in model["cells"]}
    for rep, *texts in rows[1:]:
        styled = []
        for lc, text in zip(model["layer_configs"], texts):
            c = by_id.get((rep, lc))
            styled.append(f"[{_STYLE[c['state']]}]{text}[/]" if c else text)
        table.add_row(rep, *styled)
    return table


def rich_bar(items: Iterable[Any], total: int, what: str) -> Iterator[Any]:
    """``progress.track`` on a terminal: a bar with rate and ETA, then one log line."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"reading {what}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TextColumn("ETA"), TimeRemainingColumn())
    started = time.monotonic()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("read", total=total, rate="")
        for i, item in enumerate(items, start=1):
            bar.update(task, advance=1, rate=f"{i / max(time.monotonic() - started, 1e-9):.0f}/s")
            yield item
    log.info("  read %d %s (%.0f/s)", total, what, total / max(time.monotonic() - started, 1e-9))


def show_status(model: Mapping[str, Any]) -> None:
    """The status table: rich on a terminal, plain text otherwise (no control codes)."""
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(status_table(model))
    else:
        print(format_status_plain(model), flush=True)


def watch_status(build: Callable[[], Mapping[str, Any]], interval: float) -> None:
    """Redraw the status every ``interval`` seconds until Ctrl-C."""
    try:
        if sys.stdout.isatty():
            from rich.live import Live

            with Live(status_table(build()), auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(status_table(build()), refresh=True)
        while True:
            print(format_status_plain(build()) + "\n", end="", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return
