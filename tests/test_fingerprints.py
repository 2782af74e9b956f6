"""A cell's fingerprint holds everything that decides its numbers: the dataset's row options, a composite's
parts, every config field (or a declared reason why not); and cell ids never collide."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import shutil
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from ablation_cli.config import ExperimentConfig, dataset_source
from ablation_cli.data.demo import DemoSource
from ablation_cli.data.folders import FolderSource
from ablation_cli.data.hf import HFDatasetSource
from ablation_cli.data.table import DatasetInfo
from ablation_cli.errors import ConfigError
from ablation_cli.executors.local import LocalExecutor
from ablation_cli.features import registry
from ablation_cli.features.cache import FeatureCache, dataset_key
from ablation_cli.grid import NOT_IN_FINGERPRINT, cell_fingerprint, expand
from ablation_cli.orchestrator import Orchestrator
from ablation_cli.store import ExperimentStore
from ablation_cli.superseded import StaleCheckpoints
from ablation_cli.training import trainer
from ablation_cli.workspace import Workspace
from tests.conftest import TINY_DEMO, load_json, tiny_config, write_project
from tests.conftest import ablate_in_process as ablate
from tests.lora_files import write_hf_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"


def _digests(cfg: ExperimentConfig, info: DatasetInfo) -> dict[str, str]:
    return {c.id: c.fingerprint.digest for c in expand(cfg, info)}


def _data_part(info: DatasetInfo) -> dict[str, Any]:
    return dict(cell_fingerprint(tiny_config(), info, "all_layers", "stats", info.layers).dataset)


# -- 1. the options that change rows or labels ------------------------------------------------------------

# Digests of cells as ablate computed them before row options were fingerprinted: options at their
# defaults must keep them (demo: its parameters; hf: the Arrow fingerprint saved in the fixture's state.json).
GOLDEN = {
    ("demo", "all_layers_simple_stats"): "afe9bf387a7cbebe",
    ("demo", "all_layers_stats"): "02db97c54bd44b96",
    ("hf", "all_layers_simple_stats"): "29fb96ada51a5cd4",
    ("hf", "all_layers_stats"): "8ab68bff8265cb65",
    ("demo", "all_layers_ensemble"): "a5c906218124a327",  # a composite at its parts' versions: as before
}


def test_options_at_their_defaults_keep_the_fingerprints_and_cache_keys_of_before():
    cfg = tiny_config(layer_configs={"all_layers": {"include": ["*"]}})
    ensemble = tiny_config(representations=["ensemble"], layer_configs={"all_layers": {"include": ["*"]}})
    assert _digests(ensemble, DemoSource(name="tinydemo", **TINY_DEMO).describe()) == \
        {"all_layers_ensemble": GOLDEN["demo", "all_layers_ensemble"]}
    sources = {"demo": DemoSource(name="tinydemo", **TINY_DEMO),
               "hf": HFDatasetSource(FIXTURES / "hf_dataset", label_field="category_label", split="train")}
    for name, source in sources.items():
        info = source.describe()
        assert info.options == {}
        assert set(_data_part(info)) == {"dataset", "dataset_fingerprint", "num_samples"}
        for cell_id, digest in _digests(cfg, info).items():
            assert GOLDEN[name, cell_id] == digest, (name, cell_id)
        assert "part_versions" not in expand(ensemble, info)[0].fingerprint.code
    assert dataset_key(sources["demo"].describe()) == "ac4a6d69bf6d3a593256"
    assert dataset_key(sources["hf"].describe()) == "80eb59a496c4a06e2746"


def _folder(tmp_path: Path, **options: Any) -> FolderSource:
    root = tmp_path / "kohya"
    if not root.exists():
        shutil.copytree(FIXTURES / "kohya", root)  # copy2: the same mtimes, so the same fingerprint
    return FolderSource(root, **options)


ROW_OPTIONS = {  # source, option -> changed value, and the key that names it in the data part
    "hf label_field": ("hf", {"label_field": "category_name"}, "label_field"),
    "hf split": ("hf", {"split": "test"}, "split"),
    "hf drop_nonfinite": ("hf", {"drop_nonfinite": True}, "drop_nonfinite"),
    "folder on_mismatch": ("folder", {"on_mismatch": "skip"}, "on_mismatch"),
    "folder drop_nonfinite": ("folder", {"drop_nonfinite": True}, "drop_nonfinite"),
}


@pytest.mark.parametrize("case", list(ROW_OPTIONS))
def test_each_row_option_not_at_its_default_is_in_the_data_part_and_the_cache_key(tmp_path, case):
    kind, options, key = ROW_OPTIONS[case]

    def source(**opts: Any) -> Any:
        return HFDatasetSource(FIXTURES / "hf_dataset", **opts) if kind == "hf" else _folder(tmp_path, **opts)

    default, changed = source().describe(), source(**options).describe()
    assert _data_part(changed) == {**_data_part(default), key: options[key]}
    assert _digests(tiny_config(), changed) != _digests(tiny_config(), default)
    assert dataset_key(changed) != dataset_key(default)


def test_a_labels_file_edit_makes_the_folders_cells_stale(tmp_path):
    """Every sample's label is hashed into a folder's fingerprint: no separate digest of the labels file (which
    would have made every labelled folder's cells stale), yet an edit that changes a label is seen."""
    source = _folder(tmp_path)
    before = source.describe()
    labels = tmp_path / "kohya" / "labels.csv"
    labels.write_text(labels.read_text() + "not-a-sample.safetensors,dog\n")  # no sample's label changes
    assert _folder(tmp_path).describe().fingerprint == before.fingerprint
    labels.write_text(labels.read_text().replace("lora-00.safetensors,airplane", "lora-00.safetensors,bird"))
    after = _folder(tmp_path).describe()
    assert _data_part(after)["dataset_fingerprint"] != _data_part(before)["dataset_fingerprint"]
    assert dataset_key(after) != dataset_key(before)


def test_drop_nonfinite_is_in_the_feature_cache_key():
    info = DatasetInfo(name="d", kind="folder:flat", fingerprint="f", layers=("a",),
                       details={"label_field": "category_label", "on_mismatch": "error", "drop_nonfinite": False})
    dropping = dataclasses.replace(info, details={**info.details, "drop_nonfinite": True})
    assert dataset_key(dropping) != dataset_key(info)


# -- 1, end to end: a Hugging Face dataset read with another label column -------------------------------

def _hf_dataset(root: Path) -> Path:
    """The tiny demo as a ``save_to_disk`` folder, one column per LoRA tensor, and two label columns:
    ``category_label`` and ``other_label``, a permutation of it over the rows."""
    table = DemoSource(name="tinydemo", num_samples=60, num_classes=3, seed=7).load()
    names = np.array(table.label_names)[table.labels]
    return write_hf_dataset(table, root, {"other_label": np.random.default_rng(5).permutation(names).tolist()})


class Trained(list):
    """The real trainer, recording the seed of every run it trains."""

    def __call__(self, data, params, seeds, **kwargs):
        self.extend(seeds)
        return trainer.train_runs(data, params, seeds, **kwargs)


def _run(tmp_path: Path, hf: Path, label_field: str, trained: Trained, restart_stale: bool = False):
    """``ablate run --dataset <hf> --label-field <label_field>``, in process: the source built from the options
    as the CLI passes them, the feature cache shared between runs, the cells trained here."""
    cfg = tiny_config(dataset=str(hf), representations=["simple_stats"], num_runs=1,
                      layer_configs={"all_layers": {"include": ["*"]}},
                      training={"max_epochs": 4, "patience": 2, "batch_size": 16, "plateau_patience": 1})
    options = {"layout": None, "labels": None, "label_field": label_field, "on_mismatch": None,
               "drop_nonfinite": None}
    cache = tmp_path / "cache"
    source = dataset_source(cfg, None, options, cache)
    store = ExperimentStore(tmp_path / "exp")
    workspace = Workspace(source, cfg.split, FeatureCache.under(cache), cfg.device)
    outcome = Orchestrator(cfg, workspace, store, LocalExecutor(trained), restart_stale=restart_stale).run()
    return outcome, load_json(store.cell_path("all_layers_simple_stats"))


def test_another_label_field_on_a_hf_dataset_retrains_the_cells(tmp_path, caplog):
    hf = _hf_dataset(tmp_path / "hf")
    trained = Trained()
    first, cell = _run(tmp_path, hf, "category_label", trained)
    assert first.done == ["all_layers_simple_stats"] and trained == [42]
    trained.clear()
    caplog.clear()
    with pytest.raises(StaleCheckpoints, match=r"label_field: \(none\) -> other_label  \(1 cell\(s\)\)"):
        _run(tmp_path, hf, "other_label", trained)  # a plain run stops: nothing retrained, nothing moved
    assert trained == []
    second, relabelled = _run(tmp_path, hf, "other_label", trained, restart_stale=True)
    assert "Nothing to do" not in caplog.text
    assert "all_layers_simple_stats.json was made under another configuration (label_field: (none) -> " \
           "other_label)" in caplog.text
    assert second.done == ["all_layers_simple_stats"] and trained == [42]  # retrained
    assert relabelled["meta"]["dataset"]["label_field"] == "other_label"
    assert relabelled["per_run_results"][0]["test_acc"] != cell["per_run_results"][0]["test_acc"]  # new numbers
    trained.clear()
    caplog.clear()
    third, _ = _run(tmp_path, hf, "other_label", trained)
    assert third.skipped == ["all_layers_simple_stats"] and trained == []  # and now it converges
    assert "Nothing to do: all 1 cells are complete." in caplog.text


# -- 2. composites: a part's version is the composite's too ---------------------------------------------

def test_bumping_a_part_makes_the_composites_cells_and_cache_entries_stale(tmp_path, monkeypatch):
    source = DemoSource(name="small", num_samples=12, num_classes=3, seed=1)
    info = source.describe()
    cfg = tiny_config(representations=["ensemble", "stats"], layer_configs={"all_layers": {"include": ["*"]}})
    before = _digests(cfg, info)
    cache = FeatureCache(tmp_path / "features")
    Workspace(source, cfg.split, cache).prepare(["ensemble"])  # stored as its parts' entries
    assert Workspace(source, cfg.split, cache).cache_bytes_to_write(["ensemble"]) == 0
    spectral = registry.get("spectral")
    monkeypatch.setitem(registry._REGISTRY, "spectral", dataclasses.replace(spectral, version=spectral.version + 1))
    after = _digests(cfg, info)
    assert after["all_layers_ensemble"] != before["all_layers_ensemble"]
    assert after["all_layers_stats"] == before["all_layers_stats"]  # not a composite: as it was
    code = expand(cfg, info)[0].fingerprint.code
    assert code["part_versions"] == {"spectral": spectral.version + 1, "matrix_norms": 1, "distribution": 1,
                                     "frequency": 1, "info_theoretic": 2}
    assert Workspace(source, cfg.split, cache).cache_bytes_to_write(["ensemble"]) > 0  # the bumped part: a miss


# -- 4. cell ids never collide --------------------------------------------------------------------------

def test_two_pairs_making_one_cell_id_is_exit_2_naming_both_before_anything_is_written(tmp_path):
    write_project(tmp_path)
    config = tmp_path / "exp.toml"
    text = config.read_text().replace('[layer_configs.visual_only]\ninclude = ["*.attn1.*"]\n',
                                      '[layer_configs.all_layers_simple]\ninclude = ["*.attn1.*"]\n')
    config.write_text(text)
    result = ablate("run", "-c", "exp.toml", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cell id 'all_layers_simple_stats' is made by both all_layers x simple_stats and "
                      "all_layers_simple x stats; rename a layer config"], result.stderr
    assert not (tmp_path / "results").exists()  # checked before the folder, its lock or its log
    assert not list((tmp_path / "cache").glob("features/*/*.npy"))


def test_colliding_ids_across_the_classifier_axis_name_the_triples(monkeypatch):
    info = DemoSource(num_samples=30, num_classes=3).describe()
    cfg = tiny_config(layer_configs={"all": {"include": ["*"]}, "all_delta": {"include": ["*"]}},
                      representations=["spectral", "delta_spectral"], classifiers=["mlp", "linear"])
    with pytest.raises(ConfigError, match=r"^cell id 'all_delta_spectral_mlp' is made by both all x delta_spectral "
                                          r"x mlp and all_delta x spectral x mlp; rename a layer config$"):
        expand(cfg, info)
    # within one layer config: a representation and a classifier whose names run together
    monkeypatch.setitem(registry._REGISTRY, "stats_lr", dataclasses.replace(registry.get("stats"), name="stats_lr"))
    lr = {"estimator": "sklearn.linear_model.LogisticRegression"}
    cfg = tiny_config(layer_configs={"all": {"include": ["*"]}}, representations=["stats", "stats_lr"],
                      estimators={"lr_x": lr, "x": lr}, classifiers=["lr_x", "x"])
    with pytest.raises(ConfigError, match=r"^cell id 'all_stats_lr_x' is made by both all x stats x lr_x and "
                                          r"all x stats_lr x x; rename a representation or classifier$"):
        expand(cfg, info)
    assert len(expand(cfg.model_copy(update={"classifiers": ["x"]}), info)) == 2  # no collision: fine


# -- 5. every config field is in the fingerprint, or declared not to decide numbers ----------------------

@dataclasses.dataclass(frozen=True)
class With:
    """A changed value that needs others changed with it to stay valid (fractions summing to one)."""

    value: Any
    also: dict[str, Any]


# One changed value per field of the schema that decides numbers ("*": the first key of a table). Every
# field must be here or in grid.NOT_IN_FINGERPRINT; a declared one may be here too (then it must change
# no cell's fingerprint). A new field: one line here (and in the fingerprint), or one line there.
CHANGED: dict[str, Any] = {
    "seed": 7,
    "classifier.hidden_dim": 32,
    "classifier.num_hidden_layers": 2,
    "classifier.dropout": 0.3,
    "training.lr": 2e-3,
    "training.weight_decay": 0.0,
    "training.batch_size": 16,
    "training.max_epochs": 50,
    "training.patience": 5,
    "training.plateau_factor": 0.25,
    "training.plateau_patience": 3,
    "training.amp": "bf16",
    "split.train": With(0.6, {"split.test": 0.3}),
    "split.val": With(0.2, {"split.test": 0.1}),
    "split.test": With(0.3, {"split.train": 0.6}),
    "split.seed": 1,
    "split.stratify": False,
    "split.method": "original",
    "split.resample": True,
    "layer_configs.*.include": ["*.attn2.*"],
    "layer_configs.*.exclude": ["mid_block.*"],
    "estimators.*.estimator": "sklearn.naive_bayes.GaussianNB",
    "estimators.*.params": {"C": 0.5},
    # declared in grid.NOT_IN_FINGERPRINT: changing them changes no cell's fingerprint
    "name": "other",
    "dataset": "elsewhere",
    "datasets_file": "other.toml",
    "num_runs": 5,
    "device": "cuda",
    "representations": ["stats"],
    "layer_configs": {"all_layers": {"include": ["*"]}},
    "classifiers": ["mlp", "lr"],
    "estimators": {"lr": {"estimator": "sklearn.linear_model.LogisticRegression"},
                   "nb": {"estimator": "sklearn.naive_bayes.GaussianNB"}},
    "training.runs_in_parallel": 2,
    "executor.slurm.partition": "gpu",
    "executor.slurm.gpus_per_task": 1,
    "tracking.mlflow": "sqlite:///mlflow.db",
    "reports.compare": [["visual_only", "all_layers"]],
    "reports.alpha": 0.01,
}

BASE: dict[str, Any] = {
    "name": "walk", "dataset": "tinydemo", "num_runs": 2, "device": "cpu",
    "representations": ["simple_stats", "stats"],
    "layer_configs": {"all_layers": {"include": ["*"]}, "visual_only": {"include": ["*.attn1.*"]}},
    "estimators": {"lr": {"estimator": "sklearn.linear_model.LogisticRegression"}},
    "classifiers": ["mlp", "linear", "lr"],  # every kind of classifier part: the MLP's, linear's, an estimator's
}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` as a dotted path, recursively; a table of models is its own path (its keys)
    and ``<table>.*.<field>`` for its models' fields."""
    paths = []
    for name, field in model.model_fields.items():
        path, annotation = prefix + name, field.annotation
        if (sub := _model_in(annotation)) is not None:
            paths += schema_paths(sub, path + ".")
            continue
        paths.append(path)
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is dict and (value := _model_in(args[1])) is not None:
            paths += schema_paths(value, path + ".*.")
        elif isinstance(annotation, types.UnionType) and (subs := [m for a in args if (m := _model_in(a))]):
            paths += [p for sub in subs for p in schema_paths(sub, path + ".")]  # an optional section
    return paths


SCHEMA_PATHS = schema_paths(ExperimentConfig)


def _declared(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in NOT_IN_FINGERPRINT)


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(next(iter(node)) if key == "*" else key, {})
    node[leaf] = value


def _changed(path: str) -> ExperimentConfig:
    data = copy.deepcopy(BASE)
    change = CHANGED[path]
    _set(data, path, change.value if isinstance(change, With) else change)
    for other, value in (change.also.items() if isinstance(change, With) else ()):
        _set(data, other, value)
    return ExperimentConfig.model_validate(data)


def test_the_walk_covers_the_schema_and_every_declaration_names_a_field():
    assert "training.weight_decay" in SCHEMA_PATHS and "layer_configs.*.include" in SCHEMA_PATHS
    assert "executor.slurm.extra" in SCHEMA_PATHS and "layer_configs" in SCHEMA_PATHS
    assert not [p for p in NOT_IN_FINGERPRINT if not any(fnmatch.fnmatchcase(s, p) for s in SCHEMA_PATHS)]
    assert not [p for p in CHANGED if p not in SCHEMA_PATHS]


@pytest.mark.parametrize("path", SCHEMA_PATHS)
def test_each_config_field_changes_the_fingerprint_unless_declared_not_to_decide_numbers(path):
    declared = _declared(path)
    assert declared or path in CHANGED, (f"config field {path} is neither fingerprinted nor declared: put it in "
                                         "grid.cell_fingerprint (and a changed value in CHANGED here), or in "
                                         "grid.NOT_IN_FINGERPRINT with why it does not decide a cell's numbers")
    if path not in CHANGED:
        return
    info = DemoSource(num_samples=30, num_classes=3).describe()
    before, after = _digests(ExperimentConfig.model_validate(BASE), info), _digests(_changed(path), info)
    common = sorted(before.keys() & after.keys())
    assert common, path
    changed = [c for c in common if before[c] != after[c]]
    if declared:
        assert changed == [], f"{path} is declared not to decide numbers, yet it changes {changed}"
    else:
        assert changed, f"changing {path} leaves every cell's fingerprint as it was"

