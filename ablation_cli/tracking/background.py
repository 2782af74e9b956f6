"""Logging from the grid, in the background: never costs a run.

The grid only queues work: one background thread per process imports mlflow, opens the store and
logs, while training goes on (torch computes outside the GIL). The first failure logs one warning and
stops tracking for the rest of the process. At exit the process waits for the queue (at most
FLUSH_TIMEOUT_S); what a kill -9 leaves unlogged, `ablate track sync` logs later.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ablation_cli.store import ExperimentStore
from ablation_cli.tracking.ledger import cells_on_disk, untracked
from ablation_cli.tracking.sync import FLUSH_TIMEOUT_S, SyncReport, Tracker, first_line

log = logging.getLogger(__name__)

_trackers: dict[tuple[str, str], Tracker | None] = {}  # (uri, folder) -> tracker; None once it failed


class _Background:
    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[tuple[str, ...], Callable[[], None]]] = queue.Queue()
        self.pending: set[tuple[str, ...]] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def submit(self, key: tuple[str, ...], work: Callable[[], None]) -> None:
        with self.lock:
            if key in self.pending:  # already queued: it reads the disk when it runs
                return
            self.pending.add(key)
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="ablate-tracking", daemon=True)
                self.thread.start()
                atexit.register(self.flush)
        self.queue.put((key, work))

    def _work(self) -> None:
        while True:
            key, work = self.queue.get()
            with self.lock:
                self.pending.discard(key)
            try:
                work()
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait for the queued logging; False (with a warning) if it is not done within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks:
            if time.monotonic() > deadline:
                log.warning("tracking: %d item(s) not logged after %.0fs; `ablate track sync` logs them",
                            self.queue.unfinished_tasks, timeout)
                return False
            time.sleep(0.02)
        return True


_background = _Background()


def flush(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    return _background.flush(timeout)


def notify_cell(uri: str | None, store: ExperimentStore, cell_id: str) -> None:
    """After a run or cell checkpoint of ``cell_id`` is written: bring MLflow up to date with it (queued)."""
    _notify(uri, store, ("cell", cell_id), lambda t: t.sync(cell_ids=[cell_id], merge=False))


def notify_merge(uri: str | None, store: ExperimentStore) -> None:
    _notify(uri, store, ("merge",), lambda t: t.sync_merge(SyncReport()))


def catch_up(uri: str | None, store: ExperimentStore, cell_ids: Iterable[str]) -> None:
    """Queue the logging of finished cells MLflow may lack (a run killed before its logging caught up)."""
    if not uri:
        return
    for cell in cells_on_disk(store, cell_ids):
        runs, completion = untracked(store, uri, cell)
        if runs or completion:
            notify_cell(uri, store, cell.cell_id)


def _tracker(uri: str, store: ExperimentStore) -> Tracker | None:
    key = (uri, str(store.root))
    if key not in _trackers:
        try:
            _trackers[key] = Tracker(uri, store)
        except Exception as exc:
            _failed(key, exc)
    return _trackers.get(key)


def _failed(key: tuple[str, str], exc: Exception) -> None:
    _trackers[key] = None
    log.warning("tracking: MLflow at %s failed (%s); the grid goes on without it. Log what is missing "
                "later with: ablate track sync --output-dir %s", key[0], first_line(exc),
                Path(key[1]).parent)


def _notify(uri: str | None, store: ExperimentStore, what: tuple[str, ...],
            action: Callable[[Tracker], object]) -> None:
    if not uri or _trackers.get((uri, str(store.root)), True) is None:
        return  # no tracking, or it failed in this process already

    def work() -> None:
        tracker = _tracker(uri, store)
        if tracker is None:
            return
        try:
            action(tracker)
        except Exception as exc:
            _failed((uri, str(store.root)), exc)

    _background.submit((uri, str(store.root), *what), work)
