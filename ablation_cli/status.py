"""The status model of an experiment folder, built from its files only (never torch, never numpy).

``build_status`` returns the JSON object `ablate status --json` prints (keys in docs/outputs.md); each
cell is computed as a typed :class:`CellStatus` first. A Slurm queue overlay (cell -> task state,
from ``executors.slurm_queue``) is passed in by the caller, so this module never asks the queue.
Two judgements beside the cells: whether anything runs the experiment now (no ETA otherwise), and
whether results.json still holds the cells done now (:func:`results_freshness`).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NotRequired, TypedDict

from ablation_cli.durable import pid_alive, read_json, read_json_object
from ablation_cli.records import CellSpec, Heartbeat, as_pid, axis_value_text, cell_axes
from ablation_cli.store import ExperimentStore

STATES = ("done", "imported", "running", "interrupted", "failed", "stale", "pending")
REMOTE_HEARTBEAT_FRESH_S = 600.0


def _local_pid_alive(recorded: object) -> bool:
    pid = as_pid(recorded)
    return pid is not None and pid > 0 and pid_alive(pid)  # os.kill(-1 or 0, 0) asks about many processes


def _heartbeat_live(beat: Heartbeat) -> bool:
    if beat.host == socket.gethostname():
        return _local_pid_alive(beat.pid)
    return time.time() - beat.updated_ts < REMOTE_HEARTBEAT_FRESH_S


def run_in_progress(store: ExperimentStore) -> bool:
    """Whether an `ablate run` holds the experiment lock now, by its holder record (.lock.json): a live pid
    on this host; on another host (no pid to ask), a record written in the last REMOTE_HEARTBEAT_FRESH_S.
    Status never takes the lock itself: that could make a starting run fail. A run killed with SIGKILL
    leaves its record behind; its pid is gone."""
    holder = read_json_object(store.lock_info_file)
    if holder is None or holder.get("purpose", "run") != "run":
        return False  # a reset, a merge or a sync holds it: nothing trains
    if holder.get("host") == socket.gethostname():
        return _local_pid_alive(holder.get("pid", -1))
    try:
        written = store.lock_info_file.stat().st_mtime
    except OSError:
        return False
    return time.time() - written < REMOTE_HEARTBEAT_FRESH_S


def row_label(representation: str, classifier: str | None = None, axes: Mapping[str, Any] | None = None) -> str:
    """A table row's name: the representation, its classifier on a grid with a classifier axis, and its
    ``[axes]`` values on a sweep (``stats / mlp lr=3e-4 dropout=0.5``)."""
    label = f"{representation} / {classifier}" if classifier else representation
    if axes:
        label += " " + " ".join(f"{key.rpartition('.')[2]}={axis_value_text(v)}" for key, v in axes.items())
    return label


class Running(TypedDict):
    """A running cell's heartbeat, as its status row shows it."""

    current_run: object
    epoch: object
    host: object
    pid: object


class CellRow(TypedDict):
    """One cell of the status model (``cells``)."""

    id: str
    layer_config: str
    representation: str
    state: str
    runs_done: int
    runs_total: int
    test_acc_mean: float | None
    test_acc_std: float | None
    duration_s: float
    error: str | None
    classifier: NotRequired[str]
    axes: NotRequired[dict[str, Any]]
    current_run: NotRequired[object]
    epoch: NotRequired[object]
    host: NotRequired[object]
    pid: NotRequired[object]
    slurm: NotRequired[dict[str, str]]


@dataclass
class CellStatus:
    id: str
    layer_config: str
    representation: str
    runs_total: int
    classifier: str | None = None
    state: str = "pending"
    runs_done: int = 0
    test_acc_mean: float | None = None
    test_acc_std: float | None = None
    duration_s: float = 0.0
    error: str | None = None
    heartbeat: Running | None = None  # a running cell
    slurm: dict[str, str] | None = None  # job, state (squeue's, else sacct's), reason when pending
    run_times: list[float] = field(default_factory=list)  # for the ETA; not shown
    axes: dict[str, Any] = field(default_factory=dict)  # its [axes] values

    def to_json(self) -> CellRow:
        row: CellRow = {
            "id": self.id, "layer_config": self.layer_config, "representation": self.representation,
            "state": self.state, "runs_done": self.runs_done, "runs_total": self.runs_total,
            "test_acc_mean": self.test_acc_mean, "test_acc_std": self.test_acc_std, "duration_s": self.duration_s,
            "error": self.error,
        }
        if self.classifier is not None:
            row["classifier"] = self.classifier
        if self.axes:
            row["axes"] = dict(self.axes)
        if self.heartbeat is not None:
            row.update(self.heartbeat)
        if self.slurm is not None:
            row["slurm"] = dict(self.slurm)
        return row

    def apply_slurm(self, job: Mapping[str, Any]) -> None:
        """Overlay the cell's Slurm task state (squeue, else sacct) on its state from files."""
        self.slurm = {"job": job["job"], "state": job["state"]}
        if job.get("reason"):
            self.slurm["reason"] = job["reason"]
        if self.state in ("done", "imported", "failed", "stale"):
            return
        if job["live"]:
            if job["state"] == "RUNNING" and self.state != "running":
                self.state = "running"  # started, no heartbeat yet (importing, loading features)
            elif job["state"] != "RUNNING" and self.state == "interrupted":
                self.state = "pending"  # requeued or waiting: it will resume
        elif job["live"] is False and self.state in ("pending", "running", "interrupted"):
            self.state = "interrupted"
            how = "" if job["state"] == "ENDED" else f" ({job['state']})"
            self.error = f"Slurm job {job['job']} ended{how} without finishing the cell; rerun to resubmit"


def cell_status(store: ExperimentStore, spec: CellSpec, num_runs: int) -> CellStatus:
    cid = spec.id
    row = CellStatus(cid, spec.layer_config, spec.representation, num_runs, spec.classifier, axes=dict(spec.axes))
    verdict = store.cell_state(cid, spec.expected, num_runs)
    if (cell := verdict.cell()) is not None:
        row.state, row.runs_done = "imported" if cell.meta.imported else "done", num_runs  # imported: the original's
        row.test_acc_mean, row.test_acc_std = cell.test_acc_mean, cell.test_acc_std
        row.duration_s, row.run_times = cell.duration_s, cell.run_times
        return row  # a finished cell's runs need no second look
    stale_changes = verdict.changes if verdict.state == "stale" else []
    if verdict.state == "corrupt":
        row.error = f"corrupt checkpoint: {verdict.reason}"

    for v in store.run_verdicts(cid, spec.expected, num_runs).values():
        if (run := v.run()) is not None:
            row.run_times.append(run.train_time_s)
        elif v.state == "stale":
            stale_changes = stale_changes or v.changes
    row.runs_done, row.duration_s = len(row.run_times), sum(row.run_times)

    beat = store.read_heartbeat(cid)
    failure = store.read_failure(cid)
    if beat is not None and _heartbeat_live(beat):
        row.state = "running"
        row.heartbeat = {"current_run": beat.run, "epoch": beat.epoch, "host": beat.host, "pid": beat.pid}
    elif failure is not None:
        row.state, row.error = "failed", f"{failure.type}: {failure.message}"
    elif stale_changes:
        row.state, row.error = "stale", "configuration changed: " + "; ".join(stale_changes)
    elif row.runs_done > 0 or beat is not None:
        row.state = "interrupted"
    return row


class TrackingState(TypedDict):
    """The status model's ``tracking``: the experiment's MLflow URI and the runs not logged there yet."""

    mlflow: str
    untracked_runs: int


class StatusModel(TypedDict):
    """What `ablate status --json` prints (keys in docs/outputs.md)."""

    experiment: str
    dataset: str
    folder: str
    total: int
    done: int
    counts: dict[str, int]
    runs_done: int
    runs_total: int
    eta_s: float | None
    running: bool
    imported: bool
    layer_configs: list[str]
    representations: list[str]
    cells: list[CellRow]
    results: dict[str, object] | None
    tracking: NotRequired[TrackingState]  # added by `ablate status` when the experiment is tracked


def build_status(store: ExperimentStore, slurm: Mapping[str, Mapping[str, Any]] | None = None) -> StatusModel:
    """The status model; ``slurm`` maps cell ids to their Slurm task (``slurm_queue.slurm_overlay``)."""
    record = store.experiment()
    num_runs = record.num_runs
    cells = [cell_status(store, spec, num_runs) for spec in record.cells]
    for row in cells:
        if slurm and row.id in slurm:
            row.apply_slurm(slurm[row.id])
    times = [t for c in cells for t in c.run_times]
    runs_left = sum(num_runs - c.runs_done for c in cells if c.state not in ("done", "imported"))
    # something runs the experiment: a live heartbeat or a Slurm task running a cell (state "running"),
    # a Slurm task still queued, or an `ablate run` holding the lock (loading features, between cells)
    ids = {c.id for c in cells}
    running = (any(c.state == "running" for c in cells)
               or any(job.get("live") for cid, job in (slurm or {}).items() if cid in ids)
               or run_in_progress(store))
    if not runs_left:
        eta: float | None = 0.0
    elif not running or not times:
        eta = None  # nothing runs (killed, stopped, failed cells left): no ETA to wait for
    else:
        eta = (sum(times) / len(times)) * runs_left
    if record.imported:
        eta = None  # the original's cells: ablate runs nothing in this folder
    counts = {s: sum(c.state == s for c in cells) for s in STATES}
    return {
        "experiment": record.experiment,
        "dataset": record.dataset_name,
        "folder": str(store.root),
        "total": len(cells),
        "done": counts["done"],
        "counts": counts,
        "runs_done": sum(c.runs_done for c in cells),
        "runs_total": num_runs * len(cells),
        "eta_s": eta,
        "running": running,
        "imported": record.imported is not None,
        "layer_configs": list(record.layer_configs),
        "representations": list(dict.fromkeys(row_label(c.representation, c.classifier, c.axes) for c in cells)),
        "cells": [c.to_json() for c in cells],
        "results": results_freshness(store, record.cells, cells),
    }


def _results_cells(doc: Mapping[str, Any], specs: Sequence[CellSpec]) -> dict[str, Mapping[str, Any]]:
    """The cells a results.json holds, by cell id (its ``cell`` key, else its layer config, representation
    and classifier as experiment.json names them)."""
    ids: dict[tuple[object, object, object], str] = {(s.layer_config, s.representation, s.classifier): s.id
                                                     for s in specs}
    found: dict[str, Mapping[str, Any]] = {}
    for key, value in doc.items():
        if not (key.endswith("_results") and isinstance(value, list)):
            continue
        for c in value:
            if not isinstance(c, Mapping):
                continue
            cid = c.get("cell") or ids.get((c.get("layer_config"), c.get("representation"), c.get("classifier")))
            if isinstance(cid, str):
                found[cid] = c
    return found


def _same_cell(merged: Mapping[str, Any], spec: CellSpec, row: CellStatus) -> bool:
    """Whether a results.json cell is the checkpoint done now: its fingerprint and numbers (a cell reset
    and trained again under the same configuration may have others, on a GPU)."""
    if merged.get("fingerprint") is not None and merged["fingerprint"] != spec.expected.fingerprint:
        return False
    now = {"test_acc_mean": row.test_acc_mean, "test_acc_std": row.test_acc_std, "num_runs": row.runs_total}
    return all(merged.get(k, v) == v for k, v in now.items())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Freshness:
    """Whether results.json holds the cells done now, and the cell ids behind a no."""

    path: str
    up_to_date: bool = True
    reason: str | None = None
    reset: list[str] = field(default_factory=list)  # merged, checkpoint gone
    invalidated: list[str] = field(default_factory=list)  # merged, checkpoint now stale, corrupt or resized
    finished: list[str] = field(default_factory=list)  # done now, not merged or merged with other numbers

    def stale(self, reason: str) -> dict[str, object]:
        return {**asdict(self), "up_to_date": False, "reason": reason}

    def explain(self) -> None:
        """Say why it is out of date: how many cells of each kind, since the merge."""
        kinds = [(len(ids), kind) for kind, ids in (("reset", self.reset), ("invalidated", self.invalidated),
                                                     ("finished", self.finished)) if ids]
        if kinds:
            (n, first), rest = kinds[0], [f"{m} {k}" for m, k in kinds[1:]]
            said = ", ".join([f"{_plural(n, 'cell')} {first}", *rest[:-1]]) + (f" and {rest[-1]}" if rest else "")
            self.up_to_date, self.reason = False, f"{said} since the merge"


def results_up_to_date(store: ExperimentStore) -> bool:
    """Whether a complete merge is on disk and results.json holds exactly the cells done now. File times
    cannot say it: a merge beside a run can write results.json after a cell it never read."""
    if not store.merged():
        return False
    record = store.experiment()
    fresh = results_freshness(store, record.cells, [cell_status(store, spec, record.num_runs) for spec in record.cells])
    return fresh is not None and bool(fresh["up_to_date"])


def results_freshness(store: ExperimentStore, specs: Sequence[CellSpec],
                      cells: list[CellStatus]) -> dict[str, object] | None:
    """Whether results.json holds the cells done now: None when there is none (never merged); else
    :class:`Freshness` as JSON. Compares what results.json holds, not file times: a reset deletes
    checkpoints, which no mtime shows."""
    path = store.results_file
    out = Freshness(str(path))
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return out.stale(f"results.json is unreadable ({type(exc).__name__})")
    if not isinstance(doc, dict):
        return out.stale("results.json is not a JSON object")
    merged = _results_cells(doc, specs)
    by_id = {spec.id: spec for spec in specs}
    done = {c.id: c for c in cells if c.state in ("done", "imported")}
    for cid in merged:
        if cid not in done:
            (out.reset if not store.cell_path(cid).exists() else out.invalidated).append(cid)
    out.finished = [cid for cid, row in done.items()
                    if cid not in merged or not _same_cell(merged[cid], by_id[cid], row)]
    out.explain()
    return asdict(out)


def group_by(model: Mapping[str, Any], axis: str) -> list[dict[str, object]]:
    """``ablate status --by AXIS``: per value of the axis, in grid order, its cells done and in all, runs
    done and in all, and the mean test accuracy of its finished cells. ConfigError for an axis the
    experiment does not have."""
    from ablation_cli.errors import ConfigError

    cells = model["cells"]
    allowed = list(dict.fromkeys(k for c in cells for k in cell_axes(c)))
    if axis not in allowed:
        raise ConfigError(f"--by {axis}: not an axis of this experiment (allowed: {', '.join(allowed)})")
    groups: dict[str, dict[str, Any]] = {}
    for c in cells:
        value = cell_axes(c).get(axis)
        if value is None:
            continue
        g = groups.setdefault(repr(value), {"value": value, "cells": 0, "done": 0, "runs_done": 0, "runs_total": 0,
                                            "accs": []})
        g["cells"] += 1
        g["runs_done"] += c["runs_done"]
        g["runs_total"] += c["runs_total"]
        if c["state"] in ("done", "imported"):
            g["done"] += 1
            if c.get("test_acc_mean") is not None:
                g["accs"].append(c["test_acc_mean"])
    out = []
    for g in groups.values():
        accs = g.pop("accs")
        out.append({**g, "test_acc_mean": sum(accs) / len(accs) if accs else None})
    return out
