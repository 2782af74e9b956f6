"""Pure status model of an experiment folder, built from files only (never torch)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from ablation_cli.errors import ExperimentError
from ablation_cli.store import ExperimentStore, expected_fingerprint, pid_alive, read_json, verify

STATES = ("done", "running", "interrupted", "failed", "stale", "pending")
REMOTE_HEARTBEAT_FRESH_S = 600.0


def find_experiment(output_dir: Path, dataset: str | None = None, experiment: str | None = None) -> Path:
    """The experiment folder under ``output_dir`` (or ``output_dir`` itself if it is one)."""
    if (output_dir / "experiment.json").exists():
        return output_dir
    if not output_dir.is_dir():
        raise ExperimentError(f"output folder {output_dir} does not exist", hint="start with `ablate run`")
    found = []
    for child in sorted(output_dir.iterdir()):
        record = child / "experiment.json"
        if not record.exists():
            continue
        try:
            doc = read_json(record)
        except (OSError, json.JSONDecodeError):
            continue
        if dataset is not None and doc.get("dataset", {}).get("name") not in (dataset, _slug(dataset)):
            continue
        if experiment is not None and doc.get("experiment") != experiment:
            continue
        found.append(child)
    if len(found) == 1:
        return found[0]
    what = f" for dataset '{dataset}'" if dataset else ""
    if not found:
        raise ExperimentError(f"no experiment{what} in {output_dir}", hint="start one with `ablate run`")
    names = ", ".join(p.name for p in found)
    raise ExperimentError(f"several experiments in {output_dir}: {names}", hint="pick one with --dataset")


def _slug(dataset: str) -> str:
    from ablation_cli.data.sources import dataset_slug

    return dataset_slug(dataset)


def _heartbeat_live(doc: dict[str, Any]) -> bool:
    if doc.get("host") == socket.gethostname():
        return pid_alive(int(doc.get("pid", -1)))
    return time.time() - float(doc.get("updated_ts", 0)) < REMOTE_HEARTBEAT_FRESH_S


def cell_status(store: ExperimentStore, spec: dict[str, Any], num_runs: int) -> dict[str, Any]:
    cid = spec["id"]
    expected = expected_fingerprint(spec)
    row: dict[str, Any] = {
        "id": cid, "layer_config": spec["layer_config"], "representation": spec["representation"],
        "state": "pending", "runs_done": 0, "runs_total": num_runs, "test_acc_mean": None,
        "test_acc_std": None, "duration_s": 0.0, "error": None,
    }
    cell = verify(store.cell_path(cid), "cell", expected)
    if cell.state == "ok" and cell.doc is not None and cell.doc.get("num_runs") == num_runs:
        runs = cell.doc.get("per_run_results") or []
        row.update(state="done", runs_done=num_runs, test_acc_mean=cell.doc.get("test_acc_mean"),
                   test_acc_std=cell.doc.get("test_acc_std"), duration_s=float(cell.doc.get("duration_s", 0.0)))
        row["_run_times"] = [float(r.get("train_time_s", 0.0)) for r in runs]
        return row  # a finished cell's runs need no second look
    stale_changes = cell.changes if cell.state == "stale" else []
    if cell.state == "corrupt":
        row["error"] = f"corrupt checkpoint: {cell.reason}"

    run_times: list[float] = []
    for k in store.run_indices(cid):
        if k > num_runs:
            continue
        v = verify(store.run_path(cid, k), "run", expected)
        if v.state == "ok" and v.doc is not None:
            run_times.append(float(v.doc.get("train_time_s", 0.0)))
        elif v.state == "stale":
            stale_changes = stale_changes or v.changes
    row.update(runs_done=len(run_times), duration_s=sum(run_times), _run_times=run_times)

    beat = _read_optional(store.progress_path(cid))
    failure = _read_optional(store.failure_path(cid))
    if beat is not None and _heartbeat_live(beat):
        row.update(state="running", current_run=beat.get("run"), epoch=beat.get("epoch"),
                   host=beat.get("host"), pid=beat.get("pid"))
    elif failure is not None:
        row.update(state="failed", error=f"{failure.get('type')}: {failure.get('message')}")
    elif stale_changes:
        row.update(state="stale", error="configuration changed: " + "; ".join(stale_changes))
    elif row["runs_done"] > 0 or beat is not None:
        row["state"] = "interrupted"
    return row


def _read_optional(path: Path) -> dict[str, Any] | None:
    try:
        doc = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def apply_slurm(row: dict[str, Any], job: dict[str, Any]) -> None:
    """Overlay a cell's Slurm task state (squeue, else sacct) on its state from files."""
    row["slurm"] = {"job": job["job"], "state": job["state"]}
    if job.get("reason"):
        row["slurm"]["reason"] = job["reason"]
    if row["state"] in ("done", "failed", "stale"):
        return
    if job["live"]:
        if job["state"] == "RUNNING" and row["state"] != "running":
            row["state"] = "running"  # started, no heartbeat yet (importing, loading features)
        elif job["state"] != "RUNNING" and row["state"] == "interrupted":
            row["state"] = "pending"  # requeued or waiting: it will resume
    elif job["live"] is False and row["state"] in ("pending", "running", "interrupted"):
        row["state"] = "interrupted"
        how = "" if job["state"] == "ENDED" else f" ({job['state']})"
        row["error"] = f"Slurm job {job['job']} ended{how} without finishing the cell; rerun to resubmit"


def build_status(store: ExperimentStore) -> dict[str, Any]:
    record = store.read_experiment()
    num_runs = int(record["num_runs"])
    cells = [cell_status(store, spec, num_runs) for spec in record["cells"]]
    if (store.root / "slurm" / "submissions.json").exists():
        from ablation_cli.executors.slurm import slurm_overlay

        jobs = slurm_overlay(store)
        for row in cells:
            if row["id"] in jobs:
                apply_slurm(row, jobs[row["id"]])
    times = [t for c in cells for t in c.pop("_run_times")]
    runs_left = sum(num_runs - c["runs_done"] for c in cells if c["state"] != "done")
    eta = (sum(times) / len(times)) * runs_left if times and runs_left else (0.0 if not runs_left else None)
    counts = {s: sum(c["state"] == s for c in cells) for s in STATES}
    return {
        "experiment": record["experiment"],
        "dataset": record["dataset"]["name"],
        "folder": str(store.root),
        "total": len(cells),
        "done": counts["done"],
        "counts": counts,
        "runs_done": sum(c["runs_done"] for c in cells),
        "runs_total": num_runs * len(cells),
        "eta_s": eta,
        "layer_configs": list(record["layer_configs"]),
        "representations": list(dict.fromkeys(c["representation"] for c in cells)),
        "cells": cells,
    }
