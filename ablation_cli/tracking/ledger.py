"""What is on disk and what was logged of it: read by ``ablate status`` without importing mlflow.

A ledger per cell in the experiment folder (``tracking/<cell>.mlflow.json``) holds, per tracking URI,
the checksums of the run checkpoints logged and of the cell checkpoint once its completion is logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ablation_cli.durable import atomic_write_json, read_json_object
from ablation_cli.store import ExperimentStore, expected_fingerprint, verify


@dataclass
class CellOnDisk:
    """A cell's valid, current checkpoints (those :func:`ablation_cli.store.verify` passes)."""

    cell_id: str
    record: dict[str, Any]  # experiment.json's entry: layer config, representation, fingerprint
    runs: dict[int, dict[str, Any]]  # k -> run checkpoint (imported cells: from per_run_results)
    cell: dict[str, Any] | None  # the cell checkpoint when it is complete

    @property
    def checksum(self) -> str | None:
        """The cell checkpoint's checksum (None while the cell is not complete)."""
        return (self.cell or {}).get("meta", {}).get("checksum")

    def run_checksum(self, k: int) -> str:
        meta = self.runs[k].get("meta") or {}
        return str(meta.get("checksum") or f"imported:{self.checksum}:{k}")

    def entry(self) -> LedgerEntry:
        """The ledger entry once everything on disk is logged."""
        return LedgerEntry({str(k): self.run_checksum(k) for k in self.runs},
                           self.checksum if self.cell is not None else None)


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
    for record in store.read_experiment()["cells"]:
        if wanted is None or record["id"] in wanted:
            cell = _cell_on_disk(store, record)
            if cell.runs or cell.cell is not None:
                found.append(cell)
    return found


def _cell_on_disk(store: ExperimentStore, record: dict[str, Any]) -> CellOnDisk:
    cid, expected = record["id"], expected_fingerprint(record)
    runs: dict[int, dict[str, Any]] = {}
    for k in store.run_indices(cid):
        verdict = verify(store.run_path(cid, k), "run", expected)
        if verdict.state == "ok" and verdict.doc is not None:
            runs[k] = verdict.doc
    verdict = verify(store.cell_path(cid), "cell", expected)
    cell = verdict.doc if verdict.state == "ok" else None
    if cell is not None and not runs and (cell.get("meta") or {}).get("provenance") == "imported":
        runs = {k: {"metrics": r} for k, r in enumerate(cell.get("per_run_results") or [], start=1)}
    return CellOnDisk(cid, record, runs, cell)


def untracked(store: ExperimentStore, uri: str, cell: CellOnDisk) -> tuple[list[int], bool]:
    """A cell's runs, and whether its completion, not known to be logged at ``uri``."""
    entry = read_entry(store, cell.cell_id, uri) or LedgerEntry()
    logged = set(entry.runs.values())
    runs = [k for k in cell.runs if cell.run_checksum(k) not in logged]
    return runs, cell.cell is not None and entry.cell != cell.checksum


def untracked_runs(store: ExperimentStore, uri: str) -> int:
    """Training runs on disk not known to be logged at ``uri`` (read from the ledger: no mlflow import)."""
    return sum(len(untracked(store, uri, cell)[0]) for cell in cells_on_disk(store))
