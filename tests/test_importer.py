"""`ablate import`: the original script's output folder becomes an ablate experiment; `run` never
mistakes the original's files for its own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ablation_cli.original import METRIC_ALIASES
from tests.conftest import (
    ORIGINAL_REPS,
    load_json,
    make_results,
    original_cell,
    write_original_folder,
    write_project,
)
from tests.conftest import (
    ablate_in_process as ablate,
)

ALL = [f"{lc}_{rep}" for lc in ("all_layers", "visual_only") for rep in ORIGINAL_REPS]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tree(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder``, folders and links too, with each file's sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _edit_cells(src: Path, edit, only: str | None = None) -> dict[str, dict]:
    """Rewrite the original's cell files in ``src`` through ``edit`` (all, or ``only`` one); the new docs by id."""
    docs = {}
    for path in sorted((src / "checkpoints").glob("*.json")):
        if only is None or path.stem == only:
            doc = json.loads(path.read_text())
            edit(doc)
            path.write_text(json.dumps(doc, indent=2))
        docs[path.stem] = json.loads(path.read_text())
    return docs


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
    assert into_itself.returncode == 2 and f"{src} lies inside --output-dir out" in into_itself.stderr
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


def test_an_output_dir_inside_the_source_or_holding_it_is_refused_and_nothing_is_written(tmp_path):
    src = write_original_folder(tmp_path / "old" / "results_10k" / "visual_ablation_10k")
    (tmp_path / "link").symlink_to(src, target_is_directory=True)  # the source under another name
    (tmp_path / "alias").symlink_to(tmp_path / "old", target_is_directory=True)
    before = _tree(tmp_path)
    cases = [
        (src, src),  # the issue's `ablate import SRC --output-dir SRC`
        (src, tmp_path / "link" / "new"),  # inside the source once the link is resolved
        (tmp_path / "alias" / "results_10k" / "visual_ablation_10k", tmp_path / "old"),  # the source inside it
    ]
    for source, out in cases:
        res = ablate("import", str(source), "--output-dir", str(out), cwd=tmp_path)
        assert res.returncode == 2, (source, out, res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
        assert str(source) in res.stderr and str(out) in res.stderr and "nothing was written" in res.stderr
        assert _tree(tmp_path) == before, (source, out)  # the source byte for byte, and no new folder anywhere
    assert "(resolved: " in res.stderr and str(src) in res.stderr


def test_a_cell_with_fewer_runs_than_num_runs_is_named_not_imported_and_exit_1(tmp_path):
    src = write_original_folder(tmp_path / "visual_ablation_10k")  # results.json: num_runs = 3
    _edit_cells(src, lambda d: d.update(per_run_results=d["per_run_results"][:2]), only="visual_only_stats")
    res = ablate("import", str(src), "-o", "imported", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "skipped visual_only_stats.json: cell visual_only_stats has 2 run(s), expected 3" in res.stderr
    assert "Imported 17 cell(s)" in res.stdout and "skipped 1 file(s)" in res.stdout
    exp = tmp_path / "imported" / "visual_ablation_10k"
    assert not (exp / "checkpoints" / "visual_only_stats.json").exists()
    results = load_json(exp / "results.json")
    assert results["num_runs"] == 3 and "visual_only_stats" not in results["imported"]["cells"]
    assert len(results["imported"]["cells"]) == 17 and results["missing"] == ["visual_only_stats"]

    # without results.json: the run count of most cells is the expected one
    bare = write_original_folder(tmp_path / "bare" / "visual_ablation_10k", with_results=False)
    _edit_cells(bare, lambda d: d.update(per_run_results=d["per_run_results"][:1]), only="all_layers_spectral")
    res = ablate("import", str(bare), "-o", "imported_bare", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "skipped all_layers_spectral.json: cell all_layers_spectral has 1 run(s), expected 3" in res.stderr
    assert "Imported 17 cell(s)" in res.stdout


def test_a_std_the_original_did_not_write_is_not_made_up(tmp_path):
    src = write_original_folder(tmp_path / "visual_ablation_10k")
    gone = ("val_f1_std", "test_precision_std", "val_recall_std", "training_time_std", "best_epoch_std")
    originals = _edit_cells(src, lambda d: [d.pop(k) for k in gone])
    res = ablate("import", str(src), "-o", "imported", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    exp = tmp_path / "imported" / "visual_ablation_10k"
    merged = load_json(exp / "results.json")
    by_id = {f"{c['layer_config']}_{c['representation']}": c for lc in ("all_layers", "visual_only")
             for c in merged[f"{lc}_results"]}
    assert sorted(by_id) == sorted(originals)
    for cid, orig in originals.items():
        # a std is the original's own, or ablate's name for one the original wrote
        allowed = set(orig) | {f"{ours}_std" for alias, ours in METRIC_ALIASES.items() if f"{alias}_std" in orig}
        for doc in (load_json(exp / "checkpoints" / f"{cid}.json"), by_id[cid]):
            assert {k for k in doc if k.endswith("_std")} <= allowed, cid
            assert not {k for k in doc if k.endswith("_std")} & {*gone, "val_f1_macro_std", "test_precision_macro_std"}
            assert doc["val_f1_mean"] == orig["val_f1_mean"] and doc["test_f1_std"] == orig["test_f1_std"]
            assert doc["test_f1_macro_std"] == orig["test_f1_std"]  # a std the original wrote, under ablate's name
    header = (exp / "results.csv").read_text().splitlines()[0].split(",")
    assert "val_f1_std" not in header and "val_f1_macro_std" not in header and "test_acc_std" in header

    # test F1's std missing: imported with its mean, and no std under either name (not a std of 0)
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    cell = originals["all_layers_stats"]
    del cell["test_f1_std"]
    (one / "checkpoints" / "all_layers_stats.json").write_text(json.dumps(cell))
    res = ablate("import", str(one), "-o", "imported_one", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = load_json(tmp_path / "imported_one" / "visual_ablation_one" / "checkpoints" / "all_layers_stats.json")
    assert doc["test_f1_macro_mean"] == cell["test_f1_mean"]
    assert "test_f1_std" not in doc and "test_f1_macro_std" not in doc
    # a cell without test F1 at all is partial: the tables need it
    del cell["test_f1_mean"]
    (one / "checkpoints" / "all_layers_stats.json").write_text(json.dumps(cell))
    res = ablate("import", str(one), "-o", "imported_two", cwd=tmp_path)
    assert res.returncode == 2 and "all_layers_stats.json: partial cell (missing test_f1_mean)" in res.stderr
    assert not (tmp_path / "imported_two").exists()
