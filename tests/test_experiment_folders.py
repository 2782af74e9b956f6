"""Experiment folder names and picks (issue 25, items 2 and 3): two datasets whose folders share a name
never share an experiment folder; an output folder holding several experiments is picked from with
--experiment (or --dataset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ablation_cli.data.demo import DemoSource
from ablation_cli.errors import ExperimentError
from ablation_cli.store import ExperimentStore, path_slug
from tests.conftest import ablate_in_process as ablate
from tests.conftest import all_layers_project, load_json
from tests.lora_files import write_hf_dataset

CELL = "all_layers_simple_stats"


def hf_dataset(root: Path, seed: int) -> Path:
    """A small demo as a ``save_to_disk`` folder (one column per LoRA tensor, ``category_label``)."""
    return write_hf_dataset(DemoSource(name="hfdemo", num_samples=30, num_classes=3, seed=seed).load(), root)


def _project(folder: Path) -> Path:
    return all_layers_project(folder, ["simple_stats"])


@pytest.fixture(scope="module")
def two_hf(tmp_path_factory):
    """Two HF folders both named ``hf_dataset``, different contents, each run into one output folder ``out``."""
    base = tmp_path_factory.mktemp("two_hf")
    project = _project(base / "p")
    a, b = hf_dataset(base / "a" / "hf_dataset", seed=1), hf_dataset(base / "b" / "hf_dataset", seed=2)
    for data in (a, b):
        res = ablate("run", "-c", "exp.toml", "--dataset", str(data), "-o", "out", "--cache-dir", "cache", cwd=project)
        assert res.returncode == 0, res.stderr
    return project, a, b


def _copy(two_hf, tmp_path: Path) -> tuple[Path, Path, Path]:
    project, a, b = two_hf
    shutil.copytree(project, tmp_path / "p")
    return tmp_path / "p", a, b


def test_two_hf_folders_of_one_name_get_two_experiment_folders_and_nothing_is_superseded(two_hf):
    project, a, b = two_hf
    out = project / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"tiny_{path_slug(a)}", f"tiny_{path_slug(b)}"])
    assert all(n.startswith("tiny_hf_dataset-") and len(n) == len("tiny_hf_dataset-") + 6 for n in names)
    assert not list(out.rglob(".superseded")) and not list(out.rglob(".quarantine"))
    for data in (a, b):
        exp = out / f"tiny_{path_slug(data)}"
        assert load_json(exp / "experiment.json")["dataset"]["details"]["source"] == str(data)
        assert load_json(exp / "checkpoints" / f"{CELL}.json")["num_runs"] == 1
        assert (exp / "results.json").exists()
    accuracies = {json.dumps(load_json(out / n / "checkpoints" / f"{CELL}.json")["per_run_results"]) for n in names}
    assert len(accuracies) == 2  # two datasets' results, both kept


def test_status_without_a_pick_lists_the_experiments_and_names_the_flag(two_hf):
    project, a, b = two_hf
    res = ablate("status", "-o", "out", cwd=project)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--experiment" in errors[0], res.stderr
    assert f"tiny_{path_slug(a)}" in errors[0] and f"tiny_{path_slug(b)}" in errors[0]


@pytest.mark.parametrize("pick", ["experiment", "dataset"])
def test_status_picks_by_experiment_or_dataset_path(two_hf, pick):
    project, a, b = two_hf
    for data in (a, b):
        name = f"tiny_{path_slug(data)}"
        res = ablate("status", "-o", "out", f"--{pick}", name if pick == "experiment" else str(data), "--json",
                     cwd=project)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["done"] == 1 and name in json.dumps(doc)


def test_merge_and_reset_act_on_the_picked_experiment_only(two_hf, tmp_path):
    project, a, b = _copy(two_hf, tmp_path)
    picked, other = project / "out" / f"tiny_{path_slug(a)}", project / "out" / f"tiny_{path_slug(b)}"
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    (picked / "results.json").unlink()
    merged = ablate("merge", "-o", "out", "--experiment", picked.name, cwd=project)
    assert merged.returncode == 0, merged.stderr
    assert (picked / "results.json").exists()
    reset = ablate("reset", "-o", "out", "--experiment", picked.name, "--all", "--yes", cwd=project)
    assert reset.returncode == 0, reset.stderr
    assert not (picked / "checkpoints" / f"{CELL}.json").exists()
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()} == before


def test_compare_picks_with_experiment_in_an_output_folder_of_several(two_hf, tmp_path):
    project, a, b = two_hf
    first, second = f"tiny_{path_slug(a)}", f"tiny_{path_slug(b)}"
    stuck = ablate("compare", f"out/{first}", "out", "--out", str(tmp_path / "c0"), cwd=project)
    assert stuck.returncode == 2 and "--experiment" in stuck.stderr and second in stuck.stderr
    res = ablate("compare", f"out/{first}", "out", "--experiment", second, "--out", str(tmp_path / "c"), cwd=project)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c" / "comparison.md").exists()


def test_a_folder_of_the_old_name_for_the_same_dataset_stays_in_use(two_hf, tmp_path):
    project, a, _ = _copy(two_hf, tmp_path)
    (project / "out" / f"tiny_{path_slug(a)}").rename(project / "out" / "tiny_hf_dataset")  # as ablate named it
    res = ablate("run", "-c", "exp.toml", "--dataset", str(a), "-o", "out", "--cache-dir", "cache", cwd=project)
    assert res.returncode == 0, res.stderr
    assert "Skipping all_layers_simple_stats (already completed)" in res.stderr
    assert not (project / "out" / f"tiny_{path_slug(a)}").exists()
    assert not list((project / "out").rglob(".superseded"))


def test_a_folder_holding_another_dataset_is_refused(tmp_path):
    project = _project(tmp_path / "p")
    taken = ExperimentStore(project / "out" / "tiny_tinydemo")
    record = {"name": "tinydemo", "kind": "hf", "fingerprint": "abc", "details": {"source": "/elsewhere/tinydemo"}}
    taken.write_experiment({"schema_version": 1, "experiment": "tiny", "dataset": record, "cells": []})
    before = sorted(p.name for p in taken.root.rglob("*"))
    res = ablate("run", "-c", "exp.toml", "-o", "out", cwd=project)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "out/tiny_tinydemo holds dataset 'tinydemo' (hf, /elsewhere/tinydemo), not 'tinydemo' (demo)" \
           in errors[0] and "refusing to supersede" in errors[0]
    assert sorted(p.name for p in taken.root.rglob("*")) == before


# -- the store's rules, without a run --------------------------------------------------------------------

def _record(name: str, where: str | None, fingerprint: str = "f1", kind: str = "hf") -> dict:
    return {"name": name, "kind": kind, "fingerprint": fingerprint, "details": {"source": where} if where else {}}


@pytest.mark.parametrize(("recorded", "expect"), [
    (_record("hf_dataset", "/d/a/hf_dataset"), "old"),  # same place: the old folder stays in use
    (_record("hf_dataset", "/elsewhere/hf_dataset", fingerprint="f0"), "old"),  # same data, moved
    (_record("hf_dataset", "/d/b/hf_dataset", fingerprint="f2"), "new"),  # another dataset: a folder of its own
], ids=["same-place", "same-fingerprint", "other-dataset"])
def test_a_path_dataset_keeps_an_old_folder_only_when_it_records_that_dataset(tmp_path, recorded, expect):
    out, data = tmp_path / "out", Path("/d/a/hf_dataset")
    ExperimentStore.folder_for(out, "x", str(data)).write_experiment({"dataset": recorded})
    asked = []

    def current():
        asked.append(1)
        return _record("hf_dataset", str(data), fingerprint="f0")

    place = {"name": "hf_dataset", "details": {"path": str(data)}}
    store = ExperimentStore.for_dataset(out, "x", str(data), data, place, current)
    assert store.root.name == ("x_hf_dataset" if expect == "old" else f"x_{path_slug(data)}")
    assert asked == ([] if recorded["details"]["source"] == str(data) else [1])  # the place settles it cheaply


def test_a_named_dataset_keeps_its_name_and_a_changed_entry_is_refused(tmp_path):
    out = tmp_path / "out"
    place = {"name": "1k", "details": {"path": "jacekduszenko/lora-ws-1k"}}
    store = ExperimentStore.for_dataset(out, "x", "1k", None, place, lambda: _record("1k", "jacekduszenko/lora-ws-1k"))
    assert store.root == out / "x_1k"
    store.write_experiment({"dataset": _record("1k", "/data/other", fingerprint="f9")})
    with pytest.raises(ExperimentError, match=r"x_1k holds dataset '1k' \(hf, /data/other\), not '1k'"):
        ExperimentStore.for_dataset(out, "x", "1k", None, place, lambda: _record("1k", "jacekduszenko/lora-ws-1k"))


def test_find_by_recorded_experiment_name_and_the_no_match_message(tmp_path):
    for folder in ("x_a", "y_b"):
        ExperimentStore(tmp_path / folder).write_experiment({"experiment": folder[0], "dataset": _record(folder, None)})
    assert ExperimentStore.find(tmp_path, experiment="y").root.name == "y_b"
    with pytest.raises(ExperimentError, match=r"no experiment for --experiment z in .*; experiments there: x_a, y_b"):
        ExperimentStore.find(tmp_path, experiment="z")
