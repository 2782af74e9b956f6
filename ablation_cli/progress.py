"""Live progress of a run: rich bars on a terminal, periodic plain lines otherwise (nohup)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log = logging.getLogger(__name__)


class Reporter:
    """Silent base: the events the orchestrator emits. Tests use it as is."""

    def start(self, total_cells: int, done_cells: int) -> None: ...

    def cell_start(self, cell_id: str, todo: list[int], num_runs: int) -> None: ...

    def epoch(self, cell_id: str, k: int, num_runs: int, epoch: int, max_epochs: int, val_acc: float) -> None: ...

    def run_end(self, cell_id: str, k: int, num_runs: int) -> None: ...

    def cell_end(self, cell_id: str) -> None: ...

    def close(self) -> None: ...


class PlainReporter(Reporter):
    """For pipes and files: one line every ``every_s`` seconds while training."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = time.monotonic()

    def epoch(self, cell_id: str, k: int, num_runs: int, epoch: int, max_epochs: int, val_acc: float) -> None:
        now = time.monotonic()
        if epoch > 0 and now - self._last >= self.every_s:
            self._last = now
            acc = "" if math.isnan(val_acc) else f", val_acc {val_acc:.4f}"
            log.info("  ... %s run %d/%d: epoch %d (max %d)%s", cell_id, k, num_runs, epoch, max_epochs, acc)


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
