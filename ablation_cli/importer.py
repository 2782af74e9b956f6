"""``ablate import``: an experiment folder made from the original script's output folder.

The original wrote ``<dir>/checkpoints/<layer_config>_<rep>.json`` (layer config ``all_layers`` or
``visual_only``), each a cell dict in its own keys, and ``<dir>/results.json`` once the grid was done.
Each readable cell becomes an ablate cell checkpoint marked as imported (``meta.provenance``,
the source file's sha256, ``protocol = "original"``): `status` shows it as imported, `merge` and
`compare` use it, and `run` never reuses it under ablate's own protocol. A cell with another number
of runs than the original's ``num_runs`` is skipped like an unreadable file (named, exit 1). The
numbers are the original's: a ``<metric>_std`` it did not write is not made up (only ``*_ci95``,
which the original never kept, is computed). The source folder is only read, and an output folder
inside it, or holding it, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation_cli import __version__
from ablation_cli.durable import dead_writers_temp, fsync_dir, now_iso, read_json_object, sha256_file, temp_name
from ablation_cli.errors import EXIT_FAILED_CELLS, EXIT_OK, ExperimentError
from ablation_cli.features import registry
from ablation_cli.original import from_original_cell
from ablation_cli.records import Fingerprint
from ablation_cli.reports.merge import write_merge
from ablation_cli.store import ExperimentStore
from ablation_cli.training.metrics import aggregate

log = logging.getLogger(__name__)

PROTOCOL = "original"
LAYER_CONFIGS = ("all_layers", "visual_only")
_CELL_FILE = re.compile(rf"^({'|'.join(LAYER_CONFIGS)})_(\w+)\.json$")
# test accuracy and macro F1 are the tables' columns; the merge derives the original's names of a
# metric from ablate's mean and std together, so neither is filled in when the file lacks it
_REQUIRED = ("test_acc_mean", "test_acc_std", "test_f1_mean", "per_run_results")


@dataclass
class ImportReport:
    store: ExperimentStore
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per file: what was wrong with it
    results: Mapping[str, Any] = field(default_factory=dict)  # the merge of the imported cells
    paths: list[Path] = field(default_factory=list)  # what the merge wrote

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_CELLS if self.skipped else EXIT_OK


@dataclass(frozen=True)
class OriginalCell:
    """One cell checkpoint the original script wrote: its file, its name parts and its document."""

    path: Path
    layer_config: str
    representation: str
    doc: Mapping[str, Any]

    @property
    def num_runs(self) -> int:
        return len(self.doc["per_run_results"])


def _cell(path: Path) -> OriginalCell:
    """The original's cell checkpoint at ``path``, or ValueError."""
    match = _CELL_FILE.match(path.name)
    if match is None:
        raise ValueError(f"not a cell checkpoint name (<{'|'.join(LAYER_CONFIGS)}>_<representation>.json)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if isinstance(doc.get("meta"), dict) and "fingerprint" in doc["meta"]:
        raise ValueError("an ablate checkpoint, not the original script's")
    missing = [k for k in _REQUIRED if k not in doc]
    runs = doc.get("per_run_results")
    if missing or not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"partial cell (missing {', '.join(missing) or 'per_run_results'})")
    return OriginalCell(path, match.group(1), match.group(2), doc)


def _expected_runs(results: Mapping[str, Any] | None, counts: list[int]) -> tuple[int, str]:
    """The original's ``num_runs`` and where it comes from: its results.json, else the run count of
    most cells (the larger one on a tie)."""
    declared = (results or {}).get("num_runs")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared, "num_runs in results.json"
    return max(set(counts), key=lambda n: (counts.count(n), n)), "the run count of most cells; no results.json num_runs"


def _refuse_nested(source: Path, output_dir: Path) -> None:
    """An output folder inside the source folder, or holding it, is refused (symlinks resolved)."""
    src, out = source.resolve(), output_dir.resolve()
    if out.is_relative_to(src):
        what = f"the import would write into its source folder: --output-dir {output_dir} lies inside {source}"
    elif src.is_relative_to(out):
        what = f"the import would write around its source folder: {source} lies inside --output-dir {output_dir}"
    else:
        return
    if (src, out) != (source.absolute(), output_dir.absolute()):
        what += f" (resolved: {src} and {out})"
    raise ExperimentError(f"{what}; nothing was written",
                          hint="choose an --output-dir that neither lies inside the source folder nor holds it: "
                               "the source folder is only read")


def _ci95(doc: dict[str, Any]) -> None:
    """``<metric>_ci95`` for every per-run metric (the original kept no intervals)."""
    runs = doc["per_run_results"]
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and f"{key}_mean" in doc:
            doc.setdefault(f"{key}_ci95", aggregate([float(v) for v in values])["ci95"])


def _fingerprint(layer_config: str, rep: str, dataset: str, digest: str) -> dict[str, object]:
    """An imported cell's fingerprint record: the digest of its file, and the protocol it was made under."""
    return Fingerprint(f"imported-{digest[:16]}",
                       {"layer_config": layer_config, "representation": rep, "protocol": PROTOCOL},
                       {"dataset": dataset}, {"protocol": PROTOCOL}).to_json()


def guess_dataset(source: Path, results: Mapping[str, Any] | None) -> str:
    """The dataset's name: from the original's results.json, else its folder name (visual_ablation_<dataset>)."""
    if results and isinstance(results.get("dataset"), str):
        return results["dataset"]
    return source.name.removeprefix("visual_ablation_") or source.name


def import_original(source: Path, output_dir: Path, dataset: str | None = None,
                    experiment: str = "visual_ablation") -> ImportReport:
    """Create ``<output_dir>/<experiment>_<dataset>`` from the original's folder ``source``."""
    folder = source / "checkpoints"
    if not folder.is_dir():
        raise ExperimentError(f"{source} has no checkpoints/ folder: not an output folder of the original script",
                              hint="give the folder that holds checkpoints/ (e.g. results_50k/visual_ablation_50k)")
    _refuse_nested(source, output_dir)
    results = read_json_object(source / "results.json")
    dataset = dataset or guess_dataset(source, results)
    store = ExperimentStore.folder_for(output_dir, experiment, dataset)
    if store.root.exists() and any(store.root.iterdir()):
        raise ExperimentError(f"{store.root} already exists and is not empty; nothing was written",
                              hint="choose another --output-dir or --experiment")
    report = ImportReport(store)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    digests: dict[str, str] = {}
    readable: list[OriginalCell] = []
    for path in sorted(folder.glob("*.json")):
        try:
            readable.append(_cell(path))
        except ValueError as exc:
            report.skipped.append(f"{path.name}: {exc}")
    num_runs, whence = _expected_runs(results, [orig.num_runs for orig in readable]) if readable else (0, "")
    for orig in readable:
        path, lc, rep = orig.path, orig.layer_config, orig.representation
        if orig.num_runs != num_runs:  # status and merge would not count it: not imported
            report.skipped.append(f"{path.name}: cell {lc}_{rep} has {orig.num_runs} run(s), "
                                  f"expected {num_runs} ({whence})")
            continue
        digest = sha256_file(path)
        doc = from_original_cell(orig.doc, lc, rep)
        _ci95(doc)
        if results:
            doc.setdefault("num_classes", results.get("num_classes"))
            doc.setdefault("label_mapping", results.get("label_mapping"))
        doc["meta"] = {**_fingerprint(lc, rep, dataset, digest), "provenance": "imported", "protocol": PROTOCOL,
                       "source": str(path.resolve()), "source_sha256": digest, "created_at": now_iso(),
                       "host": socket.gethostname(), "duration_s": doc["duration_s"],
                       "versions": {"ablate": __version__}}
        cells[(lc, rep)] = doc
        digests[doc["cell"]] = digest
    if not cells:
        raise ExperimentError(f"no readable cell checkpoint in {folder}"
                              + (f" ({len(report.skipped)} skipped: {report.skipped[0]})" if report.skipped else ""))
    known = registry.available()
    reps = sorted({rep for _, rep in cells}, key=lambda r: (known.index(r) if r in known else len(known), r))
    lcs = [lc for lc in LAYER_CONFIGS if any(lc == c for c, _ in cells)]
    # everything is written into a staging folder beside the target, merged there, then renamed into
    # place: an import killed halfway leaves no half folder, only a stage the next import removes
    _remove_dead_stages(store.root)
    stage = ExperimentStore(store.root.parent / temp_name(store.root.name))
    try:
        stage.write_experiment(_record(source, dataset, experiment, cells, lcs, reps, num_runs, results, digests))
        for doc in cells.values():
            stage.write_cell(doc["cell"], doc)
            report.imported.append(doc["cell"])
        report.results, report.paths = write_merge(stage, partial=True)
        os.replace(stage.root, store.root)  # store.root is absent or empty: one rename
    finally:
        if stage.root.exists():
            shutil.rmtree(stage.root, ignore_errors=True)
    fsync_dir(store.root.parent)
    report.paths = [store.root / p.relative_to(stage.root) for p in report.paths]
    return report


def _remove_dead_stages(root: Path) -> None:
    for stale in root.parent.glob(f".{root.name}.*.tmp"):
        if stale.is_dir() and dead_writers_temp(stale):
            shutil.rmtree(stale, ignore_errors=True)


def _record(source: Path, dataset: str, experiment: str, cells: Mapping[tuple[str, str], Mapping[str, Any]],
            lcs: list[str], reps: list[str], num_runs: int, results: Mapping[str, Any] | None,
            digests: dict[str, str]) -> dict[str, object]:
    """experiment.json of an imported experiment: the grid the files span (a missing cell is pending)."""
    grid = []
    for lc in lcs:
        for rep in reps:
            digest = digests.get(f"{lc}_{rep}") or hashlib.sha256(f"missing {lc} {rep}".encode()).hexdigest()
            cell = cells.get((lc, rep))
            grid.append({"id": f"{lc}_{rep}", "layer_config": lc, "representation": rep,
                         "num_layers": cell.get("num_layers") if cell else None,
                         **_fingerprint(lc, rep, dataset, digest)})
    layer_configs: dict[str, dict[str, object]] = {}
    for (lc, _), cell in cells.items():
        layer_configs.setdefault(lc, {"num_layers": cell.get("num_layers"), "layers": []})
    counts = {k: results[k] for k in ("num_all_layers", "num_visual_layers", "num_text_layers")
              if results and isinstance(results.get(k), int)}
    return {
        "schema_version": 1,
        "experiment": experiment,
        "dataset": {"name": dataset, "kind": "imported", "fingerprint": None,
                    "num_samples": (results or {}).get("num_samples"), "num_layers": None,
                    "details": {"source": str(source.resolve())}},
        "num_runs": num_runs,
        "config": {"representations": reps, "layer_configs": {lc: {} for lc in lcs}, "protocol": PROTOCOL},
        "layer_configs": layer_configs,
        "layer_counts": counts,
        "cells": grid,
        "imported": {"source": str(source.resolve()), "protocol": PROTOCOL, "imported_at": now_iso(),
                     "files": digests},
        "ablate_version": __version__,
        "created_at": now_iso(),
        "updated_at": now_iso(),
        "host": socket.gethostname(),
    }
