"""Finished work made under other settings: found before a run touches it, moved aside only on
purpose (``ablate run --restart-stale``), and brought back with ``ablate restore``.

A plain ``ablate run`` whose settings differ from those of finished checkpoints stops (exit 2) and
names every changed field: a forgotten flag must never retrain a night's work. Superseded files keep
their names in ``checkpoints/.superseded/`` (``<cell>.json.<stamp>``, ``runs__<cell>__run_<k>.json.<stamp>``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation_cli.durable import fsync_dir, read_json_object
from ablation_cli.errors import ConfigError, ExperimentError
from ablation_cli.records import Fingerprint, Meta
from ablation_cli.store import ExperimentStore, verify

Expected = Mapping[str, Fingerprint]  # cell id -> the fingerprint its checkpoints must carry


@dataclass
class StaleCell:
    """The valid checkpoints of one cell that another configuration made."""

    cell_id: str
    cell: bool = False  # the cell checkpoint itself
    runs: list[int] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    settings: bool = False  # a config or data option changed (not only ablate's code)
    data: bool = False  # the dataset's part changed: its files, or the options that pick its rows


def stale_work(store: ExperimentStore, expected: Expected) -> list[StaleCell]:
    """Every cell whose cell or run checkpoints are valid but made under other settings. Reads only."""
    found = []
    for cell_id, record in expected.items():
        stale = StaleCell(cell_id)
        paths: list[tuple[Path, str, int | None]] = [(store.cell_path(cell_id), "cell", None)]
        paths += [(store.run_path(cell_id, k), "run", k) for k in store.run_indices(cell_id)]
        for path, kind, k in paths:
            verdict = verify(path, kind, record)
            if verdict.state != "stale" or verdict.doc is None:
                continue
            if k is None:
                stale.cell = True
            else:
                stale.runs.append(k)
            made = Meta.from_json(verdict.doc["meta"]).fingerprint
            stale.settings |= made.config != record.config or made.dataset != record.dataset
            stale.data |= made.dataset != record.dataset
            stale.changes += [c for c in verdict.changes if c not in stale.changes]
        if stale.cell or stale.runs:
            found.append(stale)
    return found


class StaleCheckpoints(ExperimentError):
    """Finished checkpoints would be superseded by a run under other settings (exit 2)."""


def refuse(store: ExperimentStore, stale: list[StaleCell]) -> StaleCheckpoints:
    """The exit-2 error that stops a run before it supersedes anything: each change once, and the ways on."""
    counts: dict[str, int] = {}
    for s in stale:
        for change in s.changes:
            counts[change] = counts.get(change, 0) + 1
    cells = sum(s.cell for s in stale)
    runs = sum(len(s.runs) for s in stale)
    what = " and ".join(part for part in (f"{cells} finished cell(s)" if cells else "",
                                          f"{runs} finished run(s)" if runs else "") if part)
    lines = [f"{what} in {store.root} were made under other settings; nothing was changed:"]
    lines += [f"  {change}  ({n} cell(s))" for change, n in counts.items()]
    if any(s.settings for s in stale):
        lines.append(f"  to resume with the recorded settings: ablate run --resume {shlex.quote(str(store.root))}")
    else:
        lines.append("  (only code changed, ablate's or a plugin's: the recorded settings would not bring them back)")
    lines.append("  to retrain them on purpose: the same command with --restart-stale (the old checkpoints move "
                 "to checkpoints/.superseded/; `ablate restore` brings them back)")
    return StaleCheckpoints("\n".join(lines))


def supersede(store: ExperimentStore, stale: list[StaleCell], expected: Expected) -> int:
    """Move the stale checkpoints aside (``--restart-stale``), each named in the log; the files moved."""
    moved = 0
    for s in stale:
        paths = [(store.cell_path(s.cell_id), "cell")] if s.cell else []
        paths += [(store.run_path(s.cell_id, k), "run") for k in s.runs]
        for path, kind in paths:
            moved += store.load_verified(path, kind, expected[s.cell_id]).state == "stale"
    return moved


# -- ablate restore ---------------------------------------------------------------------------
_STAMP = r"\d{8}T\d{6}(?:\.\d+)?"


@dataclass
class Restorable:
    """The newest superseded version of one cell: its cell file (if any) and run files of one fingerprint."""

    cell_id: str
    fingerprint: str
    cell: Path | None
    runs: dict[int, Path]
    record: Fingerprint  # what they were made under
    stamp: str


def restorable(store: ExperimentStore, cell_ids: list[str]) -> list[Restorable]:
    """For each cell id with superseded files: the newest fingerprint's files, newest version of each."""
    folder = store.superseded_dir
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    found = []
    for cell_id in cell_ids:
        pattern = re.compile(rf"^(?:{re.escape(cell_id)}\.json|runs__{re.escape(cell_id)}__run_(\d+)\.json)"
                             rf"\.({_STAMP})$")
        versions: list[tuple[str, int | None, Path, Fingerprint]] = []
        for name in names:
            if not (m := pattern.match(name)):
                continue
            doc = read_json_object(folder / name)
            meta = doc.get("meta") if doc is not None else None
            if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), str):
                made = Fingerprint.from_json(meta)
                versions.append((m.group(2), int(m.group(1)) if m.group(1) else None, folder / name, made))
        if not versions:
            continue
        newest = max(versions, key=lambda v: v[0])
        fp = newest[3].fingerprint
        cell: tuple[str, Path] | None = None
        runs: dict[int, tuple[str, Path]] = {}
        for stamp, k, path, made in versions:
            if made.fingerprint != fp or verify(path, "cell" if k is None else "run", None).state != "ok":
                continue
            if k is None:
                if cell is None or stamp >= cell[0]:
                    cell = (stamp, path)
            elif k not in runs or stamp >= runs[k][0]:
                runs[k] = (stamp, path)
        if cell is None and not runs:
            continue
        found.append(Restorable(cell_id, str(fp), cell[1] if cell else None, {k: p for k, (_, p) in runs.items()},
                                newest[3], newest[0]))
    return found


def restore(store: ExperimentStore, item: Restorable) -> int:
    """Move one cell's superseded files back into place (call with the lock held); the files moved.
    A cell that has checkpoints now is refused: nothing the user has is overwritten."""
    if store.cell_files(item.cell_id):
        raise ConfigError(f"{item.cell_id} has checkpoints now; refusing to overwrite them",
                          hint=f"reset it first: ablate reset ... --yes, or leave it; its old files stay in "
                               f"{store.superseded_dir}")
    moves = [(p, store.run_path(item.cell_id, k)) for k, p in sorted(item.runs.items())]
    if item.cell is not None:
        moves.append((item.cell, store.cell_path(item.cell_id)))  # last: a cell is done only with its runs
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        fsync_dir(target.parent)
    fsync_dir(store.superseded_dir)
    return len(moves)


def describe(item: Restorable, current: Fingerprint | Mapping[str, Any] | None) -> str:
    """One line: what a restorable cell holds and how its settings differ from the experiment's now
    (``current``: the cell's fingerprint, or its experiment.json entry)."""
    held = ("cell + " if item.cell else "") + f"{len(item.runs)} run(s)"
    if current is not None and not isinstance(current, Fingerprint):
        current = Fingerprint.from_json(current)
    changes = item.record.changes(current) if current is not None else []
    made = f"; its settings -> the experiment's now: {', '.join(changes)}" if changes else ""
    return f"{item.cell_id}: {held}, superseded {item.stamp}{made}"
