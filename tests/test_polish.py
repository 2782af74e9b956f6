"""What a user sees (issue #25, item 8): stale results.json in status, no ETA with nothing running,
compare's warnings about experiments that differ, plot titles and labels from the config."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from ablation_cli.durable import atomic_write_json
from ablation_cli.reports import compare, plots
from ablation_cli.reports.merge import write_merge
from ablation_cli.reports.status_view import format_status_plain
from ablation_cli.reports.terminal import status_table
from ablation_cli.status import build_status
from ablation_cli.store import ExperimentStore
from tests.conftest import ablate_in_process, make_experiment, make_results

EXP = Path("results/tiny_tinydemo")
DEAD_PID = 2**22 + 12345  # no such process


def finish(store: ExperimentStore, cid: str, accs: tuple[float, float] = (0.5, 0.7)) -> None:
    """A valid, current cell checkpoint for ``cid`` (its fingerprint from experiment.json)."""
    spec = next(s for s in store.read_experiment()["cells"] if s["id"] == cid)
    meta = {k: spec[k] for k in ("fingerprint", "config", "dataset", "code")}
    mean, std = (accs[0] + accs[1]) / 2, abs(accs[0] - accs[1]) / 2
    store.write_cell(cid, {"cell": cid, "representation": spec["representation"], "layer_config": spec["layer_config"],
                           "num_runs": 2, "per_run_results": [], "test_acc_mean": mean, "test_acc_std": std,
                           "test_f1_macro_mean": mean, "test_f1_macro_std": std, "num_layers": 128,
                           "feature_dim": 640, "duration_s": 20.0,
                           "meta": {**meta, "created_at": "2026-01-01T00:00:00+00:00"}})


def stop_heartbeat(store: ExperimentStore, cid: str = "all_layers_stats") -> None:
    """The running cell's process is gone (killed): its heartbeat names a dead pid."""
    beat = json.loads(store.progress_path(cid).read_text())
    store.progress_path(cid).write_text(json.dumps({**beat, "pid": DEAD_PID}))


# -- 1. results.json out of date ----------------------------------------------------------------------------

def test_status_after_a_reset_says_the_merged_results_are_out_of_date(tmp_path: Path):
    exp = tmp_path / EXP
    store = make_experiment(exp)
    write_merge(store, partial=True, plots=False)
    before = json.loads(ablate_in_process("status", "--json", cwd=tmp_path).stdout)
    assert before["results"] == {"path": str(EXP / "results.json"), "up_to_date": True, "reason": None,
                                 "reset": [], "invalidated": [], "finished": []}
    assert "out of date" not in ablate_in_process("status", cwd=tmp_path).stdout

    reset = ablate_in_process("reset", "--rep", "simple_stats", "--layer-config", "all_layers", "--yes", cwd=tmp_path)
    assert reset.returncode == 0, reset.stderr
    assert store.merged()  # file times alone miss it: the reset deleted a checkpoint, changed no results file
    after = json.loads(ablate_in_process("status", "--json", cwd=tmp_path).stdout)
    assert after["results"] == {"path": str(EXP / "results.json"), "up_to_date": False,
                                "reason": "1 cell reset since the merge", "reset": ["all_layers_simple_stats"],
                                "invalidated": [], "finished": []}
    text = ablate_in_process("status", cwd=tmp_path).stdout.splitlines()
    totals = next(i for i, line in enumerate(text) if line.startswith("Total:"))
    # all_layers_stats still runs (its heartbeat is this test's live pid): the merge comes at the end
    assert text[totals + 1] == ("results.json is out of date (1 cell reset since the merge): run `ablate merge` "
                                "once the grid is done")


def test_cells_finished_changed_or_reset_since_the_merge_are_counted(tmp_path: Path):
    store = make_experiment(tmp_path)
    assert build_status(store)["results"] is None  # never merged
    write_merge(store, partial=True, plots=False)
    finish(store, "all_layers_spectral")
    model = build_status(store)
    assert (model["results"]["reason"], model["results"]["finished"]) == \
        ("1 cell finished since the merge", ["all_layers_spectral"])

    finish(store, "all_layers_simple_stats", accs=(0.6, 0.7))  # trained again: other numbers, same config
    store.write_cell("visual_only_stats", {"garbage": True})  # not merged (stale): changes nothing here
    model = build_status(store)
    assert model["results"]["reason"] == "2 cells finished since the merge"
    assert model["results"]["finished"] == ["all_layers_simple_stats", "all_layers_spectral"]

    write_merge(store, partial=True, plots=False)
    assert build_status(store)["results"]["up_to_date"] is True
    store.delete_cell("all_layers_spectral")
    store.cell_path("all_layers_simple_stats").write_text("{not json")  # corrupt: no longer done
    finish(store, "visual_only_spectral")
    results = build_status(store)["results"]
    assert results["reason"] == "1 cell reset, 1 invalidated and 1 finished since the merge"
    assert (results["reset"], results["invalidated"], results["finished"]) == \
        (["all_layers_spectral"], ["all_layers_simple_stats"], ["visual_only_spectral"])


def test_a_complete_grid_merged_before_its_last_cell_asks_for_ablate_merge(tmp_path: Path):
    store = make_experiment(tmp_path)
    store.clear_heartbeat("all_layers_stats")
    store.clear_failure("visual_only_simple_stats")
    specs = store.read_experiment()["cells"]
    for spec in specs[:-1]:
        finish(store, spec["id"])
    write_merge(store, partial=True, plots=False)
    finish(store, specs[-1]["id"])
    model = build_status(store)
    line = "results.json is out of date (1 cell finished since the merge): run `ablate merge`"
    assert line in format_status_plain(model).splitlines()
    assert status_table(model).caption.splitlines()[1] == line  # the table a terminal shows
    write_merge(store, plots=False)
    assert "out of date" not in format_status_plain(build_status(store))


def test_an_unreadable_results_json_is_out_of_date(tmp_path: Path):
    store = make_experiment(tmp_path)
    store.results_file.write_text("{")
    results = build_status(store)["results"]
    assert (results["up_to_date"], results["reason"]) == (False, "results.json is unreadable (JSONDecodeError)")


# -- 2. no ETA when nothing runs ------------------------------------------------------------------------------

def test_no_eta_when_no_process_runs_the_experiment(tmp_path: Path):
    store = make_experiment(tmp_path)
    stop_heartbeat(store)
    model = build_status(store)
    assert (model["eta_s"], model["running"]) == (None, False)
    totals = next(line for line in format_status_plain(model).splitlines() if line.startswith("Total:"))
    assert totals == "Total: 1/6 cells done (16.7%), 1 failed, 1 stale, 2 interrupted; runs 4/12; not running"
    with store.lock():  # an `ablate run` holds the lock (loading features, between two cells): an ETA again
        model = build_status(store)
        assert (model["eta_s"], model["running"]) == (10.0 * 8, True)
        assert format_status_plain(model).count("; ETA 1m20s") == 1
    assert build_status(store)["eta_s"] is None  # released: its holder record is gone


def test_the_lock_holder_record_decides_whether_a_run_is_alive(tmp_path: Path):
    store = make_experiment(tmp_path)
    stop_heartbeat(store)

    def eta_with_holder(**holder: Any) -> float | None:
        atomic_write_json(store.lock_info_file, {"started_at": "2026-01-01T00:00:00+00:00", **holder})
        return build_status(store)["eta_s"]

    here = socket.gethostname()
    assert eta_with_holder(host=here, pid=os.getpid(), purpose="run") == 80.0
    assert eta_with_holder(host=here, pid=DEAD_PID, purpose="run") is None  # killed with SIGKILL: record left
    assert eta_with_holder(host=here, pid=os.getpid(), purpose="reset") is None  # a reset trains nothing
    assert eta_with_holder(host="elsewhere", pid=1, purpose="run") == 80.0  # just written: taken as alive
    old = time.time() - 3600
    os.utime(store.lock_info_file, (old, old))
    assert build_status(store)["eta_s"] is None  # another host's record an hour old, no fresh heartbeat


def test_a_queued_slurm_task_counts_as_running_and_a_finished_grid_keeps_eta_zero(tmp_path: Path):
    store = make_experiment(tmp_path)
    stop_heartbeat(store)
    queued = {"visual_only_spectral": {"job": "12_5", "state": "PENDING", "live": True}}
    assert build_status(store, queued)["eta_s"] == 80.0
    ended = {"visual_only_spectral": {"job": "12_5", "state": "ENDED", "live": False}}
    assert build_status(store, ended)["eta_s"] is None
    store.clear_failure("visual_only_simple_stats")
    for spec in store.read_experiment()["cells"]:
        finish(store, spec["id"])
    model = build_status(store)
    assert (model["eta_s"], model["running"]) == (0.0, False)  # nothing left to wait for


def test_status_json_of_a_killed_run_has_no_eta(tmp_path: Path):
    store = make_experiment(tmp_path / EXP)
    stop_heartbeat(store)
    model = json.loads(ablate_in_process("status", "--json", cwd=tmp_path).stdout)
    assert model["eta_s"] is None
    assert model["running"] is False
    assert "ETA" not in ablate_in_process("status", cwd=tmp_path).stdout


# -- 3. compare warns when the experiments differ beyond their data ------------------------------------------

def configured(dataset: str, n: int, scale: float = 1.0, **sections: dict[str, Any]) -> dict[str, Any]:
    """A results.json (make_results) whose config has the resolved sections of a real experiment."""
    results = make_results(dataset, n, scale)
    base = {"classifier": {"hidden_dim": 512, "num_hidden_layers": 3, "dropout": 0.5},
            "training": {"lr": 0.001, "weight_decay": 0.0001, "batch_size": 64, "max_epochs": 300, "patience": 15,
                         "runs_in_parallel": 0, "amp": "off"},
            "split": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 42, "stratify": True, "method": "stratified",
                      "resample": False}}
    for name, changes in sections.items():
        base[name] = {**base[name], **changes}
    results["config"].update(base)
    return results


def test_compare_names_differing_hyperparameters_classes_and_split():
    small = configured("1k", 1000)
    large = configured("10k", 9170, 1.1, training={"lr": 0.0005, "runs_in_parallel": 4},
                       classifier={"dropout": 0.3}, split={"method": "original"})
    large["num_classes"] = 4
    large["label_mapping"] = {"airplane": 0, "bird": 1, "dog": 2, "cat": 3}
    assert compare.compare_warnings([large, small]) == [
        "hyperparameters differ from 1k (n=1000) to 10k (n=9170): classifier.dropout: 0.5 -> 0.3; "
        "training.lr: 0.001 -> 0.0005",
        "classes differ from 1k (n=1000) to 10k (n=9170): num_classes: 3 -> 4; label_mapping: cat: 2 -> 3, "
        "dog: (none) -> 2",
        "split differs from 1k (n=1000) to 10k (n=9170): split.method: stratified -> original",
    ]
    md = compare.format_compare_md([small, large]).splitlines()
    at = md.index("Warning: these experiments differ in more than their dataset, so a change is not the dataset's "
                  "alone:")
    assert md[at + 1:] == [f"- {w}" for w in compare.compare_warnings([small, large])]


def test_compare_of_alike_experiments_warns_of_nothing():
    small, large = configured("1k", 1000), configured("10k", 9170, training={"runs_in_parallel": 8})
    assert compare.compare_warnings([small, large]) == []  # scheduling only: the same numbers
    assert "Warning" not in compare.format_compare_md([small, large])
    bare = make_results("orig", 500)  # no resolved config (the original script's): classes only
    del bare["label_mapping"]
    assert compare.compare_warnings([bare, large]) == []


def test_compare_on_the_command_line_warns_about_real_result_files(tmp_path: Path):
    fewer_epochs = configured("demo", 1000, training={"max_epochs": 50})
    for name, results in (("a", configured("demo", 1000)), ("b", fewer_epochs)):
        (tmp_path / name).mkdir()
        results["experiment"] = f"exp_{name}"
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    out = ablate_in_process("compare", "a/results.json", "b/results.json", "--out", "cmp", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = ("- hyperparameters differ from exp_a on demo (n=1000) to exp_b on demo (n=1000): "
            "training.max_epochs: 300 -> 50")
    assert line in out.stdout.splitlines()
    assert line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert f"warning: {line[2:]}" in out.stderr.splitlines()  # also on stderr, where a script sees it


# -- 4. plots: titles and labels from the config ---------------------------------------------------------------

def renamed(results: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The same results under other layer-config names (as a config naming them so would merge)."""
    results["config"]["layer_configs"] = {names[lc]: {} for lc in results["config"]["layer_configs"]}
    for old, new in names.items():
        results[f"{new}_results"] = [{**c, "layer_config": new, "cell": f"{new}_{c['representation']}"}
                                     for c in results.pop(f"{old}_results")]
    return results


def drawn(monkeypatch: pytest.MonkeyPatch, module: Any, plot: Any, *args: Any) -> dict[str, Any]:
    """The figures a plot function draws, by file name, instead of writing them."""
    figures: dict[str, Any] = {}

    def keep(fig: Any, folder: Path, name: str) -> list[Path]:
        figures[name] = fig
        return []

    monkeypatch.setattr(module, "save_figure", keep)
    plot(*args)
    return figures


def texts(fig: Any) -> list[tuple[str, str, str]]:
    """Each axes' (title, x label, y label) with text, the colorbar's too."""
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes
            if ax.get_title() or ax.get_xlabel() or ax.get_ylabel()]


def test_plots_take_their_titles_and_labels_from_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import matplotlib.pyplot as plt

    results = renamed(make_results(), {"all_layers": "everything", "visual_only": "selfattn"})
    figs = drawn(monkeypatch, plots, plots.write_all, results, tmp_path)
    assert sorted(figs) == ["accuracy_by_representation", "confusion_best", "drop_everything_to_selfattn",
                            "learning_curves_best", "per_class_f1_everything_to_selfattn"]
    bars = figs["accuracy_by_representation"]
    assert texts(bars) == [("visual_ablation on 10k: test accuracy by layer config (3 runs per cell)",
                            "Representation", "Test accuracy (mean; 95% CI over\nruns)")]
    legend = bars.axes[0].get_legend()
    assert legend.get_title().get_text() == "Layer config"
    assert [t.get_text() for t in legend.get_texts()] == ["chance (1/classes)", "everything", "selfattn"]
    assert texts(figs["drop_everything_to_selfattn"]) == [
        ("everything -> selfattn: test accuracy drop (bar labels: drop relative to everything)", "Representation",
         "Test accuracy drop (points)\neverything minus selfattn")]
    drop_ax = figs["drop_everything_to_selfattn"].axes[0]
    ensemble = drop_ax.patches[2].get_height()  # in points: 0.62 - 0.3633 of accuracy
    assert ensemble == pytest.approx(100 * (0.62 - (0.36 + 0.37 + 0.36) / 3))
    assert texts(figs["per_class_f1_everything_to_selfattn"]) == [
        ("everything -> selfattn: test F1 per class, ensemble (best on validation in everything)", "Class",
         "Test F1 per class (mean over runs)")]
    assert [t.get_text() for t in figs["per_class_f1_everything_to_selfattn"].axes[0].get_xticklabels()] == \
        ["airplane", "bird", "cat"]  # the classes of label_mapping, in its order
    assert texts(figs["learning_curves_best"]) == [
        ("everything: ensemble (best on validation)", "", "Validation accuracy"),
        ("selfattn: ensemble (best on validation)", "", "Validation accuracy"),
        ("", "Epoch", "Training loss (cross-entropy)"), ("", "Epoch", "Training loss (cross-entropy)")]
    assert texts(figs["confusion_best"]) == [
        ("everything: ensemble (best on validation)", "Predicted class (test set)", "True class"),
        ("selfattn: ensemble (best on validation)", "Predicted class (test set)", ""),
        ("", "", "Fraction of true class (mean over runs)")]
    every = " ".join(t for fig in figs.values() for triple in texts(fig) for t in triple)
    assert "all_layers" not in every and "visual_only" not in every  # the default names: not this config's
    for fig in figs.values():
        plt.close(fig)


def test_accuracy_bars_ci_stays_within_zero_and_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import matplotlib.pyplot as plt

    results = make_results()
    near_one = results["all_layers_results"][2]
    near_one.update(test_acc_mean=0.98, test_acc_ci95=0.05)  # a t-interval past 1
    near_zero = results["visual_only_results"][0]
    near_zero.update(test_acc_mean=0.01, test_acc_ci95=0.05)  # and below 0
    fig = drawn(monkeypatch, plots, plots.accuracy_bars, results, tmp_path)["accuracy_by_representation"]
    bars = [c for c in fig.axes[0].containers if hasattr(c, "has_yerr") and c.has_yerr]
    ends = [y for c in bars for seg in c.lines[2][0].get_segments() for y in seg[:, 1]]
    assert min(ends) == pytest.approx(0.0) and max(ends) == pytest.approx(1.0)
    assert min(ends) >= 0.0 and max(ends) <= 1.0
    plt.close(fig)


def test_the_comparison_plot_is_titled_by_its_datasets_and_layer_configs(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path):
    import matplotlib.pyplot as plt

    names = {"all_layers": "everything", "visual_only": "selfattn"}
    small, large = renamed(make_results("1k", 1000), names), renamed(make_results("10k", 9170, 1.1), names)
    fig = drawn(monkeypatch, compare, compare.compare_plot, [large, small], tmp_path)["comparison"]
    assert fig.get_suptitle() == "Test accuracy by dataset: 1k -> 10k"
    assert texts(fig) == [("everything", "Dataset (number of LoRAs, log scale)", "Test accuracy (mean over runs)"),
                          ("selfattn", "Dataset (number of LoRAs, log scale)", "")]
    assert fig.axes[-1].get_legend().get_title().get_text() == "Representation"
    plt.close(fig)
