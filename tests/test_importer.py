"""`ablate import`: the original script's output folder becomes an ablate experiment; `run` never
mistakes the original's files for its own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import (
    ORIGINAL_REPS,
    ablate,
    load_json,
    make_results,
    original_cell,
    write_original_folder,
    write_project,
)

ALL = [f"{lc}_{rep}" for lc in ("all_layers", "visual_only") for rep in ORIGINAL_REPS]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_import_a_full_grid_then_status_merge_and_an_untouched_source(tmp_path):
    src = write_original_folder(tmp_path / "results_10k" / "visual_ablation_10k")
    before = _snapshot(src)
    res = ablate("import", str(src), "-o", "imported", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"Imported 18 cell(s) from {src} into imported/visual_ablation_10k" in res.stdout
    assert _snapshot(src) == before  # only read
    exp = tmp_path / "imported" / "visual_ablation_10k"
    status = json.loads(ablate("status", "-o", "imported", "--json", cwd=tmp_path).stdout)
    assert {c["id"]: c["state"] for c in status["cells"]} == dict.fromkeys(ALL, "imported")
    assert status["counts"]["imported"] == 18 and status["done"] == 0
    plain = ablate("status", "-o", "imported", cwd=tmp_path).stdout
    assert "imported 0." in plain and "18 imported" in plain and "ETA" not in plain
    original = original_cell("spectral", "all_layers")
    results = load_json(exp / "results.json")
    cell = next(c for c in results["all_layers_results"] if c["representation"] == "spectral")
    assert cell["name"] == "spectral_all_layers"
    for key in ("test_acc_mean", "test_acc_std", "test_f1_mean", "training_time_total", "best_epoch_mean",
                "test_acc_all_runs", "val_confusion_matrices"):
        assert cell[key] == original[key], key
    for key in ("learning_curves", "per_run_results"):  # the original's entries, ablate's keys beside them
        assert all(theirs.items() <= ours.items() for theirs, ours in zip(original[key], cell[key], strict=True))
    assert cell["test_f1_macro_mean"] == original["test_f1_mean"]  # ablate's key, the original's value
    assert (results["num_all_layers"], results["num_visual_layers"]) == (128, 64)
    assert len(results["imported"]["cells"]) == 18
    checkpoint = load_json(exp / "checkpoints" / "all_layers_spectral.json")
    assert checkpoint["meta"]["provenance"] == "imported" and checkpoint["meta"]["protocol"] == "original"
    assert checkpoint["meta"]["source_sha256"] == before["checkpoints/all_layers_spectral.json"]
    md = (exp / "results.md").read_text()
    assert "Imported from the original script's output" in md and "| spectral |" in md
    assert "Imported from the original script" in (exp / "results.tex").read_text()


def test_a_truncated_file_is_reported_and_the_rest_imported_exit_1(tmp_path):
    src = write_original_folder(tmp_path / "visual_ablation_10k", truncate="all_layers_spectral")
    res = ablate("import", str(src), "-o", "imported", cwd=tmp_path)
    assert res.returncode == 1
    assert "skipped all_layers_spectral.json: unreadable JSON" in res.stderr
    assert "Imported 17 cell(s)" in res.stdout and "skipped 1 file(s)" in res.stdout
    status = json.loads(ablate("status", "-o", "imported", "--json", cwd=tmp_path).stdout)
    states = {c["id"]: c["state"] for c in status["cells"]}
    assert states["all_layers_spectral"] == "pending" and list(states.values()).count("imported") == 17
    assert status["imported"] is True and status["eta_s"] is None  # ablate runs nothing in this folder
    assert "ETA" not in ablate("status", "-o", "imported", cwd=tmp_path).stdout
    assert "Missing (not merged): all_layers_spectral" in res.stdout


def test_a_missing_cell_is_pending_and_a_folder_with_nothing_readable_is_exit_2(tmp_path):
    src = write_original_folder(tmp_path / "visual_ablation_10k", missing="visual_only_stats", with_results=False)
    res = ablate("import", str(src), "-o", "imported", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    states = {c["id"]: c["state"] for c in json.loads(
        ablate("status", "-o", "imported", "--json", cwd=tmp_path).stdout)["cells"]}
    assert states["visual_only_stats"] == "pending" and len(states) == 18

    empty = tmp_path / "broken"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "checkpoints" / "all_layers_stats.json").write_text("{not json")
    (empty / "checkpoints" / "notes.json").write_text("{}")
    none = ablate("import", str(empty), "-o", "imported2", cwd=tmp_path)
    assert none.returncode == 2 and "error: no readable cell checkpoint in" in none.stderr
    assert not (tmp_path / "imported2").exists()
    nothing = ablate("import", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert nothing.returncode == 2 and "has no checkpoints/ folder" in nothing.stderr


def test_import_never_writes_over_a_folder(tmp_path):
    src = write_original_folder(tmp_path / "out" / "visual_ablation_10k")
    into_itself = ablate("import", str(src), "-o", "out", cwd=tmp_path)
    assert into_itself.returncode == 2 and "would write into its source folder" in into_itself.stderr
    (tmp_path / "taken" / "visual_ablation_10k").mkdir(parents=True)
    (tmp_path / "taken" / "visual_ablation_10k" / "mine.txt").write_text("keep")
    taken = ablate("import", str(src), "-o", "taken", cwd=tmp_path)
    assert taken.returncode == 2 and "already exists and is not empty" in taken.stderr
    assert [p.name for p in (tmp_path / "taken" / "visual_ablation_10k").iterdir()] == ["mine.txt"]


def test_run_on_the_original_scripts_folder_stops_before_touching_it(tmp_path):
    write_project(tmp_path)
    src = write_original_folder(tmp_path / "results" / "tiny_tinydemo")  # where ablate's own folder would land
    before = _snapshot(src)
    res = ablate("run", "-c", "exp.toml", cwd=tmp_path)
    assert res.returncode == 2
    assert "holds output of the original script" in res.stderr and "ablate import" in res.stderr
    assert _snapshot(src) == before and sorted(p.name for p in src.iterdir()) == ["checkpoints", "results.json"]


def test_run_on_an_imported_experiment_is_refused_and_compare_sets_it_beside_another(tmp_path):
    write_project(tmp_path)
    src = write_original_folder(tmp_path / "old" / "visual_ablation_10k")
    assert ablate("import", str(src), "-o", "results", "--experiment", "tiny", "--dataset", "tinydemo",
                  cwd=tmp_path).returncode == 0
    res = ablate("run", "-c", "exp.toml", cwd=tmp_path)
    assert res.returncode == 2 and "holds cells imported from the original script" in res.stderr
    assert "start a fresh experiment beside it with another --output-dir" in res.stderr
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "results.json").write_text(json.dumps(make_results("tinydemo-ablate", 120)))
    cmp = ablate("compare", "results", "new/results.json", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stderr
    assert "| all_layers | spectral |" in cmp.stdout
