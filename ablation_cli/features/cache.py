"""Content-addressed feature cache, shared by every experiment and run that uses the same cache folder.

Layout under ``<cache-dir>/features/``::

    <dataset-key>/index.json                 labels, label names, sample ids, layers, shapes (sealed JSON)
    <dataset-key>/<rep>-v<version>.npy       (N, D) float32, every unit of the dataset in sorted order
    <dataset-key>/<rep>-v<version>.json      sealed meta: sha256 and size of the .npy, units, dims, dataset
    <dataset-key>/<rep>-v<version>.lock      held while one process computes the entry

The dataset key hashes what decides the rows and their values (dataset kind, fingerprint, layers and
the loading options that drop or relabel rows), so a data change is a new key, never a stale hit. The
representation's version is in the file name, so a version bump is a miss. The .npy is written first
and the meta last, each atomically: an entry without a valid meta is absent. A load checks the .npy's
size and a digest of a sample of it (its header and 64 blocks spread through it: at most 4 MiB read,
whatever the size), so that each Slurm task and worker starts at once; ``ablate cache verify`` checks
every byte against the full sha256. An entry that fails either check is deleted and recomputed.
Arrays are plain .npy (``allow_pickle=False``), memory-mapped on read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from filelock import FileLock, Timeout

from ablation_cli.data.table import DatasetInfo
from ablation_cli.durable import (
    atomic_write,
    atomic_write_json,
    crash_point,
    dead_writers_temp,
    fsync_dir,
    now_iso,
    read_json,
    read_sealed,
    seal,
    sha256_file,
    temp_name,
)
from ablation_cli.errors import environment_failure
from ablation_cli.features import registry
from ablation_cli.features.cache_docs import CacheEntryDoc, EntryInfo, IndexDoc

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1
_ROW_OPTIONS = ("label_field", "on_mismatch", "drop_nonfinite", "split")
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 64 * 1024


def sample_digest(path: Path) -> str:
    """sha256 of a file's size and of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes at evenly spaced offsets
    (the first holds the .npy header, the last ends the file): what a load checks."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    last = max(size - SAMPLE_BLOCK, 0)
    with path.open("rb") as fh:
        for offset in sorted({last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)}):
            fh.seek(offset)
            digest.update(fh.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def dataset_key(info: DatasetInfo) -> str:
    """What decides the rows of a loaded dataset and their values; not its name or where it lives."""
    options = {**{k: info.details.get(k) for k in _ROW_OPTIONS if k in info.details}, **info.options}
    doc = {"schema": CACHE_SCHEMA, "kind": info.kind, "fingerprint": info.fingerprint,
           "layers": list(info.layers), "options": options}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


class _Chunks:
    """A file numpy cannot see through: np.save then writes with ``write`` (whose OSError carries
    ENOSPC) instead of ``tofile`` (whose error on a full disk is only "N requested and M written")."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.write = fh.write


def write_npy(path: Path, arr: np.ndarray) -> None:
    """``arr`` as a .npy (no pickle), written atomically."""
    atomic_write(path, lambda fh: np.save(_Chunks(fh), arr, allow_pickle=False))


@dataclass(frozen=True)
class CacheEntry:
    dataset_key: str
    dataset: str
    representation: str
    version: int | str  # a plugin's: '<version>-<source sha>'
    shape: tuple[int, ...]
    bytes: int
    created_at: str
    npy: Path
    meta: Path

    def to_json(self) -> CacheEntryDoc:
        return {"dataset": self.dataset, "dataset_key": self.dataset_key, "representation": self.representation,
                "version": self.version, "shape": list(self.shape), "bytes": self.bytes, "age_s": round(self.age_s, 1),
                "created_at": self.created_at, "path": str(self.npy)}

    @property
    def age_s(self) -> float:
        try:
            return max(0.0, time.time() - self.npy.stat().st_mtime)
        except OSError:
            return 0.0


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.root = root  # <cache-dir>/features

    @classmethod
    def under(cls, cache_dir: Path) -> FeatureCache:
        """The feature cache of a ``--cache-dir`` (its ``features/`` folder)."""
        return cls(cache_dir / "features")

    # -- per-dataset index ----------------------------------------------------------------
    def load_index(self, key: str) -> IndexDoc | None:
        path = self.root / key / "index.json"
        if not path.exists():
            return None
        doc = read_sealed(path)
        if doc is None:
            log.warning("feature cache: damaged index %s; it will be rebuilt from the data", path)
            return None
        return cast(IndexDoc, doc)  # sealed as written by save_index

    def save_index(self, key: str, doc: IndexDoc) -> None:
        self._try(lambda: atomic_write_json(self.root / key / "index.json",
                                            seal({**doc, "meta": {"created_at": now_iso()}})))

    def has_index(self, key: str) -> bool:
        return (self.root / key / "index.json").exists()

    def has(self, key: str, rep: str, version: int | str) -> bool:
        npy, meta, _ = self._paths(key, rep, version)
        return npy.exists() and meta.exists()

    # -- representation entries -----------------------------------------------------------
    def _paths(self, key: str, rep: str, version: int | str) -> tuple[Path, Path, Path]:
        stem = self.root / key / f"{rep}-v{version}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json"), stem.with_suffix(".lock")

    def load(self, key: str, rep: str, version: int | str) -> np.ndarray | None:
        """The cached array (memory-mapped), or None when absent; a corrupt entry is removed."""
        npy, meta_path, _ = self._paths(key, rep, version)
        if not meta_path.exists():
            return None
        problem = None
        try:
            meta = read_sealed(meta_path)
            if meta is None:
                problem = "its meta file is damaged"
            elif not npy.exists() or npy.stat().st_size != meta["bytes"]:
                problem = "its array file is missing or truncated"
            elif (sample_digest(npy) != meta["sample_sha256"] if "sample_sha256" in meta
                  else sha256_file(npy) != meta["sha256"]):  # an entry of an older version: the full check
                problem = "its array file does not match its checksum"
            else:
                arr = np.load(npy, mmap_mode="r", allow_pickle=False)
                if tuple(arr.shape) != tuple(meta["shape"]) or arr.dtype != np.float32:
                    problem = "its array has the wrong shape or dtype"
                else:
                    return arr
        except (OSError, ValueError, KeyError, json.JSONDecodeError, AttributeError) as exc:
            problem = f"it cannot be read ({exc})"
        log.warning("feature cache: entry %s is corrupt (%s); recomputing it", npy.name, problem)
        for path in (meta_path, npy):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None

    def spill(self, key: str, rep: str, version: int | str, shape: tuple[int, int]) -> np.ndarray:
        """A new (rows, D) float32 .npy, memory-mapped, where this process stages an entry too large for memory
        (``store`` then renames it into place). Its space is allocated now: a full disk is an OSError here,
        never a SIGBUS while writing through the map."""
        tmp = self._spill_path(key, rep, version)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        try:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, tmp.stat().st_size)
            finally:
                os.close(fd)
        except OSError:
            del arr
            tmp.unlink(missing_ok=True)
            raise
        return arr

    def _spill_path(self, key: str, rep: str, version: int | str) -> Path:
        npy = self._paths(key, rep, version)[0]
        return npy.parent / temp_name(f"{npy.name}.spill")  # a dead writer's is a leftover, as temps are

    def store(self, key: str, rep: str, version: int | str, arr: np.ndarray, info: EntryInfo) -> None:
        npy, meta_path, _ = self._paths(key, rep, version)
        spilled = Path(getattr(arr, "filename", None) or "")
        staged = spilled == self._spill_path(key, rep, version)
        if staged and np.load(spilled, mmap_mode="r").shape == arr.shape:  # staged by spill()
            if isinstance(arr, np.memmap):
                arr.flush()
            fd = os.open(spilled, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point(f"write:{npy.name}")
            os.replace(spilled, npy)
            fsync_dir(npy.parent)
        else:
            write_npy(npy, np.ascontiguousarray(arr, dtype=np.float32))  # a memmap's rows are written, not copied
            if staged:  # staged, then rows were dropped: written trimmed, the stage removed
                spilled.unlink(missing_ok=True)
        digest = sha256_file(npy)
        meta = {"representation": rep, "version": version, "dataset_key": key, "shape": list(arr.shape),
                "dtype": "float32", "bytes": npy.stat().st_size, "sha256": digest,
                "sample_sha256": sample_digest(npy), **info,
                "meta": {"created_at": now_iso(), "schema": CACHE_SCHEMA}}
        atomic_write_json(meta_path, seal(meta))

    def get_or_compute(self, key: str, rep: str, version: int | str, compute: Callable[[], np.ndarray],
                       info: EntryInfo) -> np.ndarray:
        """One entry, computed at most once across processes."""
        return self.get_or_compute_many(key, {rep: version}, lambda names: {rep: compute()}, info)[rep]

    def get_or_compute_many(self, key: str, reps: dict[str, int | str],
                            compute: Callable[[list[str]], dict[str, np.ndarray]],
                            info: EntryInfo | Callable[[str], EntryInfo]) -> dict[str, np.ndarray]:
        """Entries for ``reps`` (name -> version); the missing ones are computed together, in one call, at
        most once across processes: this process takes their locks (in sorted order, so two processes
        never deadlock), and one that finds a lock held waits and then reads the other's result. A
        representation ``compute`` leaves out (it failed) is neither stored nor returned. ``info``: the
        meta of every entry, or a function of the representation giving it."""
        found = {rep: arr for rep, v in reps.items() if (arr := self.load(key, rep, v)) is not None}
        if found:
            log.info("Features %s: from the cache (%s)", ", ".join(found), self.root / key)
        missing = sorted(set(reps) - set(found))
        if not missing:
            return found
        with contextlib.ExitStack() as held:
            writable = self._try(lambda: held.enter_context(self._locked(key, {rep: reps[rep] for rep in missing})))
            for rep in list(missing) if writable else []:  # computed by another process while we waited?
                if (arr := self.load(key, rep, reps[rep])) is not None:
                    found[rep] = arr
                    missing.remove(rep)
            if missing:
                computed = compute(missing)
                for rep in missing:
                    if rep not in computed:
                        continue
                    meta = info(rep) if callable(info) else info
                    if writable:
                        writable = self._try(functools.partial(self.store, key, rep, reps[rep], computed[rep], meta))
                    found[rep] = computed[rep]
        return found

    def _try(self, action: Callable[[], object]) -> bool:
        """Run a write into the cache; on a full, read-only or forbidden cache folder, warn and say False:
        the features are then kept in memory for this run, which goes on."""
        try:
            action()
        except OSError as exc:
            failure = environment_failure(exc)
            if failure is None:
                raise
            log.warning("feature cache: cannot write to %s (%s); the features are computed in memory for this run",
                        self.root, failure.message)
            return False
        return True

    @contextlib.contextmanager
    def _locked(self, key: str, reps: dict[str, int | str]) -> Iterator[None]:
        (self.root / key).mkdir(parents=True, exist_ok=True)
        held: list[Any] = []
        try:
            for rep in sorted(reps):
                lock = FileLock(str(self._paths(key, rep, reps[rep])[2]))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    log.info("Features %s: another process is computing them; waiting for it", rep)
                    lock.acquire()
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    # -- listing and pruning --------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        found = []
        for meta_path in sorted(self.root.glob("*/*-v*.json")):
            try:
                meta = read_json(meta_path)
                found.append(CacheEntry(
                    dataset_key=meta_path.parent.name, dataset=str(meta.get("dataset", "?")),
                    representation=str(meta["representation"]), version=_version(meta["version"]),
                    shape=tuple(meta["shape"]), bytes=int(meta["bytes"]),
                    created_at=str(meta.get("meta", {}).get("created_at", "?")),
                    npy=meta_path.with_suffix(".npy"), meta=meta_path))
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
                continue
        return found

    def verify(self, entry: CacheEntry) -> str | None:
        """Check every byte of ``entry`` against its full sha256 (``ablate cache verify``); a corrupt entry is
        deleted (the next run recomputes it). None when it is whole, else what is wrong."""
        meta = read_sealed(entry.meta)
        if meta is None:
            problem = "its meta file is damaged"
        elif not entry.npy.exists() or entry.npy.stat().st_size != meta["bytes"]:
            problem = "its array file is missing or truncated"
        elif sha256_file(entry.npy) != meta["sha256"]:
            problem = "its array file does not match its checksum"
        else:
            return None
        for path in (entry.meta, entry.npy):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return problem

    def leftovers(self) -> Iterator[Path]:
        """Temp files of interrupted writes and arrays without a meta file (never completed),
        except those of a process still writing them."""
        for tmp in self.root.glob("*/.*.tmp"):
            if dead_writers_temp(tmp):
                yield tmp
        for npy in self.root.glob("*/*-v*.npy"):
            if not npy.with_suffix(".json").exists():
                lock = FileLock(str(npy.with_suffix(".lock")))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # being computed right now
                lock.release()
                yield npy

    def select_for_prune(self, older_than_days: float | None = None, dataset: str | None = None,
                         remove_all: bool = False) -> list[CacheEntry]:
        """Entries ``ablate cache prune`` removes: always those of an old (or unknown) representation
        version, plus every entry (``remove_all``), those of ``dataset``, or those older than asked."""
        chosen = []
        for e in self.entries():
            try:
                current: int | str | None = registry.get(e.representation).cache_version
            except KeyError:  # unknown: an old built-in goes; a plugin not loaded here is not judged
                current = e.version if isinstance(e.version, str) else None
            if (remove_all or current != e.version or (dataset is not None and e.dataset == dataset)
                    or (older_than_days is not None and e.age_s > older_than_days * 86400)):
                chosen.append(e)
        return chosen

    def prune(self, entries: list[CacheEntry], leftovers: list[Path]) -> tuple[list[CacheEntry], int]:
        """Remove ``entries`` (except those a running process holds) and ``leftovers``: the entries kept,
        and the bytes freed."""
        freed, kept = 0, []
        for e in entries:
            if self.remove(e):
                freed += e.bytes
            else:
                kept.append(e)
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                freed += size
        return kept, freed

    def remove(self, entry: CacheEntry) -> bool:
        """Delete one entry unless a process holds its lock; True when removed."""
        lock = FileLock(str(entry.npy.with_suffix(".lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            for path in (entry.meta, entry.npy):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            lock.release()
        with contextlib.suppress(FileNotFoundError):
            entry.npy.with_suffix(".lock").unlink()
        folder = entry.npy.parent
        if not any(folder.glob("*-v*.json")):  # nothing left for this dataset: drop its index too
            shutil.rmtree(folder, ignore_errors=True)
        return True


def _version(value: object) -> int | str:
    """A built-in's version (an int), or a plugin's '<version>-<source sha>'."""
    if isinstance(value, str) and "-" in value:
        return value
    return int(value)  # type: ignore[call-overload]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
