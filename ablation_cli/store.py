"""The checkpoint store: atomic writes, verified reads, quarantine, superseded, lock.

Layout under one experiment folder::

    experiment.json
    checkpoints/<cell>.json                 finished cell
    checkpoints/runs/<cell>/run_<k>.json    finished run k (1-based)
    checkpoints/.quarantine/                unreadable or corrupt files, moved aside
    checkpoints/.superseded/                valid files made under another config
    failures/<cell>.json                    last error of a failed cell
    progress/<cell>.json                    heartbeat of a running cell
    run.log

Nothing here imports torch: status, reset and merge read the store directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ablation_cli.errors import ExperimentError, LockHeldError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_REQUIRED = {
    "run": ("run", "seed", "metrics", "meta"),
    "cell": ("representation", "layer_config", "num_runs", "per_run_results", "meta"),
}
_RUN_FILE = re.compile(r"^run_(\d+)\.json$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def checksum(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``doc`` without ``meta.checksum``."""
    meta = {k: v for k, v in dict(doc.get("meta") or {}).items() if k != "checksum"}
    return hashlib.sha256(_canonical({**doc, "meta": meta})).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    doc.setdefault("meta", {})
    doc["meta"]["schema_version"] = SCHEMA_VERSION
    doc["meta"]["checksum"] = checksum(doc)
    return doc


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, fsync, os.replace, fsync the folder.

    Readers see the old file or the new one, never a partial one; the old file
    is never deleted before the new one is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with path.open("r", encoding="utf-8") as fh:
        return json.load(fh)


def diff_parts(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable changed fields between two fingerprint part dicts: ``dropout: 0.3 -> 0.5``."""
    changes = []
    for part in ("config", "dataset", "code"):
        a, b = old.get(part) or {}, new.get(part) or {}
        if not isinstance(a, Mapping):
            a = {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changes.append(f"{key}: {a.get(key, '(none)')} -> {b.get(key, '(none)')}")
    return changes


State = Literal["ok", "missing", "corrupt", "stale"]


@dataclass
class Verdict:
    """The result of verifying one checkpoint file."""

    state: State
    path: Path
    doc: dict[str, Any] | None = None
    reason: str = ""
    changes: list[str] = field(default_factory=list)


FINGERPRINT_KEYS = ("fingerprint", "config", "dataset", "code")


def expected_fingerprint(cell_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint record a cell's checkpoints must carry, from its entry in experiment.json."""
    return {k: cell_spec[k] for k in FINGERPRINT_KEYS}


def verify(path: Path, kind: str, expected: Mapping[str, Any] | None) -> Verdict:
    """Parse, check schema, checksum and fingerprint. Never raises for bad content.

    ``expected`` is the cell's fingerprint record ``{"fingerprint", "config", "dataset", "code"}``
    (None skips the fingerprint check).
    """
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return Verdict("missing", path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Verdict("corrupt", path, reason=f"unreadable JSON ({type(exc).__name__}: {exc})")
    if not isinstance(doc, dict):
        return Verdict("corrupt", path, reason="not a JSON object")
    missing = [k for k in _REQUIRED[kind] if k not in doc]
    meta = doc.get("meta")
    if missing or not isinstance(meta, dict):
        return Verdict("corrupt", path, reason=f"wrong schema (missing {', '.join(missing) or 'meta'})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        return Verdict("corrupt", path, reason=f"schema_version {meta.get('schema_version')!r} != {SCHEMA_VERSION}")
    if meta.get("checksum") != checksum(doc):
        return Verdict("corrupt", path, reason="checksum mismatch (file was modified or damaged)")
    if expected is not None and meta.get("fingerprint") != expected["fingerprint"]:
        changes = diff_parts(meta, expected) or ["fingerprint differs"]
        return Verdict("stale", path, doc=doc, reason="made under another configuration", changes=changes)
    return Verdict("ok", path, doc=doc)


class ExperimentStore:
    """One experiment folder. All paths are built from validated cell ids, never raw user text."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.runs_root = self.checkpoints / "runs"
        self.quarantine_dir = self.checkpoints / ".quarantine"
        self.superseded_dir = self.checkpoints / ".superseded"
        self.failures_dir = root / "failures"
        self.progress_dir = root / "progress"
        self.experiment_file = root / "experiment.json"
        self.log_file = root / "run.log"

    # -- paths ---------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.checkpoints / f"{cell_id}.json"

    def runs_dir(self, cell_id: str) -> Path:
        return self.runs_root / cell_id

    def run_path(self, cell_id: str, k: int) -> Path:
        return self.runs_dir(cell_id) / f"run_{k}.json"

    def failure_path(self, cell_id: str) -> Path:
        return self.failures_dir / f"{cell_id}.json"

    def progress_path(self, cell_id: str) -> Path:
        return self.progress_dir / f"{cell_id}.json"

    # -- experiment record ------------------------------------------------------------
    def exists(self) -> bool:
        return self.experiment_file.exists()

    def read_experiment(self) -> dict[str, Any]:
        try:
            doc = read_json(self.experiment_file)
        except FileNotFoundError:
            raise ExperimentError(
                f"no experiment in {self.root} (experiment.json missing)", hint="start one with `ablate run`"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ExperimentError(f"{self.experiment_file} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or "cells" not in doc:
            raise ExperimentError(f"{self.experiment_file} is not an ablate experiment record")
        return doc

    def write_experiment(self, doc: dict[str, Any]) -> None:
        atomic_write_json(self.experiment_file, doc)

    # -- runs and cells ----------------------------------------------------------------
    def run_indices(self, cell_id: str) -> list[int]:
        folder = self.runs_dir(cell_id)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _RUN_FILE.match(p.name)))

    def write_run(self, cell_id: str, k: int, doc: dict[str, Any]) -> None:
        atomic_write_json(self.run_path(cell_id, k), seal(doc))

    def write_cell(self, cell_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.cell_path(cell_id), seal(doc))

    def _move_aside(self, path: Path, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        rel = path.relative_to(self.checkpoints).as_posix().replace("/", "__")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = folder / f"{rel}.{stamp}"
        n = 1
        while target.exists():
            target = folder / f"{rel}.{stamp}.{n}"
            n += 1
        os.replace(path, target)
        _fsync_dir(path.parent)
        return target

    def load_verified(self, path: Path, kind: str, expected: Mapping[str, Any]) -> Verdict:
        """Verify a checkpoint; move a corrupt one to .quarantine/ and a stale one to .superseded/."""
        verdict = verify(path, kind, expected)
        rel = path.relative_to(self.root)
        if verdict.state == "corrupt":
            target = self._move_aside(path, self.quarantine_dir)
            log.warning("%s is corrupt (%s): moved to %s, will recompute", rel, verdict.reason,
                        target.relative_to(self.root))
        elif verdict.state == "stale":
            target = self._move_aside(path, self.superseded_dir)
            log.warning("%s was made under another configuration (%s): moved to %s, will recompute",
                        rel, "; ".join(verdict.changes), target.relative_to(self.root))
        return verdict

    # -- failures and heartbeats ---------------------------------------------------------
    def write_failure(self, cell_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.failure_path(cell_id), {"schema_version": SCHEMA_VERSION, **doc})

    def clear_failure(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(cell_id).unlink()

    def heartbeat(self, cell_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.progress_path(cell_id), {
            "schema_version": SCHEMA_VERSION, "host": socket.gethostname(), "pid": os.getpid(),
            "updated_at": now_iso(), "updated_ts": time.time(), **doc,
        })

    def clear_heartbeat(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.progress_path(cell_id).unlink()

    def remove_temp_files(self) -> int:
        """Delete temp files a killed writer left behind (call with the lock held)."""
        stray = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for p in stray:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return len(stray)

    def cell_files(self, cell_id: str) -> list[Path]:
        """Every file that belongs to one cell (what reset deletes)."""
        paths = [self.cell_path(cell_id), self.failure_path(cell_id), self.progress_path(cell_id)]
        found = [p for p in paths if p.exists()]
        folder = self.runs_dir(cell_id)
        if folder.is_dir():
            found.extend(sorted(folder.iterdir()))
        return found

    @contextlib.contextmanager
    def claim(self, cell_id: str) -> Iterator[bool]:
        """Try to claim a cell for this process (non-blocking): True while held, False when another
        process (a worker, a Slurm task, another run) holds it. The OS lock dies with its process."""
        from filelock import FileLock, Timeout

        path = self.checkpoints / ".claims" / f"{cell_id}.lock"
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

    def delete_cell(self, cell_id: str) -> int:
        files = self.cell_files(cell_id)
        for p in files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.runs_dir(cell_id).rmdir()
        return len(files)


# -- the experiment lock ---------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def experiment_lock(root: Path, purpose: str = "run") -> Iterator[None]:
    """Hold the exclusive lock on an experiment folder, or raise LockHeldError at once.

    The OS lock (filelock: flock on POSIX) dies with its process, so a lock left by
    a killed run is free; its holder record (.lock.json) tells us whose it was.
    """
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    info_path = root / ".lock.json"
    lock = FileLock(str(root / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_holder(info_path)
        raise LockHeldError(
            f"another ablate {holder.get('purpose', 'run')} holds {root}: host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}",
            hint="wait for it, or stop it first",
        ) from None
    try:
        old = _read_holder(info_path)
        if old and old.get("pid") != os.getpid():
            alive = old.get("host") == socket.gethostname() and pid_alive(int(old.get("pid", -1)))
            state = "still running but no longer holding it" if alive else "no longer running"
            log.warning("taking over the lock left by pid %s on host %s (started %s), %s",
                        old.get("pid"), old.get("host"), old.get("started_at"), state)
        atomic_write_json(info_path, {"host": socket.gethostname(), "pid": os.getpid(),
                                      "started_at": now_iso(), "purpose": purpose})
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            info_path.unlink()
        lock.release()


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        doc = read_json(path)
        return doc if isinstance(doc, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}
