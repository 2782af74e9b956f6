"""Durable file I/O shared by every writer: atomic writes, sealed (checksummed) JSON, verified reads.

An atomic write goes to a temp file in the target's folder (``.<name>.@<host>.<pid>.tmp``), is flushed
and fsynced, then ``os.replace``d over the target, and the folder is fsynced: after ``kill -9`` or a
power loss a reader sees the old file or the new one, never a torn one, and the old file is never
deleted before the new one is in place. The host and pid in the temp name let a cleaner tell a dead
writer's leftovers from a live writer's file, also on a folder that several nodes share.

Nothing here imports numpy or torch: ``ablate status`` reads through it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1

# Tests only: ``ABLATE_CRASH_AT=<point>[@<n>]`` makes the process SIGKILL itself the n-th time it
# passes a named point (a glob), so a test can kill -9 ablate in a chosen phase, deterministically.
# Points: ``load`` (a LoRA file read), ``features`` (a layer of the feature pass), ``epoch``,
# ``write:<file name>`` (an atomic write, its temp file complete, before the rename).
CRASH_ENV = "ABLATE_CRASH_AT"
# Tests only: ``ABLATE_PAUSE_AT=<point>=<seconds>`` sleeps each time the process passes the point, so that
# a run outlasts a Slurm time limit without a minute of training.
PAUSE_ENV = "ABLATE_PAUSE_AT"
_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if pause := os.environ.get(PAUSE_ENV):
        point, _, seconds = pause.rpartition("=")
        if fnmatch.fnmatchcase(name, point):
            time.sleep(float(seconds))
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if fnmatch.fnmatchcase(name, point):
        _crash_hits[point] = _crash_hits.get(point, 0) + 1
        if _crash_hits[point] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# A pid means nothing on another node: another host's temp is a leftover only once this old (no
# atomic write of ablate's, a feature pass included, stays open this long)
OTHER_HOST_TEMP_AGE_S = 24 * 3600


@functools.cache
def host_tag() -> str:
    """This host's name as a temp name carries it (dots would split the name's fields)."""
    return socket.gethostname().replace(".", "_") or "localhost"


def temp_name(name: str) -> str:
    """The name of this process's temp file (or staging folder) for ``name``."""
    return f".{name}.@{host_tag()}.{os.getpid()}.tmp"


def dead_writers_temp(path: Path) -> bool:
    """Whether ``path``, a temp file or staging folder (``.<name>.@<host>.<pid>.tmp``), is a leftover: on
    this host, its pid is gone; of another host, it is older than OTHER_HOST_TEMP_AGE_S. A name without a
    host (older versions) counts as this host's."""
    stem = path.name.removesuffix(".tmp")
    head, _, pid = stem.rpartition(".")
    host = head.rpartition(".")[2]
    if host.startswith("@") and host[1:] != host_tag():
        try:
            return time.time() - path.stat().st_mtime > OTHER_HOST_TEMP_AGE_S
        except FileNotFoundError:
            return False  # its writer renamed it: not ours to remove
    return not (path.name.endswith(".tmp") and pid.isdigit() and pid_alive(int(pid)))


def temp_path(path: Path) -> Path:
    """Where an atomic write of ``path`` by this process stages its bytes."""
    return path.parent / temp_name(path.name)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(binary_file)``: temp file, fsync, os.replace, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, str(tmp)):  # a full disk names no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with path.open("r", encoding="utf-8") as fh:
        return json.load(fh)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing, unreadable or holds something else."""
    try:
        doc = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def checksum(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``doc`` without ``meta.checksum``."""
    meta = {k: v for k, v in dict(doc.get("meta") or {}).items() if k != "checksum"}
    return hashlib.sha256(_canonical({**doc, "meta": meta})).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``meta.schema_version`` and ``meta.checksum`` (in place; returns ``doc``)."""
    doc.setdefault("meta", {})
    doc["meta"]["schema_version"] = SCHEMA_VERSION
    doc["meta"]["checksum"] = checksum(doc)
    return doc


def read_sealed(path: Path) -> dict[str, Any] | None:
    """A sealed JSON object, or None when it is unreadable or its checksum is wrong."""
    doc = read_json_object(path)
    if doc is None or not isinstance(doc.get("meta"), dict):
        return None
    return doc if doc["meta"].get("checksum") == checksum(doc) else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
