"""Live progress: the events a run emits (Reporter), and ``track`` for long loops (reading files).

Plain periodic log lines by default (nohup, pipes, children); on a terminal the CLI installs rich
bars from ``reports.terminal`` (a RichReporter, and ``use_bar``), so this layer never imports rich.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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


T = TypeVar("T")
Bar = Callable[[Iterable[Any], int, str], Iterator[Any]]
_bar: Bar | None = None


def use_bar(bar: Bar | None) -> None:
    """Draw ``track`` loops with ``bar(items, total, what)`` (the CLI's rich bar on a terminal)."""
    global _bar
    _bar = bar


def track(items: Iterable[T], total: int, what: str) -> Iterator[T]:
    """Yield ``items``, showing progress: the installed bar, or a log line every 10% (or 10 s)."""
    if _bar is not None:
        yield from _bar(items, total, what)
        return
    step = max(1, total // 10)
    started = last = time.monotonic()
    for i, item in enumerate(items, start=1):
        now = time.monotonic()
        if i % step == 0 or i == total or now - last > 10:
            last = now
            rate = i / max(now - started, 1e-9)
            log.info("  read %d/%d %s (%.0f/s, ETA %.0fs)", i, total, what, rate, (total - i) / rate)
        yield item
