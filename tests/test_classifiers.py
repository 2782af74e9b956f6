"""The classifier axis: mlp, linear and scikit-learn estimators on one grid, a plugin classifier from an
installed package, and docs/plugins.md's section copied verbatim."""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import TINY_DEMO, ablate, ablate_in_process, load_json, write_project
from tests.test_plugins import REPO, _env, _section_blocks, _toml, plugin_site  # noqa: F401 (a fixture)

EXP = Path("results/tiny_tinydemo")
ESTIMATORS = ('[estimators.logreg]\nestimator = "sklearn.linear_model.LogisticRegression"\n'
              'params = {C = 1.0, max_iter = 2000}\n'
              '[estimators.knn]\nestimator = "sklearn.neighbors.KNeighborsClassifier"\nparams = {n_neighbors = 5}\n')


def _project(folder: Path, classifiers: str | None, reps: str = '["simple_stats", "stats"]') -> None:
    top = f'name = "tiny"\ndataset = "tinydemo"\nnum_runs = 2\ndevice = "cpu"\nrepresentations = {reps}\n'
    if classifiers is not None:
        top += f"classifiers = {classifiers}\n"
    write_project(folder, top=top)
    if classifiers is not None:
        (folder / "exp.toml").write_text((folder / "exp.toml").read_text() + ESTIMATORS)


def test_a_three_axis_grid_ids_results_tables_status_reset_and_the_mlp_cells_equal_the_two_axis_grid(tmp_path):
    two, three = tmp_path / "two", tmp_path / "three"
    _project(two, None)
    _project(three, '["mlp", "linear", "logreg", "knn"]')
    assert ablate_in_process("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=two).returncode == 0
    done = ablate_in_process("run", "-c", "exp.toml", cwd=three)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr

    record = load_json(three / EXP / "experiment.json")
    ids = [c["id"] for c in record["cells"]]
    assert ids == [f"{lc}_{rep}_{clf}" for lc in ("all_layers", "visual_only") for rep in ("simple_stats", "stats")
                   for clf in ("mlp", "linear", "logreg", "knn")]
    assert all(c["classifier"] == c["id"].rsplit("_", 1)[1] for c in record["cells"])
    assert [c["id"] for c in load_json(two / EXP / "experiment.json")["cells"]] == \
        ["all_layers_simple_stats", "all_layers_stats"]  # the default grid: ids without a classifier

    # the MLP cells of the three-axis grid are the two-axis grid's cells, run for run
    for rep in ("simple_stats", "stats"):
        old = load_json(two / EXP / f"checkpoints/all_layers_{rep}.json")
        new = load_json(three / EXP / f"checkpoints/all_layers_{rep}_mlp.json")
        assert [r["test_acc"] for r in new["per_run_results"]] == [r["test_acc"] for r in old["per_run_results"]]
        assert new["learning_curves"] == old["learning_curves"] and new["classifier"] == "mlp"

    linear = load_json(three / EXP / "checkpoints/all_layers_stats_linear.json")
    assert linear["hyperparameters"]["classifier"] == "linear" and "hidden_dim" not in linear["hyperparameters"]
    assert all(r["epochs_run"] >= 1 for r in linear["per_run_results"])  # the torch protocol, early stopping
    assert linear["meta"]["config"]["classifier"] == "linear" and "dropout" not in linear["meta"]["config"]
    logreg = load_json(three / EXP / "checkpoints/all_layers_stats_logreg.json")
    assert logreg["hyperparameters"]["params"] == {"C": 1.0, "max_iter": 2000}
    # lbfgs takes random_state and ignores it: identical predictions across seeds mark the cell, as for kNN
    assert logreg["deterministic"] is True and logreg["test_acc_std"] == 0.0 and logreg["test_acc_ci95"] == 0.0
    runs = load_json(three / EXP / "checkpoints/runs/all_layers_stats_logreg/run_1.json")
    assert runs["epochs_run"] == 0 and set(runs["metrics"]) >= {"train_acc", "val_acc", "test_acc", "test_f1_macro"}
    knn = load_json(three / EXP / "checkpoints/all_layers_stats_knn.json")
    assert knn["deterministic"] is True and knn["test_acc_std"] == 0.0
    assert len({(r["train_acc"], r["val_acc"], r["test_acc"], r["test_log_loss"]) for r in knn["per_run_results"]}) == 1

    md = (three / EXP / "results.md").read_text()
    assert "| representation / classifier | all_layers test acc" in md
    main = md.split("## Test accuracy")[1].split("\n\n## ")[0]  # the per-cell table
    rows = [line.split(" | ")[0].strip("| ") for line in main.splitlines() if line.startswith("| ") and " / " in line]
    assert rows[1:] == [f"{rep} / {clf}" for rep in ("simple_stats", "stats") for clf in ("mlp", "linear", "logreg",
                                                                                         "knn")]
    knn_row = next(line for line in md.splitlines() if line.startswith("| stats / knn |"))
    assert knn_row.split(" | ")[1].endswith("*") and "* deterministic" in md
    table = list(csv.DictReader(io.StringIO((three / EXP / "results.csv").read_text())))
    assert len(table) == 16 and {r["classifier"] for r in table} == {"mlp", "linear", "logreg", "knn"}
    assert {(r["cell"], r["deterministic"]) for r in table if r["classifier"] == "knn"} == \
        {(f"{lc}_{rep}_knn", "true") for lc in ("all_layers", "visual_only") for rep in ("simple_stats", "stats")}
    # the drop all_layers -> visual_only pairs cells of one (representation, classifier)
    a, b = (load_json(three / EXP / f"checkpoints/{lc}_stats_logreg.json")["test_acc_mean"]
            for lc in ("all_layers", "visual_only"))
    logreg_row = next(line for line in md.splitlines()
                      if line.startswith("| all_layers - visual_only | stats / logreg |")).split(" | ")
    assert logreg_row[2] == f"{a - b:+.4f}"
    assert "stats / logreg" in (three / EXP / "results.tex").read_text()
    assert sorted(p.name for p in (three / EXP / "plots").glob("*.png")) == [
        "accuracy_by_representation.png", "confusion_best.png", "drop_all_to_visual.png", "learning_curves_best.png",
        "per_class_f1_drop.png"]

    status = json.loads(ablate_in_process("status", "--json", cwd=three).stdout)
    assert status["representations"][:2] == ["simple_stats / mlp", "simple_stats / linear"]
    assert {c["classifier"] for c in status["cells"]} == {"mlp", "linear", "logreg", "knn"}

    bad = ablate_in_process("reset", "--classifier", "svm", cwd=three)
    assert bad.returncode == 2 and "unknown classifier 'svm' (this experiment has: mlp, linear, logreg, knn)" \
        in bad.stderr
    reset = ablate_in_process("reset", "--classifier", "linear", "--rep", "stats", "--yes", cwd=three)
    assert reset.returncode == 0, reset.stderr
    assert sorted(re.findall(r"^  (\S+): \d+ file", reset.stdout, re.M)) == \
        ["all_layers_stats_linear", "visual_only_stats_linear"]
    again = ablate_in_process("run", "-c", "exp.toml", cwd=three)
    assert again.returncode == 0 and again.stderr.count("Evaluating ") == 2, again.stderr
    assert [r["test_acc"] for r in load_json(three / EXP / "checkpoints/all_layers_stats_linear.json")[
        "per_run_results"]] == [r["test_acc"] for r in linear["per_run_results"]]


@pytest.mark.parametrize(("classifiers", "extra", "expected"), [
    ('["mlp", "svm"]', "", "unknown classifier 'svm' (allowed: mlp, linear, logreg, knn"),
    ('["mlp", "mlp"]', "", "classifiers must not repeat"),
    ('["bad"]', '[estimators.bad]\nestimator = "sklearn.linear_model.NoSuchModel"\n',
     "estimators.bad: cannot import sklearn.linear_model.NoSuchModel (AttributeError"),
    ('["bad"]', '[estimators.bad]\nestimator = "sklearn.linear_model.LogisticRegression"\nparams = {Cee = 1}\n',
     "estimators.bad: sklearn.linear_model.LogisticRegression does not take these params"),
    ('["bad"]', '[estimators.bad]\nestimator = "sklearn.svm.SVC"\n', "estimators.bad: sklearn.svm.SVC has no "
                                                                        "fit/predict_proba"),
    ('["bad"]', '[estimators.bad]\nestimator = "sklearn.linear_model.LogisticRegression"\n'
                'params = {random_state = 3}\n', "params.random_state is set by ablate"),
])
def test_a_bad_classifier_is_exit_2_with_one_line_and_nothing_written(tmp_path, classifiers, extra, expected):
    _project(tmp_path, classifiers)
    (tmp_path / "exp.toml").write_text((tmp_path / "exp.toml").read_text() + extra)
    result = ablate_in_process("run", "-c", "exp.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert not (tmp_path / "results").exists()


def test_a_classifier_plugin_from_an_installed_package(tmp_path, plugin_site):  # noqa: F811
    env = _env(plugin_site)
    listed = ablate("reps", cwd=tmp_path, env=env)
    assert re.search(r"^centroid +v1 +Nearest class centroid .*\[no randomness\]", listed.stdout, re.M), listed.stdout
    _project(tmp_path, '["centroid"]', reps='["stats"]')
    done = ablate("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    cell = load_json(tmp_path / EXP / "checkpoints/all_layers_stats_centroid.json")
    assert cell["deterministic"] is True and cell["classifier"] == "centroid" and cell["test_acc_mean"] > 1 / 3
    assert cell["meta"]["config"]["classifier_source_sha"] and cell["meta"]["config"]["classifier_version"] == 1
    plain = ablate("run", "-c", "exp.toml", cwd=tmp_path)  # the package not installed: exit 2, named
    assert plain.returncode == 2 and "unknown classifier 'centroid'" in plain.stderr


def test_the_docs_classifier_section_runs_as_written(tmp_path):
    toml = _section_blocks("## Comparing classifiers")["toml"]
    added = tomllib.loads(toml)
    config = tomllib.loads((REPO / "configs/visual_ablation.toml").read_text())
    config.update(added)
    config.update(dataset="tinydemo", representations=["stats"])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/visual_ablation.toml").write_text(_toml(config))
    (tmp_path / "configs/datasets.toml").write_text(
        "[tinydemo]\nkind = \"demo\"\n" + "".join(f"{k} = {v}\n" for k, v in TINY_DEMO.items()))
    run = ablate("run", "--num-runs", "2", "--max-epochs", "3", "--layer-configs", "visual_only", "--workers", "2",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    exp = tmp_path / "results" / f"{config['name']}_tinydemo"
    ids = [c["id"] for c in load_json(exp / "experiment.json")["cells"]]
    assert ids == [f"visual_only_stats_{clf}" for clf in added["classifiers"]]
    md = (exp / "results.md").read_text()
    assert all(f"| stats / {clf} |" in md for clf in added["classifiers"])


def test_mlflow_tags_each_run_with_its_classifier(tmp_path):
    import mlflow

    _project(tmp_path, '["linear", "knn"]', reps='["stats"]')
    done = ablate_in_process("run", "-c", "exp.toml", "--layer-configs", "visual_only", "--mlflow", "sqlite:///mlflow.db",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`ablate.kind` = 'run'")
    assert sorted((r.data.tags["ablate.cell"], r.data.tags["classifier"], r.data.tags["ablate.run"]) for r in runs) == \
        [("visual_only_stats_knn", "knn", "1"), ("visual_only_stats_knn", "knn", "2"),
         ("visual_only_stats_linear", "linear", "1"), ("visual_only_stats_linear", "linear", "2")]
    knn = next(r for r in runs if r.data.tags["classifier"] == "knn")
    k = knn.data.tags["ablate.run"]
    doc = load_json(tmp_path / EXP / f"checkpoints/runs/visual_only_stats_knn/run_{k}.json")
    assert knn.data.metrics["test_acc"] == doc["metrics"]["test_acc"] and knn.data.params["classifier"] == "knn"
