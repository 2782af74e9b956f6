"""The experiment folder: every path in it and its verified checkpoints, read as typed records.

Layout under one experiment folder (``<output-dir>/<experiment>_<dataset>``: a named dataset's
name, or a path's basename and a digest of the resolved path, ``visual_ablation_hf_dataset-3fa2c1``)::

    experiment.json                         resolved config, dataset summary, each cell's fingerprint
    checkpoints/<cell>.json                 finished cell
    checkpoints/runs/<cell>/run_<k>.json    finished run k (1-based)
    checkpoints/runs/<cell>/.state_<k>.pt   run k's training state while it trains (for a resume)
    checkpoints/.quarantine/                unreadable or corrupt files, moved aside
    checkpoints/.superseded/                valid files made under another config
    results.json .md .csv .tex  plots/      merge outputs
    tracking/<cell>.mlflow.json             what MLflow was sent, per tracking URI
    run.log                                 plain-text log

claims.py spells the rest (the lock, cell claims, heartbeats, failures, Slurm submissions); no other
module spells these names. Nothing here imports numpy or torch: status, reset and merge read the store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ablation_cli.claims import FolderActivity
from ablation_cli.durable import (
    SCHEMA_VERSION,
    atomic_write_json,
    checksum,
    fsync_dir,
    read_json,
    read_json_object,
    seal,
)
from ablation_cli.errors import ExperimentError
from ablation_cli.lookup import EXPERIMENT_FILE, dataset_slug, find_folder, path_slug
from ablation_cli.records import (
    FINGERPRINT_KEYS,
    CellCheckpoint,
    CellSpec,
    Experiment,
    Fingerprint,
    Meta,
    RunCheckpoint,
    describe_record,
    same_dataset,
)

log = logging.getLogger(__name__)

_REQUIRED = {
    "run": ("run", "seed", "metrics", "meta"),
    "cell": ("representation", "layer_config", "num_runs", "per_run_results", "meta"),
}
_RUN_FILE = re.compile(r"^run_(\d+)\.json$")
RESULTS_FORMATS = ("json", "md", "csv", "tex")


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

    @property
    def meta(self) -> Meta | None:
        """The checkpoint's ``meta``, for a valid (ok, incomplete or stale) one."""
        return Meta.from_json(self.doc["meta"]) if self.doc is not None else None

    def cell(self) -> CellCheckpoint | None:
        """The cell checkpoint, when it is valid and current."""
        return CellCheckpoint.from_json(self.doc) if self.state == "ok" and self.doc is not None else None

    def run(self) -> RunCheckpoint | None:
        """The run checkpoint, when it is valid and current."""
        return RunCheckpoint.from_json(self.doc) if self.state == "ok" and self.doc is not None else None


def expected_fingerprint(cell_spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fingerprint record a cell's checkpoints must carry, from its entry in experiment.json."""
    return {k: cell_spec[k] for k in FINGERPRINT_KEYS}


def diff_parts(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable changed fields between two fingerprint part dicts: ``dropout: 0.3 -> 0.5``."""
    return Fingerprint.from_json(old).changes(Fingerprint.from_json(new))


def _fingerprint(expected: Fingerprint | Mapping[str, Any]) -> Fingerprint:
    return expected if isinstance(expected, Fingerprint) else Fingerprint.from_json(expected)


def verify(path: Path, kind: str, expected: Fingerprint | Mapping[str, Any] | None) -> Verdict:
    """Parse, check schema, checksum and fingerprint: the one definition of a valid checkpoint.
    Never raises for bad content. ``expected``: the cell's fingerprint (None skips that check)."""
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
    if expected is not None and meta.get("fingerprint") != (want := _fingerprint(expected)).fingerprint:
        changes = Fingerprint.from_json(meta).changes(want) or ["fingerprint differs"]
        return Verdict("stale", path, doc=doc, reason="made under another configuration", changes=changes)
    return Verdict("ok", path, doc=doc)


class ExperimentStore(FolderActivity):
    """One experiment folder. All paths are built from validated cell ids, never raw user text."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.checkpoints = root / "checkpoints"
        self.runs_root = self.checkpoints / "runs"
        self.quarantine_dir = self.checkpoints / ".quarantine"
        self.superseded_dir = self.checkpoints / ".superseded"
        self.experiment_file = root / EXPERIMENT_FILE
        self.log_file = root / "run.log"
        self.results_file = self.results_path("json")
        self.plots_dir = root / "plots"

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

    def recorded_dataset(self) -> Mapping[str, Any] | None:
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
        return cls(find_folder(output_dir, dataset, experiment))

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
        """experiment.json as written, for a writer that updates it; readers ask :meth:`experiment`."""
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

    def experiment(self) -> Experiment:
        """experiment.json as a typed record (ExperimentError when it is missing or not one)."""
        doc = self.read_experiment()
        try:
            return Experiment.from_json(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise ExperimentError(f"{self.experiment_file} is not an ablate experiment record ({exc})") from None

    def write_experiment(self, doc: Mapping[str, object]) -> None:
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

    def load_verified(self, path: Path, kind: str, expected: Fingerprint | Mapping[str, Any]) -> Verdict:
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

    def cell_state(self, cell_id: str, expected: Fingerprint | Mapping[str, Any], num_runs: int,
                   move_bad: bool = False) -> Verdict:
        """Whether a cell is done: "ok" only for a valid, current checkpoint with exactly ``num_runs``
        runs ("incomplete" for a valid one with another count). With ``move_bad``, a corrupt checkpoint
        goes to .quarantine/ and a stale one to .superseded/ (only once the data is known to be good)."""
        path = self.cell_path(cell_id)
        verdict = self.load_verified(path, "cell", expected) if move_bad else verify(path, "cell", expected)
        if verdict.state == "ok" and verdict.doc is not None and verdict.doc.get("num_runs") != num_runs:
            verdict.state = "incomplete"
        return verdict

    def valid_runs(self, cell_id: str, expected: Fingerprint | Mapping[str, Any],
                   num_runs: int) -> dict[int, dict[str, Any]]:
        """Valid run checkpoints 1..num_runs (corrupt ones quarantined, stale ones superseded)."""
        found = {}
        for k in self.run_indices(cell_id):
            if k > num_runs:
                continue  # kept for a later, larger num_runs
            verdict = self.load_verified(self.run_path(cell_id, k), "run", expected)
            if verdict.state == "ok" and verdict.doc is not None:
                found[k] = verdict.doc
        return found

    def current_checkpoints(self, spec: CellSpec) -> tuple[dict[int, RunCheckpoint], CellCheckpoint | None]:
        """A cell's valid, current run checkpoints (any number) and cell checkpoint; read only."""
        runs = {k: run for k in self.run_indices(spec.id)
                if (run := verify(self.run_path(spec.id, k), "run", spec.expected).run()) is not None}
        return runs, verify(self.cell_path(spec.id), "cell", spec.expected).cell()

    def run_verdicts(self, cell_id: str, expected: Fingerprint | None, num_runs: int) -> dict[int, Verdict]:
        """Each run checkpoint 1..num_runs on disk, verified (read only: nothing moves)."""
        return {k: verify(self.run_path(cell_id, k), "run", expected)
                for k in self.run_indices(cell_id) if k <= num_runs}

    # -- reset ------------------------------------------------------------------------
    def reset_targets(self, rep: str | None, layer_config: str | None, all_cells: bool,
                      classifier: str | None = None, where: Mapping[str, str] | None = None) -> list[str]:
        """Cell ids chosen by ``--rep``, ``--classifier`` and/or ``--where`` (and ``--layer-config``) or
        ``--all``, checked against the experiment."""
        return self.experiment().select(rep, layer_config, classifier, all_cells, where)

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


def experiment_lock(root: Path, purpose: str = "run") -> contextlib.AbstractContextManager[None]:
    """The exclusive lock on the experiment folder ``root`` (see :meth:`ExperimentStore.lock`)."""
    return ExperimentStore(root).lock(purpose)
