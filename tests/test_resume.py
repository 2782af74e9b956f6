"""A resume that cannot throw away finished work (issue 25, items 1 and 5): the forgotten flag stops with
the diff and the resume command, `run --resume DIR` replays the recorded settings, where configuration
comes from is recorded, and a dataset entry of the wrong kind says which kind it looks like."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ablation_cli.data.demo import DemoSource
from tests.conftest import ablate_in_process as ablate
from tests.conftest import all_layers_project, load_json
from tests.lora_files import write_hf_dataset

CELLS = ["all_layers_simple_stats", "all_layers_stats"]


def _project(folder: Path) -> Path:
    return all_layers_project(folder, ["simple_stats", "stats"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished experiment on a HF folder, run with a flag (``--max-epochs 3``) its config does not have."""
    base = tmp_path_factory.mktemp("resume")
    project = _project(base / "p")
    data = write_hf_dataset(DemoSource(name="hfdemo", num_samples=30, num_classes=3, seed=1).load(),
                            base / "hf_dataset")
    res = ablate("run", "-c", "exp.toml", "--dataset", str(data), "--max-epochs", "3", "-o", "out",
                 "--cache-dir", "cache", cwd=project)
    assert res.returncode == 0, res.stderr
    (root,) = (project / "out").iterdir()
    return project, data, root


def _copy(finished, tmp_path: Path) -> tuple[Path, Path, Path]:
    project, data, root = finished
    shutil.copytree(project, tmp_path / "p")
    return tmp_path / "p", data, tmp_path / "p" / "out" / root.name


def _checkpoints(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "checkpoints").rglob("*")) if p.is_file()}


def test_the_forgotten_flag_stops_with_the_diff_and_the_resume_command(finished, tmp_path):
    project, data, root = _copy(finished, tmp_path)
    before, record = _checkpoints(root), (root / "experiment.json").read_bytes()
    res = ablate("run", "-c", "exp.toml", "--dataset", str(data), "-o", "out", "--cache-dir", "cache", cwd=project)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[error] == (f"error: 2 finished cell(s) and 2 finished run(s) in out/{root.name} were made under "
                            "other settings; nothing was changed:")
    assert lines[error + 1] == "  max_epochs: 3 -> 2  (2 cell(s))"
    assert lines[error + 2] == f"  to resume with the recorded settings: ablate run --resume out/{root.name}"
    assert lines[error + 3].startswith("  to retrain them on purpose: the same command with --restart-stale")
    assert "Evaluating" not in res.stderr
    assert _checkpoints(root) == before and (root / "experiment.json").read_bytes() == record


def test_resume_replays_the_recorded_settings_from_anywhere(finished, tmp_path):
    project, _, root = _copy(finished, tmp_path)
    reset = ablate("reset", "--rep", "stats", "--yes", "-o", "out", cwd=project)
    assert reset.returncode == 0, reset.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = ablate("run", "--resume", str(root), "--cache-dir", str(project / "cache"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    recorded_config = (finished[0] / "exp.toml").resolve()  # the copied folder's record names the original's
    assert f"Resuming {root} with its recorded settings (config {recorded_config})" in res.stderr
    assert "Skipping all_layers_simple_stats (already completed)" in res.stderr
    assert "Evaluating all_layers_stats" in res.stderr
    assert load_json(root / "checkpoints/all_layers_stats.json")["hyperparameters"]["max_epochs"] == 3
    assert sorted(p.name for p in (project / "out").iterdir()) == [root.name]  # no second folder
    assert not (root / "checkpoints/.superseded").exists()
    again = ablate("run", "--resume", str(project / "out"), "--cache-dir", str(project / "cache"), cwd=elsewhere)
    assert again.returncode == 0 and "Nothing to do: all 2 cells are complete." in again.stderr, again.stderr


def test_a_rerun_merges_a_cell_that_a_partial_merge_missed(finished, tmp_path):
    """`merge --partial` beside a run: the run writes a cell checkpoint after the merge read the folder and
    before it wrote results.json, so the results file is newer than every checkpoint yet lacks that cell.
    A rerun compares what results.json holds, not file times, and merges again."""
    project, _, root = _copy(finished, tmp_path)
    cell, aside = root / "checkpoints/all_layers_stats.json", tmp_path / "aside.json"
    shutil.move(cell, aside)  # the merge does not see it ...
    assert ablate("merge", "--partial", "-o", "out", cwd=project).returncode == 0
    shutil.move(aside, cell)  # ... written meanwhile: its file time is older than results.json's
    assert cell.stat().st_mtime_ns < (root / "results.json").stat().st_mtime_ns
    assert [r["cell"] for r in load_json(root / "results.json")["all_layers_results"]] == CELLS[:1]
    again = ablate("run", "--resume", str(root), "--cache-dir", "cache", cwd=project)
    assert again.returncode == 0, again.stderr
    assert "Nothing to do: all 2 cells are complete." in again.stderr
    assert "Results are up to date" not in again.stderr and "All cells complete" in again.stderr
    assert [r["cell"] for r in load_json(root / "results.json")["all_layers_results"]] == CELLS


def test_resume_with_a_changed_flag_or_a_config_is_refused(finished, tmp_path):
    project, _, root = _copy(finished, tmp_path)
    changed = ablate("run", "--resume", str(root), "--max-epochs", "5", "--cache-dir", "cache", cwd=project)
    assert changed.returncode == 2 and "max_epochs: 3 -> 5  (2 cell(s))" in changed.stderr, changed.stderr
    both = ablate("run", "--resume", str(root), "-c", "exp.toml", cwd=project)
    assert both.returncode == 2
    assert "error: --resume DIR replays the config recorded in DIR; drop --config" in both.stderr
    nowhere = ablate("run", "--resume", str(tmp_path / "none"), cwd=project)
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr, nowhere.stderr


def test_restart_stale_retrains_and_restore_brings_the_cells_back(finished, tmp_path):
    project, data, root = _copy(finished, tmp_path)
    old = load_json(root / "checkpoints/all_layers_stats.json")
    res = ablate("run", "-c", "exp.toml", "--dataset", str(data), "-o", "out", "--cache-dir", "cache",
                 "--restart-stale", cwd=project)
    assert res.returncode == 0, res.stderr
    assert load_json(root / "checkpoints/all_layers_stats.json")["hyperparameters"]["max_epochs"] == 2
    listed = ablate("restore", "-o", "out", cwd=project)
    assert listed.returncode == 0, listed.stderr
    assert "  all_layers_stats: cell + 1 run(s), superseded " in listed.stdout
    assert "its settings -> the experiment's now: max_epochs: 3 -> 2" in listed.stdout
    assert "2 cell(s) can be restored" in listed.stdout
    refused = ablate("restore", "-o", "out", "--all", cwd=project)
    assert refused.returncode == 2 and "have checkpoints now" in refused.stderr, refused.stderr
    assert ablate("reset", "--all", "--yes", "-o", "out", cwd=project).returncode == 0
    back = ablate("restore", "-o", "out", "--all", cwd=project)
    assert back.returncode == 0 and "Restored 4 file(s) of 2 cell(s)" in back.stdout, back.stdout
    assert load_json(root / "checkpoints/all_layers_stats.json") == old
    resumed = ablate("run", "-c", "exp.toml", "--dataset", str(data), "-o", "out", "--cache-dir", "cache",
                     "--max-epochs", "3", cwd=project)
    assert resumed.returncode == 0 and "Evaluating" not in resumed.stderr, resumed.stderr


def test_experiment_json_and_run_log_say_where_the_configuration_came_from(finished):
    project, data, root = finished
    sources = load_json(root / "experiment.json")["sources"]
    assert sources == {"config": str((project / "exp.toml").resolve()),
                       "datasets": str((project / "datasets.toml").resolve()),
                       "dataset": str(data.resolve()),
                       "dataset_options": {"layout": None, "labels": None, "label_field": None,
                                           "on_mismatch": None, "drop_nonfinite": None}}
    log = (root / "run.log").read_text()
    assert f"Config: {project / 'exp.toml'}; datasets: {project / 'datasets.toml'}" in log


def test_datasets_toml_in_configs_is_found_beside_any_config(tmp_path):
    project = _project(tmp_path / "p")
    (project / "configs").mkdir()
    shutil.move(project / "datasets.toml", project / "configs" / "datasets.toml")
    (project / "elsewhere").mkdir()
    shutil.move(project / "exp.toml", project / "elsewhere" / "exp.toml")
    res = ablate("inspect", "tinydemo", "-c", "elsewhere/exp.toml", cwd=project)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^LoRAs +120$", res.stdout, re.M), res.stdout  # the tiny demo of ./configs/datasets.toml


def test_a_dataset_entry_of_the_wrong_kind_says_which_kind_it_looks_like(tmp_path):
    project = _project(tmp_path / "p")
    write_hf_dataset(DemoSource(name="hfdemo", num_samples=12, num_classes=3, seed=1).load(), project / "data" / "hf")
    with (project / "datasets.toml").open("a") as fh:
        fh.write('\n[mine]\nkind = "folder"\npath = "data/hf"\n')
    res = ablate("run", "-c", "exp.toml", "--dataset", "mine", "-o", "out", cwd=project)
    assert res.returncode == 2, res.stderr
    assert ("error: dataset 'mine': data/hf looks like a Hugging Face save_to_disk folder "
            '(dataset_info.json), not a folder of LoRA files (declare it as kind = "hf" with path = "data/hf")'
            ) in res.stderr
    assert not (project / "out").exists()


def test_merge_warns_when_cells_were_trained_under_different_thread_counts(tmp_path):
    project = _project(tmp_path / "p")
    first = ablate("run", "-c", "exp.toml", "-o", "out", "--threads", "1", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "different torch thread counts" not in first.stderr
    (root,) = (project / "out").iterdir()
    cell = load_json(root / "checkpoints/all_layers_stats.json")
    assert [r["torch_threads"] for r in cell["per_run_results"]] == [1]
    assert ablate("reset", "--rep", "stats", "--yes", "-o", "out", cwd=project).returncode == 0
    second = ablate("run", "-c", "exp.toml", "-o", "out", "--threads", "2", cwd=project)
    assert second.returncode == 0, second.stderr
    warning = ("CPU runs were trained under different torch thread counts (1 thread(s): all_layers_simple_stats; "
               "2 thread(s): all_layers_stats); on the CPU a thread count changes training trajectories")
    assert warning in second.stderr
    assert load_json(root / "results.json")["warnings"][0].startswith(warning)
    merged = ablate("merge", "-o", "out", cwd=project)
    assert merged.returncode == 0 and f"warning: {warning}" in merged.stdout, merged.stdout
