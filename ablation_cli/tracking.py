"""Experiment tracking in MLflow: a view of the checkpoints, never their source of truth.

Mapping: one MLflow experiment per experiment folder (named after it); one parent run per cell
(tags: layer config, representation, fingerprints, ablate version, git commit, host, device; the
cell's aggregate metrics once it is complete); one child run per training run (hyperparameters as
params, its metrics, the learning curves as step metrics with epoch = step, the confusion matrices
and per-class scores as JSON artifacts); one ``results`` run per merge with results.* and plots/.

Idempotent: a child run carries its run checkpoint's checksum (``ablate.checksum``), a parent its
cell fingerprint. Syncing a cell asks MLflow what it holds and logs only what is missing; a run
checkpoint replaced on disk (``ablate reset``, a quarantined file) marks the cell's old MLflow runs
``superseded`` (never deleted) and logs the cell afresh. A child or merge run that a process killed
mid-logging left unfinished (never terminated) counts as not logged: it is marked ``superseded`` and
``ablate.incomplete``, ended as KILLED, and logged afresh. A resumed, killed, re-merged or re-synced
experiment never holds a run twice.

Never costs a run: every call from the grid goes through :func:`notify_cell` / :func:`notify_merge`,
which log one warning on the first failure and stop tracking for the rest of the process;
``ablate track sync`` logs the rest later. A ledger per cell in the experiment folder
(``tracking/<cell>.mlflow.json``: the checksums logged) lets ``ablate status`` count what is not yet
tracked without importing mlflow.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation_cli import __version__, runtime
from ablation_cli.durable import atomic_write_json, crash_point, read_json_object, read_sealed, sha256_file, temp_name
from ablation_cli.errors import ConfigError, EnvironmentFailure
from ablation_cli.store import ExperimentStore

log = logging.getLogger(__name__)

# an unreachable server must cost seconds, not mlflow's default minutes of retries; and a cluster node
# sends nothing anywhere but to the tracking URI it was given (MLflow 3 otherwise sends usage telemetry)
_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
FLUSH_TIMEOUT_S = 120.0  # at exit, how long a process waits for its queued logging
_SQLITE = re.compile(r"^sqlite:///(.+)$")  # sqlite:///relative.db, sqlite:////absolute.db
CURVES = ("train_loss", "val_loss", "val_acc", "lr")
_BATCH = 900  # MLflow accepts at most 1,000 metrics per log_batch


def require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("experiment tracking needs mlflow, which is not installed",
                          hint="pip install 'ablate[mlflow]'") from None
    return mlflow


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """A tracking URI every process reads the same, wherever it runs: a relative SQLite file or local
    folder is made absolute against ``base`` (the current folder, as MLflow itself would)."""
    base = base or Path.cwd()
    if (path := _sqlite_path(uri)) is not None:
        return f"sqlite:///{(base / path).resolve()}"  # an absolute path stays as it is
    if "://" not in uri and not uri.startswith("file:"):
        return str((base / uri).resolve())
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for any other URI)."""
    m = _SQLITE.match(uri)
    return Path(m.group(1)) if m else None


def configured_uri(store: ExperimentStore) -> str | None:
    """The tracking URI recorded in the experiment (``[tracking] mlflow`` or ``--mlflow`` of its run)."""
    doc = read_json_object(store.experiment_file) or {}
    return ((doc.get("config") or {}).get("tracking") or {}).get("mlflow")


# -- what is on disk -------------------------------------------------------------------------------

@dataclass
class CellOnDisk:
    cell_id: str
    record: dict[str, Any]  # experiment.json's entry: layer config, representation, fingerprint
    runs: dict[int, dict[str, Any]]  # k -> sealed run checkpoint (imported cells: from per_run_results)
    cell: dict[str, Any] | None  # the cell checkpoint when it is complete

    def run_checksum(self, k: int) -> str:
        meta = self.runs[k].get("meta") or {}
        return str(meta.get("checksum") or f"imported:{(self.cell or {}).get('meta', {}).get('checksum')}:{k}")


def cells_on_disk(store: ExperimentStore, only: Iterable[str] | None = None) -> list[CellOnDisk]:
    """The experiment's cells with something on disk (all, or those in ``only``)."""
    exp = store.read_experiment()
    wanted = None if only is None else set(only)
    found = []
    for record in exp["cells"]:
        cid = record["id"]
        if wanted is not None and cid not in wanted:
            continue
        runs: dict[int, dict[str, Any]] = {}
        for k in store.run_indices(cid):
            doc = read_sealed(store.run_path(cid, k))
            if doc is not None and (doc.get("meta") or {}).get("fingerprint") == record["fingerprint"]:
                runs[k] = doc
        cell = read_sealed(store.cell_path(cid))
        if cell is not None and (cell.get("meta") or {}).get("fingerprint") != record["fingerprint"]:
            cell = None
        if cell is not None and not runs and (cell.get("meta") or {}).get("provenance") == "imported":
            runs = {k: {"metrics": r} for k, r in enumerate(cell.get("per_run_results") or [], start=1)}
        if runs or cell is not None:
            found.append(CellOnDisk(cid, record, runs, cell))
    return found


def untracked_runs(store: ExperimentStore, uri: str) -> int:
    """Training runs on disk not known to be logged at ``uri`` (read from the ledger: no mlflow import)."""
    return sum(len(_untracked(store, uri, cell)[0]) for cell in cells_on_disk(store))


def _untracked(store: ExperimentStore, uri: str, cell: CellOnDisk) -> tuple[list[int], bool]:
    """A cell's runs, and whether its completion, not known to be logged at ``uri``."""
    ledger = (read_json_object(store.tracking_ledger(cell.cell_id)) or {}).get(uri) or {}
    logged = set(ledger.get("runs", {}).values())
    runs = [k for k in cell.runs if cell.run_checksum(k) not in logged]
    checksum = (cell.cell or {}).get("meta", {}).get("checksum")
    return runs, cell.cell is not None and ledger.get("cell") != checksum


def catch_up(uri: str | None, store: ExperimentStore, cell_ids: Iterable[str]) -> None:
    """Queue the logging of finished cells MLflow may lack (a run killed before its logging caught up)."""
    if not uri:
        return
    for cell in cells_on_disk(store, cell_ids):
        runs, completion = _untracked(store, uri, cell)
        if runs or completion:
            notify_cell(uri, store, cell.cell_id)


# -- MLflow ------------------------------------------------------------------------------------------

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
        _create_sqlite_atomically(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None
        self._states: dict[str, _CellState] = {}
        self._seen: dict[str, Any] = {}  # cell -> its ledger entry as this process last wrote or read it
        from filelock import FileLock

        store.tracking_lock().parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(store.tracking_lock()), timeout=FLUSH_TIMEOUT_S)

    def _ledger_entry(self, cell_id: str) -> Any:
        return (read_json_object(self.store.tracking_ledger(cell_id)) or {}).get(self.uri)

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
        path = _sqlite_path(self.uri)
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
            if cell.cell_id in self._states and self._seen.get(cell.cell_id) != self._ledger_entry(cell.cell_id):
                del self._states[cell.cell_id]  # another process logged this cell since: ask MLflow again
            self._sync_cell(cell, report)

    def _sync_cell(self, cell: CellOnDisk, report: SyncReport) -> None:
        state = self._cell_state(cell.cell_id)
        replaced = [k for k, checksum in state.logged.items()
                    if k not in cell.runs or checksum != cell.run_checksum(k)]
        if replaced or (state.parent_id is not None and state.fingerprint != cell.record["fingerprint"]):
            for run_id in state.run_ids:
                self.client.set_tag(run_id, "superseded", "true")
            report.superseded += len(state.run_ids)
            state = self._states[cell.cell_id] = _CellState()
        if state.parent_id is None:
            parent = self.client.create_run(self.experiment_id, run_name=cell.cell_id, tags=self._cell_tags(cell))
            state.parent_id, state.fingerprint = parent.info.run_id, cell.record["fingerprint"]
            state.run_ids.append(state.parent_id)
        for k in sorted(cell.runs):
            if k not in state.logged:
                state.run_ids.append(self._log_run(cell, k, state.parent_id))
                state.logged[k] = cell.run_checksum(k)
                report.runs += 1
        checksum = (cell.cell or {}).get("meta", {}).get("checksum")
        if cell.cell is not None and state.cell_checksum != checksum:
            from mlflow.entities import Metric, RunTag

            self._log(state.parent_id, metrics=[Metric(k, float(v), _now_ms(), 0) for k, v in _aggregates(cell.cell)])
            self.client.set_terminated(state.parent_id, "FINISHED")
            crash_point("tracking:cell-logged")
            # last, as the mark that the parent is complete: a kill before it logs the cell again next time
            self._log(state.parent_id, metrics=[], tags=[RunTag("ablate.cell_checksum", str(checksum))])
            state.cell_checksum = checksum
            report.cells += 1
        path = self.store.tracking_ledger(cell.cell_id)
        ledger = read_json_object(path) or {}
        ledger[self.uri] = {"runs": {str(k): cell.run_checksum(k) for k in cell.runs},
                            "cell": checksum if cell.cell is not None else None}
        atomic_write_json(path, ledger)
        self._seen[cell.cell_id] = ledger[self.uri]

    def _cell_tags(self, cell: CellOnDisk) -> dict[str, str]:
        meta = (cell.cell or next(iter(cell.runs.values()), {})).get("meta") or {}
        dataset = meta.get("dataset") or {}
        tags = {"ablate.kind": "cell", "ablate.cell": cell.cell_id, "layer_config": cell.record["layer_config"],
                "representation": cell.record["representation"], "ablate.fingerprint": cell.record["fingerprint"],
                "dataset": str(dataset.get("dataset", "")),
                "dataset_fingerprint": str(dataset.get("dataset_fingerprint", "")),
                "ablate.version": __version__, "host": str(meta.get("host") or socket.gethostname()),
                "device": str(meta.get("device", "")), "mlflow.runName": cell.cell_id}
        if cell.record.get("classifier"):
            tags["classifier"] = str(cell.record["classifier"])
        if meta.get("provenance") == "imported":
            tags["ablate.provenance"] = "imported"
        if commit := runtime.git_commit():
            tags["ablate.git_commit"] = commit
        return tags

    def _log_run(self, cell: CellOnDisk, k: int, parent_id: str) -> str:
        from mlflow.entities import Metric, Param

        doc = cell.runs[k]
        meta = doc.get("meta") or {}
        tags = {"ablate.kind": "run", "ablate.cell": cell.cell_id, "ablate.run": str(k),
                "ablate.checksum": cell.run_checksum(k), "ablate.fingerprint": cell.record["fingerprint"],
                "mlflow.parentRunId": parent_id, "layer_config": cell.record["layer_config"],
                "representation": cell.record["representation"], "host": str(meta.get("host", "")),
                "device": str(doc.get("device", ""))}
        if cell.record.get("classifier"):
            tags["classifier"] = str(cell.record["classifier"])
        run = self.client.create_run(self.experiment_id, run_name=f"{cell.cell_id}/run_{k}", tags=tags)
        run_id = run.info.run_id
        params = {**(meta.get("config") or {}), "run": k, "seed": doc.get("seed"),
                  "feature_dim": doc.get("feature_dim")}
        now = _now_ms()
        metrics = [Metric(name, float(v), now, 0) for name, v in (doc.get("metrics") or {}).items()
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
            path = self.store.tracking_ledger(cid)
            ledger = read_json_object(path) or {}
            if ledger.pop(self.uri, None) is not None:
                atomic_write_json(path, ledger)
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


def _create_sqlite_atomically(uri: str) -> None:
    """A new SQLite store is created in a temp file, then linked into place: a process killed while it is
    made must not leave a half-made store that MLflow refuses (``table _alembic_tmp_runs already
    exists``). Of processes creating it at once, the first link wins. The temp file is a copy of an
    empty store kept per MLflow version (:func:`_schema_template`): MLflow's schema migrations (seconds)
    run once per machine and version, not once per store."""
    path = _sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name)
    tmp.unlink(missing_ok=True)
    try:
        template = _schema_template()
        if template is not None:
            shutil.copyfile(template, tmp)
        else:
            _create_schema(tmp)
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_schema(path: Path) -> None:
    """MLflow's own empty store at ``path``: its tables and every schema migration, no experiment (MLflow
    adds its Default experiment, with this store's artifact root, when it first opens the store)."""
    try:
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # what MLflow runs on an empty database

        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
    except ImportError:  # another MLflow layout: let MLflow make its store (Default experiment included)
        from mlflow.tracking import MlflowClient

        path.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)


def _schema_template() -> Path | None:
    """An empty MLflow store for this MLflow, SQLAlchemy and alembic, made once and kept in the user's
    cache (``$XDG_CACHE_HOME/ablate``, ``~/.cache/ablate``); None where that folder cannot be written."""
    import alembic
    import mlflow
    import sqlalchemy

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablate"
    versions = f"mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}-alembic-{alembic.__version__}"
    template = cache / f"{versions}.empty.db"
    if template.is_file():
        return template
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{template.name}.{os.getpid()}.tmp"
        try:
            _create_schema(tmp)
            os.replace(tmp, template)
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as exc:  # an unwritable cache folder: the store is made directly, as before
        log.debug("tracking: no schema template in %s (%s)", cache, exc)
        return None
    return template


def _aggregates(cell: dict[str, Any]) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in cell.items()
            if k.endswith(("_mean", "_std", "_ci95")) and isinstance(v, int | float) and not isinstance(v, bool)]


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- from the grid: never costs a run ---------------------------------------------------------------
# The grid only queues work: one background thread per process imports mlflow, opens the store and
# logs, while training goes on (torch computes outside the GIL). At exit the process waits for the
# queue (at most FLUSH_TIMEOUT_S); what a kill -9 leaves unlogged, `ablate track sync` logs later.

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
                "later with: ablate track sync --output-dir %s", key[0], _first_line(exc),
                Path(key[1]).parent)


def notify_cell(uri: str | None, store: ExperimentStore, cell_id: str) -> None:
    """After a run or cell checkpoint of ``cell_id`` is written: bring MLflow up to date with it (queued)."""
    _notify(uri, store, ("cell", cell_id), lambda t: t.sync(cell_ids=[cell_id], merge=False))


def notify_merge(uri: str | None, store: ExperimentStore) -> None:
    _notify(uri, store, ("merge",), lambda t: t.sync_merge(SyncReport()))


def sync_failure(uri: str, exc: Exception) -> EnvironmentFailure:
    """`ablate track sync` could not reach or write the tracker: exit 4, one line."""
    return EnvironmentFailure(f"MLflow at {uri} failed: {_first_line(exc)}",
                              hint="check the URI and that the server or file is reachable, then rerun")


def supersede_reset(store: ExperimentStore, cell_ids: list[str]) -> str | None:
    """After ``ablate reset``: mark the cells' MLflow runs superseded; what to tell the user (None
    without tracking). A tracker that fails only warns: the next sync marks them."""
    if not (uri := configured_uri(store)):
        return None
    try:
        return f"Marked {Tracker(uri, store).supersede(cell_ids)} MLflow run(s) superseded (kept, not deleted)."
    except Exception as exc:
        return (f"warning: MLflow at {uri} failed ({_first_line(exc)}); the next `ablate run` or "
                "`ablate track sync` marks the old runs superseded")


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
