"""Live progress of a run: rich bars on a terminal, periodic plain lines otherwise (nohup)."""

from __future__ import annotations

import logging
import math
import time

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
