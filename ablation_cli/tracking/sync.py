"""Logging an experiment folder to MLflow: make MLflow hold exactly what is on disk, once.

Idempotent: a child run carries its run checkpoint's checksum (``ablate.checksum``), a parent its
cell fingerprint. Syncing a cell asks MLflow what it holds and logs only what is missing; a run
checkpoint replaced on disk (``ablate reset``, a quarantined file) marks the cell's old MLflow runs
``superseded`` (never deleted) and logs the cell afresh. A child or merge run that a process killed
mid-logging left unfinished (never terminated) counts as not logged: it is marked ``superseded`` and
``ablate.incomplete``, ended as KILLED, and logged afresh. mlflow is imported only when a
:class:`Tracker` is made.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ablation_cli import __version__, runtime
from ablation_cli.durable import crash_point, sha256_file
from ablation_cli.errors import ConfigError, EnvironmentFailure
from ablation_cli.store import ExperimentStore
from ablation_cli.tracking import ledger
from ablation_cli.tracking.ledger import CellOnDisk, LedgerEntry, cells_on_disk
from ablation_cli.tracking.template import create_sqlite_atomically
from ablation_cli.tracking.uri import configured_uri, sqlite_path

# an unreachable server must cost seconds, not mlflow's default minutes of retries; and a cluster node
# sends nothing anywhere but to the tracking URI it was given (MLflow 3 otherwise sends usage telemetry)
_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
FLUSH_TIMEOUT_S = 120.0  # at exit, how long a process waits for its queued logging
CURVES = ("train_loss", "val_loss", "val_acc", "lr")
_BATCH = 900  # MLflow accepts at most 1,000 metrics per log_batch


def require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("experiment tracking needs mlflow, which is not installed",
                          hint="pip install 'ablate[mlflow]'") from None
    return mlflow


@dataclass
class SyncReport:
    runs: int = 0  # child runs created
    cells: int = 0  # parent runs created or completed
    superseded: int = 0
    merges: int = 0


@dataclass
class _CellState:
    parent_id: str | None = None
    fingerprint: str | None = None
    cell_checksum: str | None = None
    logged: dict[int, str] = field(default_factory=dict)  # k -> checksum of the child run's checkpoint
    run_ids: list[str] = field(default_factory=list)  # every current MLflow run of the cell


class Tracker:
    """The MLflow view of one experiment folder."""

    def __init__(self, uri: str, store: ExperimentStore) -> None:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        require_mlflow()
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.store = store
        create_sqlite_atomically(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None
        self._states: dict[str, _CellState] = {}
        self._seen: dict[str, LedgerEntry | None] = {}  # cell -> its ledger entry as this process last wrote
        from filelock import FileLock

        store.tracking_lock().parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(store.tracking_lock()), timeout=FLUSH_TIMEOUT_S)

    # experiment
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._experiment()
        return self._experiment_id

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        root = str(self.store.root.resolve())
        name = self.store.root.name
        for attempt in range(2):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.tags.get("ablate.folder", root) == root:
                    return str(found.experiment_id)
                name = f"{self.store.root.name} ({root})"  # another folder of the same name
                continue
            try:
                return str(self.client.create_experiment(name, artifact_location=self._artifacts(),
                                                         tags={"ablate.folder": root}))
            except MlflowException:
                if attempt:  # created by another process meanwhile: read it
                    raise
        found = self.client.get_experiment_by_name(name)
        assert found is not None
        return str(found.experiment_id)

    def _artifacts(self) -> str | None:
        """Beside a SQLite store, ``mlartifacts/`` (what `mlflow server` uses); elsewhere MLflow's default."""
        path = sqlite_path(self.uri)
        return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None

    def _search(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    # cells and runs
    def _cell_state(self, cell_id: str) -> _CellState:
        """What MLflow holds of a cell now (not superseded): asked once, then kept up to date here
        (one process runs a cell at a time, and reset waits for the run's lock)."""
        if cell_id not in self._states:
            current = [r for r in self._search(f"tags.`ablate.cell` = '{cell_id}'")
                       if r.data.tags.get("superseded") != "true"]
            state = _CellState()
            for r in current:
                tags = r.data.tags
                if tags.get("ablate.kind") == "run" and r.info.status != "FINISHED":
                    self._abandon(r)  # half logged by a process killed meanwhile: logged afresh below
                elif tags.get("ablate.kind") == "cell" and state.parent_id is None:
                    state.parent_id, state.fingerprint = r.info.run_id, tags.get("ablate.fingerprint")
                    state.cell_checksum = tags.get("ablate.cell_checksum") if r.info.status == "FINISHED" else None
                elif tags.get("ablate.kind") == "run":
                    state.logged[int(tags["ablate.run"])] = tags.get("ablate.checksum", "")
            state.run_ids = [r.info.run_id for r in current if r.data.tags.get("superseded") != "true"]
            self._states[cell_id] = state
        return self._states[cell_id]

    def _abandon(self, run: Any) -> None:
        """A run a killed process left half logged (created, never terminated): kept, marked superseded
        and incomplete, ended as KILLED, so nothing counts it as logged and the UI shows it as ended."""
        self.client.set_tag(run.info.run_id, "superseded", "true")
        self.client.set_tag(run.info.run_id, "ablate.incomplete", "true")
        self.client.set_terminated(run.info.run_id, "KILLED")
        run.data.tags["superseded"] = "true"

    def sync_cell(self, cell: CellOnDisk, report: SyncReport) -> None:
        """Make MLflow hold exactly this cell as it is on disk (see the module docstring). Under the
        experiment's tracking lock: a run's catch-up, `track sync` and a Slurm task's logger never both
        see run k missing and both log it."""
        with self._lock:
            if cell.cell_id in self._states and self._logged_elsewhere(cell.cell_id):
                del self._states[cell.cell_id]  # another process logged this cell since: ask MLflow again
            self._sync_cell(cell, report)

    def _logged_elsewhere(self, cell_id: str) -> bool:
        """Whether the cell's ledger changed since this process last wrote it."""
        return self._seen.get(cell_id) != ledger.read_entry(self.store, cell_id, self.uri)

    def _sync_cell(self, cell: CellOnDisk, report: SyncReport) -> None:
        state = self._cell_state(cell.cell_id)
        replaced = [k for k, checksum in state.logged.items()
                    if k not in cell.runs or checksum != cell.run_checksum(k)]
        if replaced or (state.parent_id is not None and state.fingerprint != cell.spec.expected.fingerprint):
            for run_id in state.run_ids:
                self.client.set_tag(run_id, "superseded", "true")
            report.superseded += len(state.run_ids)
            state = self._states[cell.cell_id] = _CellState()
        if state.parent_id is None:
            from mlflow.entities import Param

            parent = self.client.create_run(self.experiment_id, run_name=cell.cell_id, tags=self._cell_tags(cell))
            state.parent_id, state.fingerprint = parent.info.run_id, cell.spec.expected.fingerprint
            state.run_ids.append(state.parent_id)
            # what the cell is made under (every axis of a sweep among them): MLflow's parallel coordinates
            self._log(state.parent_id, metrics=[], params=[Param(k, str(v)) for k, v in
                                                           cell.spec.expected.config.items() if v is not None])
        for k in sorted(cell.runs):
            if k not in state.logged:
                state.run_ids.append(self._log_run(cell, k, state.parent_id))
                state.logged[k] = cell.run_checksum(k)
                report.runs += 1
        checksum = cell.checksum
        if cell.cell is not None and state.cell_checksum != checksum:
            from mlflow.entities import Metric, RunTag

            self._log(state.parent_id, metrics=[Metric(k, float(v), _now_ms(), 0) for k, v in _aggregates(cell)])
            self.client.set_terminated(state.parent_id, "FINISHED")
            crash_point("tracking:cell-logged")
            # last, as the mark that the parent is complete: a kill before it logs the cell again next time
            self._log(state.parent_id, metrics=[], tags=[RunTag("ablate.cell_checksum", str(checksum))])
            state.cell_checksum = checksum
            report.cells += 1
        ledger.write_entry(self.store, cell.cell_id, self.uri, entry := cell.entry())
        self._seen[cell.cell_id] = entry

    def _cell_tags(self, cell: CellOnDisk) -> dict[str, str]:
        meta = cell.meta_doc()
        dataset = meta.get("dataset") or {}
        tags = {"ablate.kind": "cell", "ablate.cell": cell.cell_id, "layer_config": cell.spec.layer_config,
                "representation": cell.spec.representation, "ablate.fingerprint": _fingerprint(cell),
                "dataset": str(dataset.get("dataset", "")),
                "dataset_fingerprint": str(dataset.get("dataset_fingerprint", "")),
                "ablate.version": __version__, "host": str(meta.get("host") or socket.gethostname()),
                "device": str(meta.get("device", "")), "mlflow.runName": cell.cell_id}
        if cell.spec.classifier:
            tags["classifier"] = cell.spec.classifier
        if meta.get("provenance") == "imported":
            tags["ablate.provenance"] = "imported"
        if commit := runtime.git_commit():
            tags["ablate.git_commit"] = commit
        return tags

    def _log_run(self, cell: CellOnDisk, k: int, parent_id: str) -> str:
        from mlflow.entities import Metric, Param

        on_disk = cell.runs[k]
        doc = on_disk.doc
        meta = doc.get("meta") or {}
        tags = {"ablate.kind": "run", "ablate.cell": cell.cell_id, "ablate.run": str(k),
                "ablate.checksum": cell.run_checksum(k), "ablate.fingerprint": _fingerprint(cell),
                "mlflow.parentRunId": parent_id, "layer_config": cell.spec.layer_config,
                "representation": cell.spec.representation, "host": str(meta.get("host", "")),
                "device": str(doc.get("device", ""))}
        if cell.spec.classifier:
            tags["classifier"] = cell.spec.classifier
        run = self.client.create_run(self.experiment_id, run_name=f"{cell.cell_id}/run_{k}", tags=tags)
        run_id = run.info.run_id
        params = {**(meta.get("config") or {}), "run": k, "seed": doc.get("seed"),
                  "feature_dim": doc.get("feature_dim")}
        now = _now_ms()
        metrics = [Metric(name, float(v), now, 0) for name, v in on_disk.metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)]
        for name in ("best_epoch", "epochs_run", "train_time_s"):
            if isinstance(doc.get(name), int | float):
                metrics.append(Metric(name, float(doc[name]), now, 0))
        for name in CURVES:
            for epoch, v in enumerate((doc.get("learning_curve") or {}).get(name) or [], start=1):
                metrics.append(Metric(f"curve/{name}", float(v), now, epoch))
        self._log(run_id, metrics=metrics,
                  params=[Param(key, str(v)) for key, v in params.items() if v is not None])
        crash_point("tracking:run-logged")
        for name in ("confusion_matrices", "per_class"):
            if doc.get(name):
                self.client.log_text(run_id, json.dumps(doc[name], indent=1), f"{name}.json")
        self.client.set_terminated(run_id, "FINISHED")
        return str(run_id)

    def _log(self, run_id: str, metrics: list[Any], params: list[Any] | None = None,
             tags: list[Any] | None = None) -> None:
        self.client.log_batch(run_id, metrics=metrics[:_BATCH], params=params or [], tags=tags or [])
        for lo in range(_BATCH, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[lo : lo + _BATCH])

    def supersede(self, cell_ids: Iterable[str]) -> int:
        """Mark the MLflow runs of reset cells superseded (kept, never deleted)."""
        with self._lock:
            return self._supersede(cell_ids)

    def _supersede(self, cell_ids: Iterable[str]) -> int:
        marked = 0
        for cid in cell_ids:
            for r in self._search(f"tags.`ablate.cell` = '{cid}'"):
                if r.data.tags.get("superseded") != "true":
                    self.client.set_tag(r.info.run_id, "superseded", "true")
                    marked += 1
            self._states.pop(cid, None)
            ledger.forget(self.store, cid, self.uri)
        return marked

    # merge
    def sync_merge(self, report: SyncReport) -> None:
        with self._lock:
            self._sync_merge(report)

    def _sync_merge(self, report: SyncReport) -> None:
        results = self.store.results_file
        if not self.store.merged():
            return
        checksum = sha256_file(results)
        current = [r for r in self._search("tags.`ablate.kind` = 'merge'") if r.data.tags.get("superseded") != "true"]
        for r in current:
            if r.info.status != "FINISHED":
                self._abandon(r)  # its artifacts half logged
        current = [r for r in current if r.data.tags.get("superseded") != "true"]
        if any(r.data.tags.get("ablate.checksum") == checksum for r in current):
            return
        for r in current:
            self.client.set_tag(r.info.run_id, "superseded", "true")
        report.superseded += len(current)
        run = self.client.create_run(self.experiment_id, run_name="results",
                                     tags={"ablate.kind": "merge", "ablate.checksum": checksum,
                                           "ablate.version": __version__})
        for fmt in ("json", "md", "csv", "tex"):
            self.client.log_artifact(run.info.run_id, str(self.store.results_path(fmt)))
        crash_point("tracking:merge-logged")
        if self.store.plots_dir.is_dir():
            self.client.log_artifacts(run.info.run_id, str(self.store.plots_dir), "plots")
        self.client.set_terminated(run.info.run_id, "FINISHED")
        report.merges += 1

    def sync(self, cell_ids: Iterable[str] | None = None, merge: bool = True) -> SyncReport:
        """Log whatever MLflow lacks of this experiment (all cells, or ``cell_ids``)."""
        report = SyncReport()
        for cell in cells_on_disk(self.store, cell_ids):
            self.sync_cell(cell, report)
        if merge:
            self.sync_merge(report)
        return report


def _aggregates(cell: CellOnDisk) -> list[tuple[str, float]]:
    """The complete cell's aggregate metrics (means, standard deviations, 95 % intervals)."""
    return [(k, float(v)) for k, v in (cell.cell.doc if cell.cell is not None else {}).items()
            if k.endswith(("_mean", "_std", "_ci95")) and isinstance(v, int | float) and not isinstance(v, bool)]


def _fingerprint(cell: CellOnDisk) -> str:
    """The digest the cell's checkpoints carry, as MLflow tags it."""
    return str(cell.spec.expected.fingerprint)


def first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


def sync_failure(uri: str, exc: Exception) -> EnvironmentFailure:
    """`ablate track sync` could not reach or write the tracker: exit 4, one line."""
    return EnvironmentFailure(f"MLflow at {uri} failed: {first_line(exc)}",
                              hint="check the URI and that the server or file is reachable, then rerun")


def supersede_reset(store: ExperimentStore, cell_ids: list[str]) -> str | None:
    """After ``ablate reset``: mark the cells' MLflow runs superseded; what to tell the user (None
    without tracking). A tracker that fails only warns: the next sync marks them."""
    if not (uri := configured_uri(store)):
        return None
    try:
        return f"Marked {Tracker(uri, store).supersede(cell_ids)} MLflow run(s) superseded (kept, not deleted)."
    except Exception as exc:
        return (f"warning: MLflow at {uri} failed ({first_line(exc)}); the next `ablate run` or "
                "`ablate track sync` marks the old runs superseded")
