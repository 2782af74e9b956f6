"""The grid runner in-process: resume, corruption, staleness, failures, num_runs changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ablation_cli.data.demo import DemoSource
from ablation_cli.errors import ConfigError
from ablation_cli.executors.local import LocalExecutor
from ablation_cli.features import registry
from ablation_cli.orchestrator import Orchestrator
from ablation_cli.reports.merge import write_merge
from ablation_cli.store import ExperimentStore
from ablation_cli.superseded import StaleCheckpoints, restorable, restore
from ablation_cli.training import trainer
from ablation_cli.workspace import Workspace
from tests.conftest import TINY_DEMO, load_json, strip_timing, tiny_config

CELLS = ["all_layers_simple_stats", "all_layers_stats", "visual_only_simple_stats", "visual_only_stats"]


@pytest.fixture
def source() -> DemoSource:
    return DemoSource(name="tinydemo", **TINY_DEMO)


class Trained(list):
    """The real trainer, recording the seed of every run it actually trains."""

    def __call__(self, data, params, seeds, **kwargs):
        self.extend(seeds)
        return trainer.train_runs(data, params, seeds, **kwargs)


@pytest.fixture
def trained() -> Trained:
    return Trained()


def orchestrator(cfg, source, store, train_runs=None, restart_stale=False) -> Orchestrator:
    """The orchestrator as `ablate run` builds it, with the in-process executor (and its trainer)."""
    return Orchestrator(cfg, Workspace(source, cfg.split, None, cfg.device), store, LocalExecutor(train_runs),
                        restart_stale=restart_stale)


def run_grid(tmp_path: Path, source, train_runs=None, restart_stale=False, **overrides):
    store = ExperimentStore(tmp_path / "exp")
    outcome = orchestrator(tiny_config(**overrides), source, store, train_runs, restart_stale).run()
    return store, outcome


def test_full_grid_then_resume_skips_everything(tmp_path, source, trained, caplog):
    store, outcome = run_grid(tmp_path, source, trained)
    assert outcome.done == CELLS and outcome.ok
    assert len(trained) == 8  # 4 cells x 2 runs
    for cell in CELLS:
        doc = load_json(store.cell_path(cell))
        assert doc["num_runs"] == 2 and len(doc["per_run_results"]) == 2
        assert [r["seed"] for r in doc["per_run_results"]] == [42, 43]
        assert sorted(p.name for p in store.runs_dir(cell).iterdir()) == ["run_1.json", "run_2.json"]
    trained.clear()
    _, again = run_grid(tmp_path, source, trained)
    assert again.skipped == CELLS and again.done == [] and trained == []
    assert "Skipping all_layers_stats (already completed)" in caplog.text
    assert "Total progress:      4/4 (100.0%)" in caplog.text


def test_cells_match_the_researcher_layout(tmp_path, source):
    store, _ = run_grid(tmp_path, source)
    results, _ = write_merge(store)
    assert results["num_all_layers"] == 128
    assert results["num_visual_layers"] == 64 and results["num_text_layers"] == 64
    assert results["num_classes"] == 3 and results["num_runs"] == 2
    assert results["label_mapping"] == {"airplane": 0, "bird": 1, "car": 2}
    assert [r["representation"] for r in results["visual_only_results"]] == ["simple_stats", "stats"]
    cell = results["all_layers_results"][0]
    assert cell["num_layers"] == 128 and cell["feature_dim"] == 128 * 5
    assert results["visual_only_results"][1]["feature_dim"] == 64 * 7
    runs = [r["test_acc"] for r in cell["per_run_results"]]
    assert cell["test_acc_mean"] == pytest.approx(sum(runs) / 2)
    assert cell["hyperparameters"]["dropout"] == 0.2
    assert results["config"]["training"]["max_epochs"] == 8


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-schema"])
def test_bad_run_checkpoint_is_quarantined_and_recomputed(tmp_path, source, trained, caplog, damage):
    store, _ = run_grid(tmp_path, source, trained)
    reference = load_json(store.cell_path("all_layers_stats"))
    path = store.run_path("all_layers_stats", 2)
    text = path.read_text()
    bad = {"garbage": "\x00\x01 not json", "truncated": text[: len(text) // 2],
           "wrong-schema": json.dumps({"run": 2, "meta": {}})}[damage]
    path.write_text(bad)
    store.cell_path("all_layers_stats").unlink()
    trained.clear()
    _, outcome = run_grid(tmp_path, source, trained)
    assert outcome.done == ["all_layers_stats"]
    assert trained == [43]  # only run 2 retrained
    assert "is corrupt" in caplog.text and ".quarantine" in caplog.text
    (moved,) = store.quarantine_dir.iterdir()
    assert moved.read_text() == bad
    assert strip_timing(load_json(store.cell_path("all_layers_stats"))) == strip_timing(reference)


def test_corrupt_cell_checkpoint_is_rebuilt_from_its_runs(tmp_path, source, trained):
    store, _ = run_grid(tmp_path, source, trained)
    store.cell_path("visual_only_stats").write_text('{"representation": "stats"')
    trained.clear()
    _, outcome = run_grid(tmp_path, source, trained)
    assert outcome.done == ["visual_only_stats"] and trained == []
    assert load_json(store.cell_path("visual_only_stats"))["num_runs"] == 2


def _files(store: ExperimentStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.checkpoints.rglob("*.json"))}


def test_a_changed_setting_stops_before_touching_finished_cells(tmp_path, source, trained):
    store, _ = run_grid(tmp_path, source, trained)
    before, experiment = _files(store), store.experiment_file.read_bytes()
    trained.clear()
    with pytest.raises(StaleCheckpoints) as refused:
        run_grid(tmp_path, source, trained, classifier={"hidden_dim": 16, "num_hidden_layers": 2, "dropout": 0.3})
    message = str(refused.value)
    assert refused.value.exit_code == 2 and trained == []
    assert message.splitlines()[0] == (f"4 finished cell(s) and 8 finished run(s) in {store.root} were made under "
                                       "other settings; nothing was changed:")
    assert "  dropout: 0.2 -> 0.3  (4 cell(s))" in message.splitlines()
    assert f"  to resume with the recorded settings: ablate run --resume {store.root}" in message.splitlines()
    assert "--restart-stale" in message
    assert _files(store) == before and store.experiment_file.read_bytes() == experiment  # nothing touched
    assert not store.superseded_dir.exists()


def test_restart_stale_retrains_and_restore_brings_the_old_cells_back(tmp_path, source, trained, caplog):
    store, _ = run_grid(tmp_path, source, trained)
    old = load_json(store.cell_path("all_layers_stats"))
    trained.clear()
    changed = {"hidden_dim": 16, "num_hidden_layers": 2, "dropout": 0.3}
    _, outcome = run_grid(tmp_path, source, trained, restart_stale=True, classifier=changed)
    assert outcome.done == CELLS and len(trained) == 8
    assert "dropout: 0.2 -> 0.3" in caplog.text and "12 file(s) of 4 cell(s)" in caplog.text
    superseded = sorted(p.name.split(".json")[0] for p in store.superseded_dir.iterdir())
    assert len(superseded) == 12  # 4 cells + 8 runs moved aside, never deleted
    assert load_json(store.cell_path("all_layers_stats"))["hyperparameters"]["dropout"] == 0.3

    items = restorable(store, ["all_layers_stats"])
    assert [(i.cell_id, i.cell is not None, sorted(i.runs)) for i in items] == [("all_layers_stats", True, [1, 2])]
    with pytest.raises(ConfigError, match="has checkpoints now"):
        restore(store, items[0])  # nothing the user has now is overwritten
    store.delete_cell("all_layers_stats")
    assert restore(store, items[0]) == 3
    assert load_json(store.cell_path("all_layers_stats")) == old
    trained.clear()
    _, back = run_grid(tmp_path, source, trained, restart_stale=True)  # the first settings again
    assert "all_layers_stats" in back.skipped and trained == [42, 43] * 3  # the others retrain, it does not


def test_raising_num_runs_trains_only_the_new_runs(tmp_path, source, trained):
    store, _ = run_grid(tmp_path, source, trained, num_runs=3)
    three = load_json(store.cell_path("all_layers_stats"))
    trained.clear()
    _, outcome = run_grid(tmp_path, source, trained, num_runs=5)
    assert outcome.done == CELLS
    assert trained == [45, 46] * 4  # runs 4 and 5 of each cell (seeds 42 + 3, 42 + 4)
    five = load_json(store.cell_path("all_layers_stats"))
    assert five["per_run_results"][:3] == three["per_run_results"]
    assert [r["run"] for r in five["per_run_results"]] == [1, 2, 3, 4, 5]
    trained.clear()
    _, outcome = run_grid(tmp_path, source, trained, num_runs=3)  # lowering reuses runs 1-3, trains nothing
    assert trained == [] and load_json(store.cell_path("all_layers_stats"))["num_runs"] == 3


def test_failing_cell_is_isolated_recorded_and_retried(tmp_path, source, monkeypatch):
    real = registry._REGISTRY["stats"]

    def broken(x):
        raise RuntimeError("bug in stats")

    monkeypatch.setitem(registry._REGISTRY, "stats", real.__class__(**{**real.__dict__, "compute": broken}))
    store, outcome = run_grid(tmp_path, source)
    assert outcome.done == ["all_layers_simple_stats", "visual_only_simple_stats"]
    assert set(outcome.failed) == {"all_layers_stats", "visual_only_stats"}
    failure = load_json(store.failure_path("all_layers_stats"))
    assert failure["type"] == "RuntimeError" and failure["message"] == "bug in stats"
    assert "broken" in failure["traceback"]

    monkeypatch.setitem(registry._REGISTRY, "stats", real)  # the bug is fixed
    _, outcome = run_grid(tmp_path, source)
    assert outcome.done == ["all_layers_stats", "visual_only_stats"] and outcome.ok
    assert not store.failure_path("all_layers_stats").exists()


def test_fail_fast_stops_at_the_first_failure(tmp_path, source, monkeypatch):
    real = registry._REGISTRY["simple_stats"]
    monkeypatch.setitem(registry._REGISTRY, "simple_stats",
                        real.__class__(**{**real.__dict__, "compute": lambda x: 1 / 0}))
    store = ExperimentStore(tmp_path / "exp")
    outcome = orchestrator(tiny_config(), source, store).run(fail_fast=True)
    assert list(outcome.failed) == ["all_layers_simple_stats"] and outcome.done == []


def test_non_finite_features_fail_the_cell_naming_rep_and_layer(tmp_path, source, monkeypatch):
    import numpy as np

    real = registry._REGISTRY["stats"]
    monkeypatch.setitem(registry._REGISTRY, "stats", real.__class__(
        **{**real.__dict__, "compute": lambda x: np.full((x.shape[0], 7), np.nan)}))
    _, outcome = run_grid(tmp_path, source)
    msg = outcome.failed["all_layers_stats"]
    assert "representation stats: non-finite features in layer down_blocks.0" in msg


def test_runs_trained_together_give_the_same_cells_and_fingerprints(tmp_path, source, trained):
    store, _ = run_grid(tmp_path / "one", source, trained)
    training = {"max_epochs": 8, "patience": 4, "batch_size": 32, "plateau_patience": 2, "runs_in_parallel": 2}
    together, outcome = run_grid(tmp_path / "two", source, trained, training=training)
    assert outcome.done == CELLS
    for cell in CELLS:
        a, b = load_json(store.cell_path(cell)), load_json(together.cell_path(cell))
        assert strip_timing(a["per_run_results"]) == strip_timing(b["per_run_results"])
        assert a["meta"]["fingerprint"] == b["meta"]["fingerprint"]  # scheduling is not part of the result
    # and a grid checkpointed one way is complete for the other: nothing is retrained
    trained.clear()
    _, again = run_grid(tmp_path / "one", source, trained, training=training)
    assert again.skipped == CELLS and trained == []


def test_cuda_out_of_memory_halves_the_runs_trained_together(tmp_path, source):
    import torch

    real = trainer.train_runs
    calls: list[list[int]] = []

    def tight_memory(data, params, seeds, on_epoch=None, on_done=None, **kw):
        calls.append(list(seeds))
        if len(seeds) > 2:  # the first run finishes, then the GPU runs out of memory
            first = real(data, params, seeds[:1], on_done=lambda i, r: on_done(0, r))
            raise torch.OutOfMemoryError(f"CUDA out of memory (after {len(first)} run)")
        return real(data, params, seeds, on_epoch=on_epoch, on_done=on_done, **kw)

    training = {"max_epochs": 8, "patience": 4, "batch_size": 32, "plateau_patience": 2, "runs_in_parallel": 4}
    store, outcome = run_grid(tmp_path, source, tight_memory, num_runs=4, representations=["stats"],
                              layer_configs={"visual_only": {"include": ["*.attn1.*"]}}, training=training)
    assert outcome.done == ["visual_only_stats"]
    assert calls == [[42, 43, 44, 45], [43, 44], [45]]  # the finished run is kept, the rest retried in halves
    assert [r["seed"] for r in load_json(store.cell_path("visual_only_stats"))["per_run_results"]] == [42, 43, 44, 45]


def test_cuda_out_of_memory_with_one_run_fails_the_cell_naming_the_settings(tmp_path, source):
    import torch

    def no_memory(data, params, seeds, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    _, outcome = run_grid(tmp_path, source, no_memory, representations=["stats"],
                              layer_configs={"visual_only": {"include": ["*.attn1.*"]}})
    message = outcome.failed["visual_only_stats"]
    assert message.startswith("RuntimeError: CUDA out of memory on cpu training one run of visual_only_stats")
    assert "hidden_dim 16, batch_size 32" in message and "lower --batch-size or --hidden-dim" in message


def test_results_json_reads_as_the_original_scripts_did(tmp_path, source):
    """The researcher's plotting scripts: every key of the original's results.json, with its type."""
    store, _ = run_grid(tmp_path, source, num_runs=3)
    write_merge(store)
    results = json.loads(store.results_file.read_text())
    assert isinstance(results["num_runs"], int) and isinstance(results["num_classes"], int)
    assert isinstance(results["label_mapping"], dict)
    for key in ("num_all_layers", "num_visual_layers", "num_text_layers"):
        assert isinstance(results[key], int)
    for lc in ("all_layers", "visual_only"):
        for r in results[f"{lc}_results"]:
            assert r["name"] == f"{r['representation']}_{lc}"
            assert isinstance(r["num_layers"], int) and isinstance(r["feature_dim"], int)
            for metric in ("train_acc", "val_acc", "test_acc", "val_f1", "test_f1", "val_precision",
                           "test_precision", "val_recall", "test_recall", "training_time", "best_epoch"):
                assert isinstance(r[f"{metric}_mean"], float) and isinstance(r[f"{metric}_std"], float), metric
            runs = r["per_run_results"]
            assert len(runs) == 3
            assert r["test_f1_mean"] == r["test_f1_macro_mean"]
            assert r["training_time_total"] == pytest.approx(sum(p["training_time"] for p in runs))
            accs = [p["test_acc"] for p in runs]
            assert r["test_acc_all_runs"] == accs and r["test_acc_std"] == pytest.approx(float(np.std(accs)))
            assert r["best_epoch_std"] == pytest.approx(float(np.std([p["best_epoch"] for p in runs])))
            for split in ("train", "val"):
                assert r[f"{split}_acc_all_runs"] == [p[f"{split}_acc"] for p in runs]
            for p in runs:
                assert isinstance(p["run"], int) and isinstance(p["best_epoch"], int)
                assert p["feature_dim"] == r["feature_dim"]
                for key in ("train_acc", "val_acc", "test_acc", "val_f1", "test_f1", "val_precision",
                            "test_precision", "val_recall", "test_recall", "training_time"):
                    assert isinstance(p[key], float), key
            for curve, p in zip(r["learning_curves"], runs):
                assert curve["best_epoch"] == p["best_epoch"]
                assert all(isinstance(v, float) for v in curve["val_acc_history"] + curve["train_loss_history"])
                assert len(curve["val_acc_history"]) == len(curve["train_loss_history"]) >= 1
            for name in ("val_confusion_matrices", "test_confusion_matrices"):
                assert len(r[name]) == 3
                assert all(isinstance(v, int) for matrix in r[name] for row in matrix for v in row)
                assert len(r[name][0]) == results["num_classes"] == len(r[name][0][0])
    checkpoint = load_json(store.cell_path("all_layers_stats"))
    assert checkpoint["name"] == "stats_all_layers" and checkpoint["per_run_results"][0]["val_f1"] >= 0
