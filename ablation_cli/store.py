"""The experiment folder: every path in it, verified checkpoints, the lock and cell claims.

Layout under one experiment folder (``<output-dir>/<experiment>_<dataset>``: a named dataset's
name, or a path's basename and a digest of the resolved path, ``visual_ablation_hf_dataset-3fa2c1``)::

    experiment.json                         resolved config, dataset summary, each cell's fingerprint
    checkpoints/<cell>.json                 finished cell
    checkpoints/runs/<cell>/run_<k>.json    finished run k (1-based)
    checkpoints/runs/<cell>/.state_<k>.pt   run k's training state while it trains (for a resume)
    checkpoints/.quarantine/                unreadable or corrupt files, moved aside
    checkpoints/.superseded/                valid files made under another config
    checkpoints/.claims/<cell>.lock         OS lock held by the process running a cell
    failures/<cell>.json                    last error of a failed cell
    progress/<cell>.json                    heartbeat of a running cell
    results.json .md .csv .tex  plots/      merge outputs
    slurm/submissions.json  slurm/logs/     what was submitted to Slurm, job scripts and logs
    tracking/<cell>.mlflow.json             what MLflow was sent, per tracking URI
    run.log                                 plain-text log
    .lock  .lock.json                       the experiment lock and its holder

This module is the only one that spells these names. Nothing here imports numpy or torch:
status, reset and merge read the store directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ablation_cli.durable import (
    SCHEMA_VERSION,
    atomic_write_json,
    checksum,
    dead_writers_temp,
    fsync_dir,
    now_iso,
    pid_alive,
    read_json,
    read_json_object,
    seal,
)
from ablation_cli.errors import ConfigError, ExperimentError, LockHeldError

log = logging.getLogger(__name__)

_REQUIRED = {
    "run": ("run", "seed", "metrics", "meta"),
    "cell": ("representation", "layer_config", "num_runs", "per_run_results", "meta"),
}
_RUN_FILE = re.compile(r"^run_(\d+)\.json$")
EXPERIMENT_FILE = "experiment.json"
RESULTS_FORMATS = ("json", "md", "csv", "tex")


def dataset_slug(name: str) -> str:
    """A folder-name-safe form of a dataset name or path (``results/<experiment>_<slug>``)."""
    base = Path(name).name if ("/" in name or name.startswith(".")) else name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "dataset"


def path_slug(path: Path) -> str:
    """A path dataset's folder-name part: its basename and a digest of the resolved path, so that two
    datasets both called ``train`` or ``hf_dataset`` never share an experiment folder."""
    digest = hashlib.sha256(str(path.expanduser().resolve()).encode()).hexdigest()[:6]
    return f"{dataset_slug(path.name or str(path))}-{digest}"


def dataset_location(record: Mapping[str, Any]) -> str | None:
    """Where a dataset record (experiment.json's ``dataset``) says its data lives: a path or a hub id."""
    details = record.get("details")
    if not isinstance(details, Mapping):
        return None
    where = details.get("path") or details.get("source")
    return str(where) if where else None


def _same_place(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def same_dataset(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether experiment.json's dataset record and this run's are one dataset: the same name, and the
    same kind and fingerprint or the same place (a dataset edited in place stays itself; its cells go
    stale as before). A dataset with no place (demo) is itself by name and kind."""
    if recorded.get("name") != current.get("name"):
        return False
    if recorded.get("kind") == current.get("kind") and recorded.get("fingerprint") == current.get("fingerprint"):
        return True
    here, there = dataset_location(recorded), dataset_location(current)
    if here is None and there is None:
        return recorded.get("kind") == current.get("kind")
    return here is not None and there is not None and _same_place(here, there)


def _of_dataset(folders: list[Path], dataset: str) -> list[Path]:
    """The experiment folders of ``dataset``: a name as experiment.json records it, or a path (its basename
    is the recorded name; among several, the folder named after the path or recording its place)."""
    path = Path(dataset).expanduser()
    own = f"_{path_slug(path)}"

    def named(folder: Path) -> bool:
        doc = read_json_object(folder / EXPERIMENT_FILE) or {}
        record = doc.get("dataset")
        return isinstance(record, dict) and record.get("name") in (dataset, dataset_slug(dataset))

    found = [f for f in folders if f.name.endswith(own) or named(f)]
    if len(found) > 1 and path.exists():
        def placed(folder: Path) -> bool:
            doc = read_json_object(folder / EXPERIMENT_FILE) or {}
            where = dataset_location(doc.get("dataset") or {})
            return folder.name.endswith(own) or (where is not None and _same_place(where, dataset))
        found = [f for f in found if placed(f)]
    return found


def describe_record(record: Mapping[str, Any]) -> str:
    """A dataset record in a few words: ``'hf_dataset' (hf, /data/a/hf_dataset)``."""
    where = dataset_location(record)
    return f"'{record.get('name')}' ({record.get('kind')}{', ' + where if where else ''})"


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


# ok: valid and current; incomplete: a valid cell checkpoint with another number of runs
State = Literal["ok", "missing", "corrupt", "stale", "incomplete"]


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
        self.claims_dir = self.checkpoints / ".claims"
        self.failures_dir = root / "failures"
        self.progress_dir = root / "progress"
        self.experiment_file = root / EXPERIMENT_FILE
        self.log_file = root / "run.log"
        self.results_file = self.results_path("json")
        self.plots_dir = root / "plots"
        self.slurm_logs_dir = root / "slurm" / "logs"
        self.submissions_file = root / "slurm" / "submissions.json"
        self.lock_file = root / ".lock"
        self.lock_info_file = root / ".lock.json"

    # -- finding the folder --------------------------------------------------------------
    @classmethod
    def folder_for(cls, output_dir: Path, experiment: str, dataset: str) -> ExperimentStore:
        """The store of experiment ``experiment`` on ``dataset`` under ``output_dir``."""
        return cls(output_dir / f"{experiment}_{dataset_slug(dataset)}")

    @classmethod
    def for_dataset(cls, output_dir: Path, experiment: str, dataset: str, path: Path | None,
                    place: Mapping[str, Any], current: Callable[[], Mapping[str, Any]]) -> ExperimentStore:
        """The folder ``ablate run`` uses for ``experiment`` on ``dataset``.

        A named dataset (``path`` None): ``<experiment>_<name>``. A path: ``<experiment>_<basename>-<digest>``,
        unless a folder of the old name (``<experiment>_<basename>``) records this same dataset: it stays in
        use, so no running experiment moves. ``place`` is the cheap part of this run's dataset record (its
        ``name``, and where the data lives as ``details.path``); ``current()`` the whole record as
        experiment.json writes it, asked only when the place does not settle it. A folder that records
        another dataset is refused (ExperimentError, exit 2), never superseded.
        """
        old = cls.folder_for(output_dir, experiment, dataset)
        current = functools.cache(current)  # the dataset is described once at most

        def holds(store: ExperimentStore) -> bool | None:
            recorded = store.recorded_dataset()
            if recorded is None:
                return None
            return same_dataset(recorded, place) or same_dataset(recorded, current())

        store = old
        if path is not None:
            store = cls(output_dir / f"{experiment}_{path_slug(path)}")
            if not store.exists() and holds(old):
                store = old
        if holds(store) is False:
            store.check_runnable()  # an imported or foreign folder: its own, more telling refusal first
            raise ExperimentError(
                f"experiment folder {store.root} holds dataset {describe_record(store.recorded_dataset() or {})}, "
                f"not {describe_record(current())}; refusing to supersede its cells",
                hint="use another --output-dir, or move that folder away")
        return store

    @classmethod
    def existing_for(cls, output_dir: Path, experiment: str, dataset: str) -> ExperimentStore | None:
        """The existing folder a run of ``experiment`` on ``dataset`` would likely resume, without reading
        the dataset (a path's folder first, then the old or named one); None when neither exists."""
        for store in (cls(output_dir / f"{experiment}_{path_slug(Path(dataset))}"),
                      cls.folder_for(output_dir, experiment, dataset)):
            if store.root.is_dir():
                return store
        return None

    def recorded_dataset(self) -> dict[str, Any] | None:
        """experiment.json's dataset record, or None when there is no readable one."""
        doc = read_json_object(self.experiment_file)
        record = doc.get("dataset") if doc is not None else None
        return record if isinstance(record, dict) else None

    @classmethod
    def find(cls, output_dir: Path, dataset: str | None = None, experiment: str | None = None) -> ExperimentStore:
        """The experiment folder under ``output_dir`` (or ``output_dir`` itself if it is one).

        ``experiment`` picks by folder name (as the ambiguity error lists them) or recorded experiment name;
        ``dataset`` by a named dataset's name or a path (its folder, or the place experiment.json records).
        """
        if (output_dir / EXPERIMENT_FILE).exists():
            return cls(output_dir)
        if not output_dir.is_dir():
            raise ExperimentError(f"output folder {output_dir} does not exist", hint="start with `ablate run`")
        docs = {child: doc for child in sorted(output_dir.iterdir())
                if (doc := read_json_object(child / EXPERIMENT_FILE)) is not None}
        found = list(docs)
        if experiment is not None:
            found = [c for c in found if c.name == experiment] or [c for c in found
                                                                   if docs[c].get("experiment") == experiment]
        if dataset is not None:
            found = _of_dataset(found, dataset)
        if len(found) == 1:
            return cls(found[0])
        what = "".join(f" {flag} {v}" for flag, v in (("--experiment", experiment), ("--dataset", dataset)) if v)
        if not found:
            listed = ", ".join(c.name for c in docs)
            where = f"; experiments there: {listed}" if listed and what else ""
            raise ExperimentError(f"no experiment{' for' + what if what else ''} in {output_dir}{where}",
                                  hint="start one with `ablate run`")
        names = ", ".join(p.name for p in found)
        raise ExperimentError(f"several experiments in {output_dir}{' for' + what if what else ''}: {names}",
                              hint=f"pick one with --experiment NAME, e.g. --experiment {found[0].name}")

    # -- paths ---------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.checkpoints / f"{cell_id}.json"

    def runs_dir(self, cell_id: str) -> Path:
        return self.runs_root / cell_id

    def run_path(self, cell_id: str, k: int) -> Path:
        return self.runs_dir(cell_id) / f"run_{k}.json"

    def run_state_path(self, cell_id: str, k: int) -> Path:
        """Run k's training state while it trains (weights, optimiser, random streams), for a resume."""
        return self.runs_dir(cell_id) / f".state_{k}.pt"

    def failure_path(self, cell_id: str) -> Path:
        return self.failures_dir / f"{cell_id}.json"

    def progress_path(self, cell_id: str) -> Path:
        return self.progress_dir / f"{cell_id}.json"

    def tracking_lock(self) -> Path:
        """Held by the process logging this experiment to a tracker: one logger at a time, on any host."""
        return self.root / "tracking" / ".mlflow.lock"

    def tracking_ledger(self, cell_id: str) -> Path:
        """What was logged of a cell to experiment trackers (tracking.py), per tracking URI."""
        return self.root / "tracking" / f"{cell_id}.mlflow.json"

    def results_path(self, fmt: str) -> Path:
        """A merge output: ``results.<fmt>`` for each of RESULTS_FORMATS."""
        if fmt not in RESULTS_FORMATS:
            raise ValueError(f"not a merge output format: {fmt}")
        return self.root / f"results.{fmt}"

    def merged(self) -> bool:
        """Whether the merge outputs are on disk and newer than every cell checkpoint. A merge writes
        results.json last, so a merge killed halfway (tables or plots) does not count."""
        try:
            written = self.results_file.stat().st_mtime_ns
            if not all(self.results_path(fmt).exists() for fmt in RESULTS_FORMATS):
                return False
            return all(p.stat().st_mtime_ns <= written for p in self.checkpoints.glob("*.json"))
        except FileNotFoundError:
            return False

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

    def check_runnable(self) -> None:
        """Refuse (before anything is written) a folder `ablate run` must not touch: one holding the
        original script's output, or cells imported from it (never reused under ablate's protocol)."""
        record = read_json_object(self.experiment_file)
        if record is not None and record.get("imported"):
            raise ExperimentError(
                f"{self.root} holds cells imported from the original script (protocol "
                f"{record['imported'].get('protocol', 'original')}); ablate does not reuse them under its own protocol",
                hint="start a fresh experiment beside it with another --output-dir, then compare the two with "
                     "`ablate compare`")
        if record is None and (foreign := self.foreign_files()):
            raise ExperimentError(
                f"{self.root} holds output of the original script ({len(foreign)} file(s) without ablate's "
                f"metadata, e.g. {foreign[0].relative_to(self.root)}); nothing was changed",
                hint=f"bring them in with `ablate import {self.root} --output-dir <another folder>`, or run with "
                     "another --output-dir")

    def foreign_files(self) -> list[Path]:
        """Cell checkpoints and a results.json that ablate did not write (the original script's)."""
        found = []
        for path in sorted(self.checkpoints.glob("*.json")):
            doc = read_json_object(path)
            if doc is None or not isinstance(doc.get("meta"), dict) or "schema_version" not in doc["meta"]:
                found.append(path)
        results = read_json_object(self.results_file)
        if results is not None and "provenance" not in results:
            found.append(self.results_file)
        return found

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
        fsync_dir(path.parent)
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

    def cell_state(self, cell_id: str, expected: Mapping[str, Any], num_runs: int,
                   move_bad: bool = False) -> Verdict:
        """Whether a cell is done: "ok" only for a valid, current checkpoint with exactly ``num_runs``
        runs ("incomplete" for a valid one with another count). With ``move_bad``, a corrupt checkpoint
        goes to .quarantine/ and a stale one to .superseded/ (only once the data is known to be good)."""
        path = self.cell_path(cell_id)
        verdict = self.load_verified(path, "cell", expected) if move_bad else verify(path, "cell", expected)
        if verdict.state == "ok" and verdict.doc is not None and verdict.doc.get("num_runs") != num_runs:
            verdict.state = "incomplete"
        return verdict

    def valid_runs(self, cell_id: str, expected: Mapping[str, Any], num_runs: int) -> dict[int, dict[str, Any]]:
        """Valid run checkpoints 1..num_runs (corrupt ones quarantined, stale ones superseded)."""
        found = {}
        for k in self.run_indices(cell_id):
            if k > num_runs:
                continue  # kept for a later, larger num_runs
            verdict = self.load_verified(self.run_path(cell_id, k), "run", expected)
            if verdict.state == "ok" and verdict.doc is not None:
                found[k] = verdict.doc
        return found

    # -- failures and heartbeats ---------------------------------------------------------
    def write_failure(self, cell_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.failure_path(cell_id), {"schema_version": SCHEMA_VERSION, **doc})

    def read_failure(self, cell_id: str) -> dict[str, Any] | None:
        return read_json_object(self.failure_path(cell_id))

    def clear_failure(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(cell_id).unlink()

    def heartbeat(self, cell_id: str, doc: dict[str, Any]) -> None:
        atomic_write_json(self.progress_path(cell_id), {
            "schema_version": SCHEMA_VERSION, "host": socket.gethostname(), "pid": os.getpid(),
            "updated_at": now_iso(), "updated_ts": time.time(), **doc,
        })

    def read_heartbeat(self, cell_id: str) -> dict[str, Any] | None:
        return read_json_object(self.progress_path(cell_id))

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
    def read_submissions(self) -> list[dict[str, Any]]:
        try:
            doc = read_json(self.submissions_file)
        except (OSError, json.JSONDecodeError):
            return []
        return doc if isinstance(doc, list) else []

    def has_submissions(self) -> bool:
        return self.submissions_file.exists()

    def add_submission(self, record: dict[str, Any]) -> None:
        self.write_submissions([*self.read_submissions(), record])

    def write_submissions(self, records: list[dict[str, Any]]) -> None:
        atomic_write_json(self.submissions_file, records)

    # -- reset ------------------------------------------------------------------------
    def reset_targets(self, rep: str | None, layer_config: str | None, all_cells: bool,
                      classifier: str | None = None) -> list[str]:
        """Cell ids chosen by ``--rep`` and/or ``--classifier`` (and ``--layer-config``) or ``--all``, checked
        against the experiment."""
        cells = self.read_experiment()["cells"]
        if all_cells == (rep is not None or classifier is not None):
            raise ConfigError("give --rep NAME and/or --classifier NAME, or --all")
        reps = list(dict.fromkeys(c["representation"] for c in cells))
        lcs = list(dict.fromkeys(c["layer_config"] for c in cells))
        clfs = list(dict.fromkeys(c.get("classifier") or "mlp" for c in cells))
        if rep is not None and rep not in reps:
            raise ConfigError(f"--rep: unknown representation '{rep}' (this experiment has: {', '.join(reps)})")
        if layer_config is not None and layer_config not in lcs:
            raise ConfigError(f"--layer-config: unknown layer config '{layer_config}' "
                              f"(this experiment has: {', '.join(lcs)})")
        if classifier is not None and classifier not in clfs:
            raise ConfigError(f"--classifier: unknown classifier '{classifier}' (this experiment has: "
                              f"{', '.join(clfs)})")
        return [c["id"] for c in cells
                if (all_cells or ((rep is None or c["representation"] == rep)
                                  and (classifier is None or (c.get("classifier") or "mlp") == classifier)))
                and (layer_config is None or c["layer_config"] == layer_config)]

    def cell_files(self, cell_id: str) -> list[Path]:
        """Every file that belongs to one cell (what reset deletes)."""
        paths = [self.cell_path(cell_id), self.failure_path(cell_id), self.progress_path(cell_id)]
        found = [p for p in paths if p.exists()]
        folder = self.runs_dir(cell_id)
        if folder.is_dir():
            found.extend(sorted(folder.iterdir()))
        return found

    def delete_cell(self, cell_id: str) -> int:
        files = self.cell_files(cell_id)
        for p in files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.runs_dir(cell_id).rmdir()
        return len(files)

    # -- locks ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, cell_id: str) -> Iterator[bool]:
        """Try to claim a cell for this process (non-blocking): True while held, False when another
        process (a worker, a Slurm task, another run) holds it. The OS lock dies with its process."""
        from filelock import FileLock, Timeout  # 30 ms to import: `ablate status` takes no lock

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
                    beat = self.read_heartbeat(cell_id) or {}
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
        from filelock import FileLock, Timeout  # 30 ms to import: `ablate status` takes no lock

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
            old = read_json_object(self.lock_info_file) or {}
            if old and old.get("pid") != os.getpid():
                alive = old.get("host") == socket.gethostname() and pid_alive(int(old.get("pid", -1)))
                state = "still running but no longer holding it" if alive else "no longer running"
                log.warning("taking over the lock left by pid %s on host %s (started %s), %s",
                            old.get("pid"), old.get("host"), old.get("started_at"), state)
            atomic_write_json(self.lock_info_file, {"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started_at": now_iso(), "purpose": purpose})
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.lock_info_file.unlink()
            lock.release()


def experiment_lock(root: Path, purpose: str = "run") -> contextlib.AbstractContextManager[None]:
    """The exclusive lock on the experiment folder ``root`` (see :meth:`ExperimentStore.lock`)."""
    return ExperimentStore(root).lock(purpose)
