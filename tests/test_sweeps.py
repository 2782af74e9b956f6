"""The grid as named axes (issue 28): `[axes]` and `--sweep` over any setting a cell trains with,
`[layer_sweep]` layer configs generated from the U-Net's topology, and `ablate run --dry-run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ablation_cli.config import config_from_data
from ablation_cli.data.demo import DemoSource
from ablation_cli.grid import expand
from ablation_cli.records import axis_value_text
from tests.conftest import TINY_DEMO, ablate, ablate_in_process, load_json, strip_timing, tiny_config, write_project

AXES = '[axes]\n"training.lr" = [1e-3, 3e-3]\n"classifier.dropout" = [0.0, 0.5]\n'


def _sweep_project(folder: Path) -> Path:
    """The tiny project, mlp and linear, swept over lr (both classifiers) and dropout (the MLP's only)."""
    write_project(folder, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 2\ndevice = "cpu"\n'
                  'representations = ["simple_stats", "stats"]\nclassifiers = ["mlp", "linear"]\n')
    cfg = folder / "exp.toml"
    cfg.write_text(cfg.read_text() + AXES)
    return cfg


def _ids(cfg_data: dict) -> list[str]:
    cfg = config_from_data(cfg_data, None, "config")
    return [c.id for c in expand(cfg, DemoSource(name="tinydemo", **TINY_DEMO).describe())]


@pytest.mark.parametrize(("value", "text"), [(3e-4, "3e-4"), (1e-3, "1e-3"), (0.5, "0.5"), (0.0, "0"), (1e7, "1e7"),
                                             (0.0010000001, "0.0010000001"), (True, "true"), (64, "64"),
                                             ("bf16", "bf16"), ("a/b", "hf5effa31"), ("x" * 30, "h5c9e9024")])
def test_axis_values_are_spelled_short_exact_and_safe_in_cell_ids(value, text):
    assert axis_value_text(value) == text


def test_a_grid_without_axes_keeps_its_ids_and_fingerprints():
    cfg = tiny_config()
    info = DemoSource(name="tinydemo", **TINY_DEMO).describe()
    plain = expand(cfg, info)
    assert [c.id for c in plain] == ["all_layers_simple_stats", "all_layers_stats", "visual_only_simple_stats",
                                     "visual_only_stats"]
    swept = expand(cfg.model_copy(update={"axes": config_from_data(
        {"axes": {"training.lr": [cfg.training.lr, 3e-3]}}, None, "x").axes}), info)
    same = {c.id.removesuffix(f"__lr={axis_value_text(cfg.training.lr)}"): c.fingerprint.digest for c in swept
            if c.settings == (("training.lr", cfg.training.lr),)}
    assert same == {c.id: c.fingerprint.digest for c in plain}  # the configured value: the cell as it was


def test_an_axis_applies_only_where_it_changes_what_a_cell_trains():
    base = {"representations": ["stats"], "layer_configs": {"all_layers": {"include": ["*"]}},
            "classifiers": ["mlp", "linear"]}
    assert _ids({**base, "axes": {"training.lr": [1e-3, 3e-3], "classifier.dropout": [0.0, 0.5]}}) == [
        "all_layers_stats_mlp__lr=1e-3__dropout=0", "all_layers_stats_mlp__lr=1e-3__dropout=0.5",
        "all_layers_stats_mlp__lr=3e-3__dropout=0", "all_layers_stats_mlp__lr=3e-3__dropout=0.5",
        "all_layers_stats_linear__lr=1e-3", "all_layers_stats_linear__lr=3e-3"]  # dropout: not for linear
    limited = {"training.lr": {"values": [1e-3, 3e-3], "classifiers": ["mlp"]}}
    assert _ids({**base, "axes": limited}) == ["all_layers_stats_mlp__lr=1e-3", "all_layers_stats_mlp__lr=3e-3",
                                               "all_layers_stats_linear"]


@pytest.mark.parametrize(("sweep", "message"), [
    ("training.lrr=1e-3,3e-4", "error: exp.toml + command-line flags: axes: 'training.lrr' cannot be an axis; "
                               "allowed: seed, classifier.hidden_dim, classifier.num_hidden_layers, "
                               "classifier.dropout, training.lr"),
    ("training.lr=1e-3,-1", "axes: 'training.lr' = '-1': Input should be greater than 0"),
    ("split.seed=1,2", "axes: 'split.seed' cannot be an axis (the split is one per experiment)"),
    ("training.checkpoint_every_s=1,2", "'training.checkpoint_every_s' cannot be an axis (it does not change a "
                                        "cell's numbers)"),
    ("training.lr=1e-3,0.001", "axes: 'training.lr': values must not repeat"),
    ("training.lr", "error: --sweep training.lr: expected KEY=V1,V2, e.g. --sweep training.lr=1e-3,3e-4"),
])
def test_a_bad_sweep_is_exit_2_with_one_line_and_nothing_written(tmp_path, sweep, message):
    write_project(tmp_path)
    res = ablate_in_process("run", "-c", "exp.toml", "--sweep", sweep, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_swept_grid_survives_a_kill_computes_features_once_and_merges_every_cell(tmp_path):
    """2 layer configs x 2 representations x (mlp: 2 lr x 2 dropout; linear: 2 lr) = 24 cells, killed in the
    middle and resumed: equal to an uninterrupted run; each cell trained with its own values."""
    cfg = _sweep_project(tmp_path / "a")
    killed = ablate("run", "-c", str(cfg), "--threads", "1", cwd=cfg.parent,
                    env={"ABLATE_CRASH_AT": "write:run_*.json@20"})
    assert killed.returncode == -9, killed.stderr
    resumed = ablate_in_process("run", "-c", str(cfg), "--threads", "1", cwd=cfg.parent)
    assert resumed.returncode == 0, resumed.stderr
    whole_cfg = _sweep_project(tmp_path / "b")
    whole = ablate_in_process("run", "-c", str(whole_cfg), "--threads", "1", cwd=whole_cfg.parent)
    assert whole.returncode == 0, whole.stderr

    log = (whole_cfg.parent / "results/tiny_tinydemo/run.log").read_text()
    passes = re.findall(r"Features ([\w, ]+): 120 LoRAs in one pass", log)  # one feature pass for 24 cells
    assert len(passes) == 1 and sorted(passes[0].split(", ")) == ["simple_stats", "stats"], log
    exp = cfg.parent / "results/tiny_tinydemo"
    assert strip_timing(load_json(exp / "results.json")) == \
        strip_timing(load_json(whole_cfg.parent / "results/tiny_tinydemo/results.json"))
    cells = load_json(exp / "experiment.json")["cells"]
    assert len(cells) == 24 and len({c["fingerprint"] for c in cells}) == 24
    cell = load_json(exp / "checkpoints/visual_only_stats_mlp__lr=3e-3__dropout=0.5.json")
    assert cell["axes"] == {"training.lr": 3e-3, "classifier.dropout": 0.5}
    assert cell["hyperparameters"]["lr"] == 3e-3 and cell["hyperparameters"]["dropout"] == 0.5
    linear = load_json(exp / "checkpoints/all_layers_simple_stats_linear__lr=1e-3.json")
    assert linear["axes"] == {"training.lr": 1e-3}
    status = json.loads(ablate_in_process("status", "--json", cwd=cfg.parent).stdout)
    assert status["done"] == 24 and "stats / mlp lr=3e-3 dropout=0.5" in status["representations"]
    by = json.loads(ablate_in_process("status", "--by", "classifier.dropout", "--json", cwd=cfg.parent).stdout)["by"]
    assert [(g["value"], g["cells"], g["done"], g["runs_done"]) for g in by["groups"]] == [(0.0, 8, 8, 16),
                                                                                          (0.5, 8, 8, 16)]
    text = ablate_in_process("status", "--by", "training.lr", cwd=cfg.parent).stdout.splitlines()
    assert text[-3].startswith("training.lr  cells done  runs done")
    assert text[-2].split()[:3] == ["1e-3", "12/12", "24/24"]
    more = ablate_in_process("run", "-c", str(cfg), "--sweep", "training.lr=1e-3,3e-3,1e-2", "--dry-run",
                             cwd=cfg.parent)  # one more value: 12 more cells; what is done is counted
    assert more.returncode == 0, more.stderr
    assert "Experiment tiny on dataset tinydemo: 36 cells x 2 runs = 72 runs" in more.stdout
    assert re.search(r"^In results/tiny_tinydemo: 48 of 72 runs done; the other 24 would take about \d+ min here "
                     r"\(mean run time [\d.]+s over its 48 finished runs\) and write about [\d.]+ MB of run "
                     r"checkpoints\.$", more.stdout, re.M), more.stdout
    assert "Feature cache: holds every representation of the grid (nothing to compute)" in more.stdout
    bad = ablate_in_process("status", "--by", "training.lrr", cwd=cfg.parent)
    assert bad.returncode == 2 and "--by training.lrr: not an axis of this experiment (allowed: layer_config, " \
        "representation, classifier, training.lr, classifier.dropout)" in bad.stderr
    md = (exp / "results.md").read_text()
    assert "| stats / linear lr=3e-3 |" in md and "| stats / mlp lr=1e-3 dropout=0 |" in md
    assert "## Main effects" in md and "### training.lr" in md

    compared = ablate_in_process("compare", str(exp.parent), str(whole_cfg.parent / "results"), "--out",
                                 str(tmp_path / "cmp"), cwd=tmp_path)  # cells matched by their axis values
    assert compared.returncode == 0, compared.stderr
    table = (tmp_path / "cmp/comparison.md").read_text()
    assert table.count("| visual_only | stats / mlp lr=3e-3 dropout=0.5 |") == 1 and table.count("+0.0000 |") == 24
    pivot = ablate_in_process("merge", "--rows", "representation", "--cols", "training.lr", cwd=cfg.parent)
    assert pivot.returncode == 0, pivot.stderr
    assert (exp / "plots/pivot_representation_x_training-lr.png").stat().st_size > 0
    assert "## Pivot: representation x training.lr" in (exp / "results.md").read_text()
    results = load_json(exp / "results.json")
    pv = results["pivot"]
    assert (pv["rows"], pv["cols"], pv["cells"]) == (["simple_stats", "stats"], [1e-3, 3e-3], [[6, 6], [6, 6]])
    every = [c for lc in ("all_layers", "visual_only") for c in results[f"{lc}_results"]]
    want = [c["test_acc_mean"] for c in every if c["representation"] == "stats" and c["axes"]["training.lr"] == 3e-3]
    assert pv["mean_test_acc"][1][1] == pytest.approx(sum(want) / 6)
    bad = ablate_in_process("merge", "--rows", "representation", "--cols", "training.lrr", cwd=cfg.parent)
    assert bad.returncode == 2 and "pivot: 'training.lrr' is not an axis of this experiment" in bad.stderr
    effects = {e["axis"]: e for e in results["statistics"]["main_effects"]}
    assert list(effects) == ["layer_config", "representation", "classifier", "training.lr", "classifier.dropout"]
    docs = {c["cell"]: c for lc in ("all_layers", "visual_only") for c in results[f"{lc}_results"]}
    lr = effects["training.lr"]
    assert lr["baseline"] == 1e-3 and [v["value"] for v in lr["values"]] == [1e-3, 3e-3]
    assert [v["cells"] for v in lr["values"]] == [12, 12] and lr["values"][1]["pairs"] == 12
    low = [c for c in docs.values() if c["axes"]["training.lr"] == 1e-3]
    assert lr["values"][0]["mean_test_acc"] == pytest.approx(sum(c["test_acc_mean"] for c in low) / 12)
    pairs = [(docs[cid.replace("lr=1e-3", "lr=3e-3")]["test_acc_mean"], c["test_acc_mean"])
             for cid, c in docs.items() if c in low]
    assert lr["values"][1]["diff"] == pytest.approx(sum(a - b for a, b in pairs) / 12)
    lo, hi = lr["values"][1]["ci95"]
    assert lo <= lr["values"][1]["diff"] <= hi and 0 < lr["values"][1]["p_holm"] <= 1
    assert [v["cells"] for v in effects["classifier.dropout"]["values"]] == [8, 8]  # the MLP's cells only
    assert effects["classifier"]["values"][1]["diff"] is None  # no mlp and linear cell equal on every other axis

    reset = ablate_in_process("reset", "--where", "training.lr=0.003", "--where", "classifier.dropout=0.5",
                              "--layer-config", "visual_only", "--yes", cwd=cfg.parent)
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.splitlines()[:2] == ["  visual_only_simple_stats_mlp__lr=3e-3__dropout=0.5: 3 file(s)",
                                             "  visual_only_stats_mlp__lr=3e-3__dropout=0.5: 3 file(s)"]
    for where, error in (("training.lrr=1", "error: --where training.lrr=1: 'training.lrr' is not an axis of this "
                                            "experiment (its axes: training.lr, classifier.dropout)"),
                         ("training.lr=5", "error: --where training.lr=5: no cell has that value "
                                           "(values: 1e-3, 3e-3)")):
        bad = ablate_in_process("reset", "--where", where, "--yes", cwd=cfg.parent)
        assert bad.returncode == 2 and bad.stderr.strip() == error, bad.stderr


def test_layer_sweeps_follow_the_unet_topology_and_dry_run_writes_nothing(tmp_path):
    write_project(tmp_path)
    counts = {}
    for by, mode in (("block", "alone"), ("transformer", "alone"), ("attention", "alone"), ("module", "alone"),
                     ("factor", "alone"), ("block", "without")):
        cfg = tmp_path / "exp.toml"
        text = re.sub(r"\[layer_sweep\][^\[]*", "", cfg.read_text())
        cfg.write_text(text + f'[layer_sweep]\nby = "{by}"\nmode = "{mode}"\n')
        res = ablate_in_process("run", "-c", "exp.toml", "--dry-run", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        listed = re.findall(r"^  ((?:only|without)_\S+)\s+(\d+) layers$", res.stdout, re.M)
        counts[(by, mode)] = [int(n) for _, n in listed]
        if (by, mode) == ("block", "alone"):
            assert [name for name, _ in listed] == ["only_down0", "only_down1", "only_down2", "only_mid", "only_up1",
                                                   "only_up2", "only_up3"]
            assert "Experiment tiny on dataset tinydemo: 18 cells x 2 runs = 36 runs" in res.stdout
            assert re.search(r"^  all_layers +128 layers$", res.stdout, re.M), res.stdout
            assert "Nothing was run or written (--dry-run)." in res.stdout
            assert re.search(r"^Feature cache: about [\d.]+ MB to write$", res.stdout, re.M), res.stdout
    assert counts[("block", "alone")] == [16, 16, 16, 8, 24, 24, 24]
    assert [len(counts[(by, "alone")]) for by in ("transformer", "attention", "module", "factor")] == [16, 32, 64, 128]
    assert set(counts[("factor", "alone")]) == {1} and set(counts[("module", "alone")]) == {2}
    assert counts[("block", "without")] == [128 - n for n in counts[("block", "alone")]]
    assert not (tmp_path / "results").exists() and not (tmp_path / ".feature_cache").exists()


def test_a_layer_sweep_name_taken_by_a_layer_config_is_exit_2(tmp_path):
    cfg = write_project(tmp_path)
    cfg.write_text(cfg.read_text() + '[layer_configs.only_mid]\ninclude = ["mid_block.*"]\n'
                   '[layer_sweep]\nby = "block"\n')
    res = ablate_in_process("run", "-c", "exp.toml", "--dry-run", cwd=tmp_path)
    assert res.returncode == 2
    assert "layer_sweep: only_mid is also a name in [layer_configs]; rename that one" in res.stderr


@pytest.mark.slow
def test_a_block_sweep_finds_the_block_that_carries_the_class_signal(tmp_path):
    """A dataset whose classes differ only in the mid block's weights (the scale of each factor): a
    `[layer_sweep] by = "block"` experiment ranks only_mid first on validation, and the paired tests
    call it better than every other block, significantly."""
    import dataclasses

    import numpy as np

    from tests.lora_files import write_hf_dataset

    table = DemoSource(name="planted", num_samples=240, num_classes=3, seed=5).load()
    rng = np.random.default_rng(0)
    scale = (1.0 + table.labels.astype(np.float32))[:, None, None]  # class k: factors (k + 1) times larger
    weights = {layer: (rng.standard_normal(w.shape).astype(np.float32) * 0.01
                       * (scale if layer.startswith("mid_block.") else 1.0)).astype(np.float32)
               for layer, w in table.weights.items()}
    data = write_hf_dataset(dataclasses.replace(table, weights=weights), tmp_path / "planted")
    blocks = ["down0", "down1", "down2", "up1", "up2", "up3"]
    (tmp_path / "exp.toml").write_text(
        'name = "blocks"\nnum_runs = 3\ndevice = "cpu"\nrepresentations = ["stats"]\n'
        '[layer_configs.all_layers]\ninclude = ["*"]\n[layer_sweep]\nby = "block"\n'
        '[classifier]\nhidden_dim = 32\nnum_hidden_layers = 2\ndropout = 0.2\n'
        '[training]\nmax_epochs = 30\npatience = 10\nbatch_size = 32\n'
        f'[reports]\ncompare = {json.dumps([["only_mid", f"only_{b}"] for b in blocks])}\n')
    res = ablate_in_process("run", "-c", "exp.toml", "--dataset", str(data), "--threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (exp,) = (tmp_path / "results").iterdir()
    results = load_json(exp / "results.json")
    cells = [c for lc in ["all_layers", *(f"only_{b}" for b in ["down0", "down1", "down2", "mid", "up1", "up2",
                                                              "up3"])] for c in results[f"{lc}_results"]]
    assert len(cells) == 8
    sweep = [c for c in cells if c["layer_config"] != "all_layers"]
    assert max(sweep, key=lambda c: c["val_acc_mean"])["layer_config"] == "only_mid"
    effects = {e["to"]: e["rows"][0] for e in results["statistics"]["layer_effects"]}
    assert sorted(effects) == sorted(f"only_{b}" for b in blocks)
    for block, rec in effects.items():
        assert rec["diff"] > 0.3 and rec["p_holm"] < 0.05, (block, rec)
    # the findings name the sweep's best layer config, chosen on validation, in one sentence for the sweep
    findings = results["findings"]
    assert findings["best_in_layer_sweep"] == {"stats": "only_mid"}
    assert "Layer sweep by block (alone, 7 layer configs): for stats, the best on validation accuracy is only_mid" \
        in findings["text"]
    assert "On only_" not in findings["text"] and "On all_layers, the best cell" in findings["text"]
    assert findings["text"].count(" minus only_") == 1  # the pairs in one sentence; results.md has each
    assert "Of the 6 pairs with a layer sweep's configs (only_mid minus only_down0, ...; paired bootstrap, Holm " \
           "within each), 6 differ significantly" in findings["text"]


@pytest.mark.slow
def test_a_layer_config_derived_from_a_ranking_drops_its_top_layers_and_goes_stale_with_it(tmp_path):
    """The researcher's next experiment in two: a layer sweep ranks the blocks on validation accuracy, then
    `drop_top = 2` drops the two best blocks' layers beside all_layers; a rerun of the ranking (another
    seed) makes the derived cells stale."""
    write_project(tmp_path, top='name = "ranking"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                  'representations = ["stats"]\n')
    cfg = tmp_path / "exp.toml"
    cfg.write_text(cfg.read_text().replace('[layer_configs.visual_only]\ninclude = ["*.attn1.*"]\n', "")
                   + '[layer_sweep]\nby = "block"\n')
    derived = tmp_path / "derived.toml"
    derived.write_text(cfg.read_text().replace('name = "ranking"', 'name = "dropped"')
                       .replace('[layer_sweep]\nby = "block"\n', "")
                       .replace('representations = ["stats"]', 'representations = ["simple_stats", "stats"]')
                       + '[layer_configs.without_top2]\ndrop_top = 2\nranked_by = "results/ranking_tinydemo"\n')
    early = ablate_in_process("run", "-c", "derived.toml", "--dry-run", cwd=tmp_path)
    assert early.returncode == 2 and "error: ranked_by = 'results/ranking_tinydemo': output folder " \
        "results/ranking_tinydemo does not exist" in early.stderr, early.stderr
    assert ablate_in_process("run", "-c", "exp.toml", "--threads", "1", cwd=tmp_path).returncode == 0

    ranking = load_json(tmp_path / "results/ranking_tinydemo/results.json")
    record = load_json(tmp_path / "results/ranking_tinydemo/experiment.json")
    only = [c for lc in record["layer_configs"] if lc.startswith("only_") for c in ranking[f"{lc}_results"]]
    order = sorted(only, key=lambda c: (-round(c["val_acc_mean"], 9),
                                        record["layer_configs"][c["layer_config"]]["layers"][0]))
    dropped = sorted(x for c in order[:2] for x in record["layer_configs"][c["layer_config"]]["layers"])

    plan = ablate_in_process("run", "-c", "derived.toml", "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert re.search(rf"^  without_top2 +{128 - len(dropped)} layers \(drops the top 2 of .*ranking_tinydemo by stats "
                     rf"on validation: {re.escape(', '.join(dropped))}\)$", plan.stdout, re.M), plan.stdout
    run = ablate_in_process("run", "-c", "derived.toml", "--threads", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    exp = tmp_path / "results/dropped_tinydemo"
    info = load_json(exp / "experiment.json")["layer_configs"]["without_top2"]
    assert info["derived"]["dropped"] == dropped and info["num_layers"] == 128 - len(dropped)
    assert not set(dropped) & set(info["layers"])
    results = load_json(exp / "results.json")
    assert results["derived_layer_configs"]["without_top2"]["dropped"] == dropped
    assert f"without_top2 drops the {len(dropped)} layer(s) of the top 2 layer configs ranked by stats on " \
           "validation accuracy (never test)" in results["findings"]["text"]
    assert [e["to"] for e in results["statistics"]["layer_effects"]] == ["without_top2"]  # paired per rep

    rerun = ablate_in_process("run", "-c", "exp.toml", "--seed", "7", "--restart-stale", "--threads", "1",
                              cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    stale = ablate_in_process("run", "-c", "derived.toml", "--threads", "1", cwd=tmp_path)
    assert stale.returncode == 2 and "ranking: " in stale.stderr, stale.stderr


@pytest.mark.slow
def test_mlflow_gets_each_axis_as_a_param_of_cells_and_runs(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow

    write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                  'representations = ["stats"]\n')
    res = ablate("run", "-c", "exp.toml", "--layer-configs", "visual_only", "--sweep", "training.lr=1e-3,3e-3",
                 "--mlflow", "sqlite:///mlflow.db", "--threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("ablate.kind", ""), []).append(r)
    for kind in ("cell", "run"):
        assert sorted((r.data.tags["ablate.cell"], r.data.params["lr"], r.data.params["layer_config"],
                       r.data.params["representation"]) for r in by_kind[kind]) == [
            ("visual_only_stats__lr=1e-3", "0.001", "visual_only", "stats"),
            ("visual_only_stats__lr=3e-3", "0.003", "visual_only", "stats")]


def test_a_pivot_of_an_axis_the_grid_lacks_is_refused_before_the_run():
    from ablation_cli.errors import ConfigError

    ok = config_from_data({"axes": {"training.lr": [1e-3, 3e-4]}, "reports": {"pivot": ["representation",
                                                                                        "training.lr"]}}, None, "c")
    assert ok.reports.pivot == ("representation", "training.lr")
    with pytest.raises(ConfigError, match=r"reports.pivot: 'training.lr' is not an axis \(allowed: layer_config, "
                                          r"representation, classifier\)"):
        config_from_data({"reports": {"pivot": ["representation", "training.lr"]}}, None, "c")
