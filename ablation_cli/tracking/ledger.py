"""What is on disk and what was logged of it: read by ``ablate status`` without importing mlflow.

A ledger per cell in the experiment folder (``tracking/<cell>.mlflow.json``) holds, per tracking URI,
the checksums of the run checkpoints logged and of the cell checkpoint once its completion is logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ablation_cli.durable import atomic_write_json, read_json_object
from ablation_cli.records import CellCheckpoint, CellSpec, RunCheckpoint
from ablation_cli.store import ExperimentStore


@dataclass(frozen=True)
class ImportedRun:
    """A run of an imported cell: its ``per_run_results`` entry (it has no run checkpoint of its own)."""

    metrics: Mapping[str, Any]

    @property
    def doc(self) -> Mapping[str, Any]:
        """The run as MLflow logs it: only metrics."""
        return {"metrics": self.metrics}


@dataclass
class CellOnDisk:
    """A cell's valid, current checkpoints (those :func:`ablation_cli.store.verify` passes)."""

    spec: CellSpec  # experiment.json's entry: layer config, representation, fingerprint
    runs: dict[int, RunCheckpoint | ImportedRun]  # k -> run checkpoint (imported cells: from per_run_results)
    cell: CellCheckpoint | None  # the cell checkpoint when it is complete

    @property
    def cell_id(self) -> str:
        return self.spec.id

    @property
    def checksum(self) -> str | None:
        """The cell checkpoint's checksum (None while the cell is not complete)."""
        return None if self.cell is None else _text(self.cell.meta.checksum)

    def run_checksum(self, k: int) -> str:
        run = self.runs[k]
        own = run.meta.checksum if isinstance(run, RunCheckpoint) else None
        return str(own or f"imported:{self.checksum}:{k}")

    def meta_doc(self) -> Mapping[str, Any]:
        """The ``meta`` of the cell checkpoint, else of the first run (empty for an imported run)."""
        doc = self.cell.doc if self.cell is not None else next(iter(self.runs.values()), ImportedRun({})).doc
        return doc.get("meta") or {}

    def entry(self) -> LedgerEntry:
        """The ledger entry once everything on disk is logged."""
        return LedgerEntry({str(k): self.run_checksum(k) for k in self.runs},
                           self.checksum if self.cell is not None else None)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class LedgerEntry:
    """What one tracking URI holds of a cell, as the ledger file records it."""

    runs: dict[str, str] = field(default_factory=dict)  # str(k) -> checksum of the run checkpoint logged
    cell: str | None = None  # checksum of the cell checkpoint whose completion was logged

    @classmethod
    def from_json(cls, doc: object) -> LedgerEntry | None:
        if not isinstance(doc, dict):
            return None
        return cls(dict(doc.get("runs") or {}), doc.get("cell"))

    def to_json(self) -> dict[str, object]:
        return {"runs": dict(self.runs), "cell": self.cell}


def read_entry(store: ExperimentStore, cell_id: str, uri: str) -> LedgerEntry | None:
    return LedgerEntry.from_json((read_json_object(store.tracking_ledger(cell_id)) or {}).get(uri))


def write_entry(store: ExperimentStore, cell_id: str, uri: str, entry: LedgerEntry) -> None:
    path = store.tracking_ledger(cell_id)
    ledger = read_json_object(path) or {}
    ledger[uri] = entry.to_json()
    atomic_write_json(path, ledger)


def forget(store: ExperimentStore, cell_id: str, uri: str) -> None:
    """Drop what ``uri`` was sent of a cell (its runs were marked superseded)."""
    path = store.tracking_ledger(cell_id)
    ledger = read_json_object(path) or {}
    if ledger.pop(uri, None) is not None:
        atomic_write_json(path, ledger)


def cells_on_disk(store: ExperimentStore, only: Iterable[str] | None = None) -> list[CellOnDisk]:
    """The experiment's cells with something on disk (all, or those in ``only``)."""
    wanted = None if only is None else set(only)
    found = []
    for spec in store.experiment().cells:
        if wanted is None or spec.id in wanted:
            cell = _cell_on_disk(store, spec)
            if cell.runs or cell.cell is not None:
                found.append(cell)
    return found


def _cell_on_disk(store: ExperimentStore, spec: CellSpec) -> CellOnDisk:
    checkpoints, cell = store.current_checkpoints(spec)
    runs: dict[int, RunCheckpoint | ImportedRun] = dict(checkpoints)
    if cell is not None and not runs and cell.meta.imported:
        runs = {k: ImportedRun(r) for k, r in enumerate(cell.per_run_results, start=1)}
    return CellOnDisk(spec, runs, cell)


def untracked(store: ExperimentStore, uri: str, cell: CellOnDisk) -> tuple[list[int], bool]:
    """A cell's runs, and whether its completion, not known to be logged at ``uri``."""
    entry = read_entry(store, cell.cell_id, uri) or LedgerEntry()
    logged = set(entry.runs.values())
    runs = [k for k in cell.runs if cell.run_checksum(k) not in logged]
    return runs, cell.cell is not None and entry.cell != cell.checksum


def untracked_runs(store: ExperimentStore, uri: str) -> int:
    """Training runs on disk not known to be logged at ``uri`` (read from the ledger: no mlflow import)."""
    return sum(len(untracked(store, uri, cell)[0]) for cell in cells_on_disk(store))
