"""Who works in an experiment folder now: the experiment lock, cell claims, heartbeats, failures and
Slurm submissions. :class:`ExperimentStore` (store.py) is this class plus the checkpoints.

Layout (under the experiment folder)::

    checkpoints/.claims/<cell>.lock         OS lock held by the process running a cell
    failures/<cell>.json                    last error of a failed cell
    progress/<cell>.json                    heartbeat of a running cell
    slurm/submissions.json  slurm/logs/     what was submitted to Slurm, job scripts and logs
    .lock  .lock.json                       the experiment lock and its holder
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ablation_cli.durable import (
    SCHEMA_VERSION,
    atomic_write_json,
    dead_writers_temp,
    now_iso,
    pid_alive,
    read_json,
    read_json_object,
)
from ablation_cli.errors import LockHeldError
from ablation_cli.records import Failure, Heartbeat, Submission

log = logging.getLogger(__name__)


class FolderActivity:
    """The files of one experiment folder that say who runs what in it, and what failed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.claims_dir = root / "checkpoints" / ".claims"
        self.failures_dir = root / "failures"
        self.progress_dir = root / "progress"
        self.slurm_logs_dir = root / "slurm" / "logs"
        self.submissions_file = root / "slurm" / "submissions.json"
        self.lock_file = root / ".lock"
        self.lock_info_file = root / ".lock.json"

    def failure_path(self, cell_id: str) -> Path:
        return self.failures_dir / f"{cell_id}.json"

    def progress_path(self, cell_id: str) -> Path:
        return self.progress_dir / f"{cell_id}.json"

    # -- failures and heartbeats ---------------------------------------------------------
    def write_failure(self, cell_id: str, doc: Mapping[str, object]) -> None:
        atomic_write_json(self.failure_path(cell_id), {"schema_version": SCHEMA_VERSION, **doc})

    def read_failure(self, cell_id: str) -> Failure | None:
        doc = read_json_object(self.failure_path(cell_id))
        return Failure.from_json(doc) if doc is not None else None

    def clear_failure(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(cell_id).unlink()

    def heartbeat(self, cell_id: str, doc: Mapping[str, object]) -> None:
        atomic_write_json(self.progress_path(cell_id), {
            "schema_version": SCHEMA_VERSION, "host": socket.gethostname(), "pid": os.getpid(),
            "updated_at": now_iso(), "updated_ts": time.time(), **doc,
        })

    def read_heartbeat(self, cell_id: str) -> Heartbeat | None:
        doc = read_json_object(self.progress_path(cell_id))
        return Heartbeat.from_json(doc) if doc is not None else None

    def clear_heartbeat(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.progress_path(cell_id).unlink()

    def remove_temp_files(self) -> int:
        """Delete temp files their writers left behind: never those of a live writer (a Slurm task, a merge),
        see durable.dead_writers_temp."""
        stray = [p for p in self.root.rglob(".*.tmp") if p.is_file() and dead_writers_temp(p)]
        for p in stray:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return len(stray)

    # -- Slurm submissions --------------------------------------------------------------
    def read_submissions(self) -> list[Submission]:
        try:
            doc = read_json(self.submissions_file)
        except (OSError, json.JSONDecodeError):
            return []
        return doc if isinstance(doc, list) else []

    def has_submissions(self) -> bool:
        return self.submissions_file.exists()

    def add_submission(self, record: Submission) -> None:
        self.write_submissions([*self.read_submissions(), record])

    def write_submissions(self, records: Sequence[Submission]) -> None:
        atomic_write_json(self.submissions_file, records)

    # -- locks ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, cell_id: str) -> Iterator[bool]:
        """Try to claim a cell for this process (non-blocking): True while held, False when another
        process (a worker, a Slurm task, another run) holds it. The OS lock dies with its process."""
        from filelock import FileLock, Timeout  # slow to import: `ablate status` takes no lock

        path = self.claims_dir / f"{cell_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    @contextlib.contextmanager
    def claim_all(self, cell_ids: list[str]) -> Iterator[None]:
        """Claim every cell of ``cell_ids`` for this process, or raise LockHeldError (exit 3) naming a
        cell another process (a Slurm task, a worker) holds and who that is, from its heartbeat."""
        with contextlib.ExitStack() as stack:
            for cell_id in cell_ids:
                if not stack.enter_context(self.claim(cell_id)):
                    beat = read_json_object(self.progress_path(cell_id)) or {}
                    who = (f"host {beat.get('host', '?')}, pid {beat.get('pid', '?')}" if beat else "another process")
                    raise LockHeldError(f"{cell_id} is being trained right now ({who}); nothing was changed",
                                        hint="wait for it to finish, or stop it (scancel its Slurm job) first")
            yield

    @contextlib.contextmanager
    def lock(self, purpose: str = "run") -> Iterator[None]:
        """Hold the exclusive lock on the experiment folder, or raise LockHeldError at once.

        The OS lock (filelock: flock on POSIX) dies with its process, so a lock left by
        a killed run is free; its holder record (.lock.json) tells us whose it was.
        """
        from filelock import FileLock, Timeout  # slow to import: `ablate status` takes no lock

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = read_json_object(self.lock_info_file) or {}
            raise LockHeldError(
                f"another ablate {holder.get('purpose', 'run')} holds {self.root}: host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}",
                hint="wait for it, or stop it first",
            ) from None
        try:
            self._take_over(purpose)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.lock_info_file.unlink()
            lock.release()

    def _take_over(self, purpose: str) -> None:
        """Say whose lock a killed holder left, then record this process as the holder."""
        old = read_json_object(self.lock_info_file) or {}
        if old and old.get("pid") != os.getpid():
            alive = old.get("host") == socket.gethostname() and pid_alive(int(old.get("pid", -1)))
            state = "still running but no longer holding it" if alive else "no longer running"
            log.warning("taking over the lock left by pid %s on host %s (started %s), %s",
                        old.get("pid"), old.get("host"), old.get("started_at"), state)
        atomic_write_json(self.lock_info_file, {"host": socket.gethostname(), "pid": os.getpid(),
                                                "started_at": now_iso(), "purpose": purpose})
