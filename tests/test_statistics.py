"""The statistics of `ablate merge`: bootstrap CIs over test rows and runs, paired comparisons against
the best cell on validation and between layer configs, Holm, chance, the findings, and the tables
that show them. Checked against scipy and statsmodels where they have the function."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from ablation_cli.config import ExperimentConfig
from ablation_cli.errors import ConfigError
from ablation_cli.executors.cell import _identical
from ablation_cli.reports import findings, plots, statistics, tables
from ablation_cli.reports.merge import add_statistics
from ablation_cli.training.metrics import aggregate
from ablation_cli.training.predictions import RunPredictions, pack, unpack
from tests.conftest import cell, make_results, stored_predictions, tiny_config


def analysed(results: dict) -> dict:
    """results.json as merge makes it: statistics from the cells' predictions, in grid order."""
    out = copy.deepcopy(results)
    lcs, reps = tables.layer_configs(out), tables.representations(out)
    docs = sorted((c for lc in lcs for c in out[f"{lc}_results"]),
                  key=lambda c: (lcs.index(c["layer_config"]), reps.index(tables.row_key(c))))
    add_statistics(out, docs)
    return out


# -- the building blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2], [0.5], [0.01, 0.01, 0.02], [0.0005, 0.9, 0.04, 0.04, 0.3],
                               [1.0, 1.0], [0.02, 0.001, 0.5, 0.013, 0.049, 0.2, 0.0101]],
                         ids=["four", "one", "ties", "five", "ones", "seven"])
def test_holm_is_statsmodels_holm(p):
    assert statistics.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())


def test_predictions_round_trip_and_stay_small_at_50k():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(45_400, 9_080, replace=False))
    pred = rng.integers(0, 10, rows.size)
    stored = RunPredictions(rows, pred, pred).to_json()
    back = RunPredictions.from_json(stored)
    assert (back.rows == rows).all() and (back.pred == pred).all() and back.correct.all()
    assert sum(len(v) for v in stored.values()) < 30_000  # ten runs of a cell: well under a MB
    assert unpack(pack(np.array([5, 3, 300]))).tolist() == [5, 3, 300]  # unsorted: stored as is
    assert unpack(pack(np.array([], dtype=np.int64))).tolist() == []
    with pytest.raises(ValueError, match="negative"):
        pack(np.array([-1]))


def test_bootstrap_of_one_run_is_scipys_percentile_interval():
    correct = (np.arange(300) % 10 < 7).astype(float)  # accuracy 0.7 on 300 rows
    doc = {"cell": "a_x", "layer_config": "a", "per_run_results": [{}], "val_acc_mean": 0.7,
           "predictions": [RunPredictions(np.arange(300), np.zeros(300, int),
                                           np.where(correct > 0, 0, 1)).to_json()]}
    out = statistics.analyse([doc], {"a_x": "x"}, ["a"], [], statistics.Settings(resamples=4000), False)
    lo, hi = out["cells"]["a_x"]["test_acc_ci95_rows_runs"]
    ref = scipy_stats.bootstrap((correct,), np.mean, n_resamples=4000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    assert lo < 0.7 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 300), abs=0.01)


def test_corrected_resampled_t_test_by_hand():
    a, b = [0.80, 0.82, 0.79, 0.85, 0.81], [0.78, 0.80, 0.80, 0.81, 0.77]
    d = np.subtract(a, b)
    se = math.sqrt((1 / 5 + 200 / 700) * np.var(d, ddof=1))
    diff, ci, p = statistics.corrected_resampled_t(a, b, n_train=700, n_test=200)
    assert diff == pytest.approx(d.mean())
    assert p == pytest.approx(2 * scipy_stats.t.sf(d.mean() / se, 4))
    half = scipy_stats.t.ppf(0.975, 4) * se
    assert ci == pytest.approx((d.mean() - half, d.mean() + half))
    # the correction widens the plain paired t-test (which ignores that training sets overlap)
    assert p > scipy_stats.ttest_rel(a, b).pvalue
    assert statistics.corrected_resampled_t([0.5, 0.5], [0.5, 0.5], 700, 200) == (0.0, None, 1.0)


def test_bootstrap_p_is_floored_at_one_over_b_and_capped_at_one():
    assert statistics.bootstrap_p(np.full(2000, 0.1), 2000) == 1 / 2000
    assert statistics.bootstrap_p(np.zeros(2000), 2000) == 1.0
    assert statistics.bootstrap_p(np.r_[np.full(100, -1.0), np.full(1900, 1.0)], 2000) == pytest.approx(0.1)


# -- a planted effect -----------------------------------------------------------------------------------

def _planted_doc(cid: str, lc: str, p_correct: float, val: float, seed: int, runs: int = 5, n: int = 400) -> dict:
    rng = np.random.default_rng(seed)
    true = np.arange(n) % 4
    preds = [RunPredictions(np.arange(n), true, np.where(rng.random(n) < p_correct, true, (true + 1) % 4)).to_json()
             for _ in range(runs)]
    return {"cell": cid, "layer_config": lc, "representation": cid.split("_", 1)[1], "per_run_results": [{}] * runs,
            "val_acc_mean": val, "predictions": preds, "split_sizes": {"train": 1400, "val": 200, "test": n}}


def test_a_planted_effect_is_found_the_identical_pair_is_tied_and_holm_is_statsmodels():
    # L1: `strong` is truly better; the twins are identical in distribution. L2: all three identical.
    docs = [_planted_doc("L1_strong", "L1", 0.9, 0.90, 1), _planted_doc("L1_twina", "L1", 0.7, 0.71, 2),
            _planted_doc("L1_twinb", "L1", 0.7, 0.70, 3), _planted_doc("L2_strong", "L2", 0.7, 0.69, 4),
            _planted_doc("L2_twina", "L2", 0.7, 0.70, 5), _planted_doc("L2_twinb", "L2", 0.7, 0.70, 6)]
    rows = {d["cell"]: d["representation"] for d in docs}
    out = statistics.analyse(docs, rows, ["L1", "L2"], [("L1", "L2")], statistics.Settings(), False)

    l1 = out["vs_best"]["L1"]
    assert l1["best"] == "L1_strong"
    assert [(r["cell"], r["verdict"]) for r in l1["comparisons"]] == [("L1_twina", "worse"), ("L1_twinb", "worse")]
    assert all(r["ci95"][1] < 0 for r in l1["comparisons"])
    raw = [r["p"] for r in l1["comparisons"]]
    assert [r["p_holm"] for r in l1["comparisons"]] == pytest.approx(multipletests(raw, method="holm")[1].tolist())

    l2 = out["vs_best"]["L2"]
    assert l2["best"] == "L2_twina"  # 0.70 twice: the grid's order breaks the tie on validation
    assert [(r["cell"], r["verdict"]) for r in l2["comparisons"]] == [("L2_strong", "tied"), ("L2_twinb", "tied")]
    raw = [r["p"] for r in l2["comparisons"]]
    assert [r["p_holm"] for r in l2["comparisons"]] == pytest.approx(multipletests(raw, method="holm")[1].tolist())

    effect = {r["row"]: r for r in out["layer_effects"][0]["rows"]}
    assert effect["strong"]["p_holm"] < 0.05 and effect["strong"]["ci95"][0] > 0.1
    assert effect["twina"]["p_holm"] >= 0.05 and effect["twinb"]["p_holm"] >= 0.05  # identical: tied
    raw = [effect[r]["p"] for r in ("strong", "twina", "twinb")]
    assert [effect[r]["p_holm"] for r in ("strong", "twina", "twinb")] == \
        pytest.approx(multipletests(raw, method="holm")[1].tolist())

    assert all(c["above"] for c in out["chance"].values())  # 0.7 and 0.9 against a majority rate of 0.25
    assert out["chance"]["L1_strong"]["majority_rate"] == 0.25
    assert out["comparisons_corrected"] == 2 + 2 + 3 + 6


def test_a_cell_at_chance_is_named_in_the_findings():
    docs = [_planted_doc("a_good", "a", 0.8, 0.8, 1), _planted_doc("a_noise", "a", 0.25, 0.3, 2)]
    results = {"experiment": "e", "dataset": "d", "num_runs": 5,
               "a_results": [{**d, "test_acc_mean": 0.5, "test_acc_std": 0.0} for d in docs],
               "config": {"representations": ["good", "noise"], "layer_configs": {"a": {}}}}
    add_statistics(results, docs)
    facts = results["findings"]
    assert facts["not_above_chance"] == ["a_noise"] and facts["best"] == {"a": "good"}
    assert "not above it (one-sided bootstrap, Holm over 2 cells): noise (a)." in facts["text"]
    assert facts["text"].startswith("On a, the best cell on validation accuracy is good (validation 0.800;")


def test_chance_is_the_majority_class_rate_not_one_over_the_classes():
    true = np.r_[np.zeros(140, int), np.ones(30, int), np.full(30, 2)]  # 70% class 0
    always_zero = RunPredictions(np.arange(200), true, np.zeros(200, int)).to_json()
    doc = {"cell": "a_majority", "layer_config": "a", "per_run_results": [{}, {}], "val_acc_mean": 0.7,
           "predictions": [always_zero, always_zero]}
    out = statistics.analyse([doc], {"a_majority": "majority"}, ["a"], [], statistics.Settings(), False)
    chance = out["chance"]["a_majority"]
    assert chance["majority_rate"] == 0.7 and chance["above"] is False  # 0.70 is not above 0.70 (1/3 would be)


# -- one run, identical runs, determinism -------------------------------------------------------------------

def test_one_run_has_no_ci_in_tables_nor_plots():
    results = make_results()
    results["all_layers_results"][0] = {**cell("simple_stats", "all_layers", [0.5]), "test_acc_ci95": None}
    md = tables.format_results_md(results)
    row = next(line for line in md.splitlines() if line.startswith("| simple_stats |"))
    assert row.split(" | ")[2] == "n/a"  # CI runs of all_layers
    assert plots._error_bar(results["all_layers_results"][0], boot=False) == (0.0, 0.0)
    wide = {"test_acc_mean": 0.9, "test_acc_ci95": 0.3}  # two runs far apart: a t-interval past 1
    assert plots._error_bar(wide, boot=False) == (0.3, pytest.approx(0.1))
    assert aggregate([0.5])["ci95"] is None


def test_identical_predictions_across_seeds_mark_a_cell_deterministic():
    same = stored_predictions([0.6])[0]
    runs = [{"predictions": same, "metrics": {"test_acc": 0.6}} for _ in range(3)]
    assert _identical(runs)
    assert not _identical(runs[:1])  # one run proves nothing
    other = [*runs[:2], {"predictions": stored_predictions([0.6], rotate=1)[0], "metrics": {"test_acc": 0.6}}]
    assert not _identical(other)  # the same accuracy from other predictions is a measured spread


# -- the best is chosen on validation ----------------------------------------------------------------------

def test_the_best_cell_is_chosen_on_validation_never_on_test():
    results = make_results()
    # simple_stats: the best validation accuracy but a lower test accuracy than ensemble
    results["all_layers_results"][0]["val_acc_mean"] = 0.99
    assert plots.best_cell(results, "all_layers")["representation"] == "simple_stats"
    assert plots.best_cell(results, "visual_only")["representation"] == "ensemble"
    out = analysed(results)
    assert out["statistics"]["vs_best"]["all_layers"]["best"] == "all_layers_simple_stats"
    ensemble = next(r for r in out["statistics"]["vs_best"]["all_layers"]["comparisons"]
                    if r["cell"] == "all_layers_ensemble")
    assert ensemble["diff"] > 0 and ensemble["verdict"] == "better"
    tex = tables.format_results_tex(out)
    assert next(line for line in tex.splitlines() if line.startswith("simple\\_stats")).count("\\textbf") == 2


# -- comparisons come from the config ------------------------------------------------------------------------

def _three_configs(compare=None) -> dict:
    results = make_results()
    results["config"]["layer_configs"] = {"everything": {}, "selfattn": {}, "crossattn": {}}
    if compare is not None:
        results["config"]["reports"] = {"compare": compare}
    for old, new in (("all_layers", "everything"), ("visual_only", "selfattn")):
        results[f"{new}_results"] = [{**c, "layer_config": new, "cell": f"{new}_{c['representation']}"}
                                     for c in results.pop(f"{old}_results")]
    results["crossattn_results"] = [{**cell(c["representation"], "crossattn", [0.4, 0.41, 0.39]),
                                     "cell": f"crossattn_{c['representation']}"} for c in results["selfattn_results"]]
    return results


def test_renamed_and_third_layer_configs_are_compared_against_the_first_by_default():
    out = analysed(_three_configs())
    assert tables.comparison_pairs(out) == [("everything", "selfattn"), ("everything", "crossattn")]
    pairs = {(r["from"], r["to"], r["representation"]) for r in out["pair_comparisons"]}
    assert len(pairs) == 6 and ("everything", "crossattn", "ensemble") in pairs
    # "comparisons" keeps one row per representation (the first pair), as the researcher's scripts read it
    assert [(r["to"], r["representation"]) for r in out["comparisons"]] == \
        [("selfattn", "simple_stats"), ("selfattn", "spectral"), ("selfattn", "ensemble")]
    row = next(r for r in out["comparisons"] if (r["to"], r["representation"]) == ("selfattn", "ensemble"))
    assert row["everything_test_acc"] == pytest.approx(0.62) and row["paired_p_holm"] is not None
    assert [(e["from"], e["to"], len(e["rows"])) for e in out["statistics"]["layer_effects"]] == \
        [("everything", "selfattn", 3), ("everything", "crossattn", 3)]
    md = tables.format_results_md(out)
    assert "| everything - crossattn | ensemble | +0.2200 |" in md


def test_declared_pairs_are_the_only_comparisons(tmp_path):
    out = analysed(_three_configs(compare=[["selfattn", "crossattn"]]))
    assert {(r["from"], r["to"]) for r in out["pair_comparisons"]} == {("selfattn", "crossattn")}
    assert "selfattn minus crossattn, paired per representation" in out["findings"]["text"]
    names = sorted(p.name for p in plots.write_all(out, tmp_path) if p.suffix == ".png")
    assert "drop_selfattn_to_crossattn.png" in names and "per_class_f1_selfattn_to_crossattn.png" in names


@pytest.mark.parametrize(("data", "message"), [
    ({"split": {"method": "original", "resample": True}}, "cannot be resampled"),
    ({"reports": {"compare": [["all_layers", "nope"]]}}, "'nope' is not a layer config"),
    ({"reports": {"compare": [["all_layers", "all_layers"]]}}, "compared with itself"),
], ids=["original-resampled", "unknown-config", "self"])
def test_config_errors(data, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate(data)


def test_config_error_through_load_config_is_one_line(tmp_path):
    from ablation_cli.config import load_config

    path = tmp_path / "exp.toml"
    path.write_text('[split]\nmethod = "original"\nresample = true\n')
    with pytest.raises(ConfigError, match=r"split: .*cannot be resampled"):
        load_config(path)


def test_default_pairs_of_the_default_config():
    assert tiny_config().comparison_pairs == [("all_layers", "visual_only")]
    # all_layers minus visual_only, as earlier versions reported it, whatever the order of the configs
    layers = {"visual_only": {"include": ["*.attn1.*"]}, "text_only": {"include": ["*.attn2.*"]},
              "all_layers": {"include": ["*"]}}
    assert tiny_config(layer_configs=layers).comparison_pairs == \
        [("all_layers", "visual_only"), ("visual_only", "text_only")]
    assert tiny_config(reports={"compare": [["visual_only", "all_layers"]]}).comparison_pairs == \
        [("visual_only", "all_layers")]


def test_the_best_on_validation_without_predictions_is_still_the_best_and_nothing_is_compared_with_it():
    results = make_results()
    best = results["all_layers_results"][2]  # ensemble: the best on validation
    del best["predictions"]
    out = analysed(results)
    block = out["statistics"]["vs_best"]["all_layers"]
    assert (block["best"], block["best_has_predictions"], block["comparisons"]) == ("all_layers_ensemble", False, [])
    assert block["not_compared"] == ["all_layers_simple_stats", "all_layers_spectral"]
    assert "is ensemble (validation 0.630; test 0.620; no stored predictions, so nothing is compared with it)" \
        in out["findings"]["text"]
    md = tables.format_results_md(out)
    assert "| all_layers | simple_stats | 0.5000 | 0.4900 | n/a | n/a | n/a | not compared (the best has no stored " \
           "predictions) |" in md
    assert out["statistics"]["without_predictions"] == ["all_layers_ensemble"]


# -- tables carry the statistics ----------------------------------------------------------------------------

def test_tables_carry_the_ci_the_holm_p_and_the_verdicts():
    out = analysed(make_results())
    md = tables.format_results_md(out)
    assert md.index("## Findings") < md.index("## Test accuracy")
    assert "n_test = 100 rows; split: 350 / 50 / 100 (train / val / test)." in md
    assert "population std, ddof 0" in md and "sample std, ddof 1" in md
    best_lines = [line for line in md.splitlines() if "best (validation)" in line]
    assert [line.split(" | ")[1] for line in best_lines] == ["ensemble", "ensemble"]
    worse = next(line for line in md.splitlines() if line.startswith("| all_layers | simple_stats |"))
    # p at the bootstrap's floor 1/B (B = 2000) and its Holm value are bounds, shown as such
    assert worse.endswith("| ≤0.0005 | ≤0.001 | worse |")
    assert "simple_stats (-0.130, adjusted p <= 0.001)" in out["findings"]["text"]
    assert "A p shown as <= is a bound: the bootstrap's resolution (1/B = 0.0005 before Holm's correction)" \
        in out["findings"]["text"]
    csv_rows = tables.format_results_csv(out).splitlines()
    header = csv_rows[0].split(",")
    simple = dict(zip(header, csv_rows[1].split(",")))
    assert (simple["vs_best"], simple["above_chance"], simple["vs_best_p_is_bound"]) == ("worse", "true", "true")
    assert float(simple["vs_best_p_holm"]) == pytest.approx(2 / 2000)  # Holm: 2 comparisons x the floor
    assert float(simple["test_acc_ci95_rows_runs_lo"]) < 0.49 < float(simple["test_acc_ci95_rows_runs_hi"])
    tex = tables.format_results_tex(out)
    assert "$\\dagger$" in tex and " & $\\leq$0.001 & " in tex and "n\\_test = 100 rows" in tex


def test_results_without_predictions_say_so():
    results = make_results()
    for lc in ("all_layers", "visual_only"):
        for c in results[f"{lc}_results"]:
            del c["predictions"]
    out = analysed(results)
    assert out["statistics"]["without_predictions"] == [c["cell"] for lc in ("all_layers", "visual_only")
                                                        for c in results[f"{lc}_results"]]
    assert out["findings"]["text"].startswith("No findings: no cell has stored test predictions")
    assert "No paired comparisons: the cells have no stored test predictions" in tables.format_results_md(out)
    assert findings.build({}) ["text"] == ""


# -- end to end ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resampled_splits_give_each_run_its_split_and_the_corrected_t_test(tmp_path):
    from tests.conftest import ablate_in_process as ablate
    from tests.conftest import load_json, write_project

    config = write_project(tmp_path)
    config.write_text(config.read_text() + "[split]\nresample = true\n")
    done = ablate("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Findings (results.md has the tables behind them): On all_layers, the best cell" in done.stderr
    exp = tmp_path / "results/tiny_tinydemo"
    runs = [RunPredictions.from_json(load_json(exp / f"checkpoints/runs/all_layers_stats/run_{k}.json")["predictions"])
            for k in (1, 2)]
    assert len(runs[0].rows) == len(runs[1].rows) == 24 and set(runs[0].rows) != set(runs[1].rows)
    cell_doc = load_json(exp / "checkpoints/all_layers_stats.json")
    assert cell_doc["meta"]["config"]["split_resample"] is True
    assert cell_doc["split_sizes"] == {"train": 84, "val": 12, "test": 24}
    results = load_json(exp / "results.json")
    assert results["statistics"]["settings"]["paired_test"] == "corrected resampled t-test"
    assert "predictions" not in results["all_layers_results"][0]  # checkpoints hold them, results.json not
    rec = results["statistics"]["vs_best"]["all_layers"]["comparisons"][0]
    best, other = (load_json(exp / f"checkpoints/{c}.json") for c in (rec["against"], rec["cell"]))
    accs = [[r["test_acc"] for r in d["per_run_results"]] for d in (other, best)]
    diff, ci, p = statistics.corrected_resampled_t(*accs, n_train=84, n_test=24)
    assert (rec["diff"], rec["ci95"], rec["p"]) == (pytest.approx(diff), pytest.approx(list(ci)) if ci else None,
                                                    pytest.approx(p) if p is not None else None)
    assert "(resampled per run)" in (exp / "results.md").read_text()

    # [reports] changes no cell, only what the merge writes: the next run merges again
    config.write_text(config.read_text() + "[reports]\nalpha = 0.1\n")
    again = ablate("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=tmp_path)
    assert again.returncode == 0 and "Evaluating" not in again.stderr, again.stderr
    assert "Results are up to date" not in again.stderr and "Findings" in again.stderr
    assert load_json(exp / "results.json")["statistics"]["settings"]["alpha"] == 0.1
    same = ablate("run", "-c", "exp.toml", "--layer-configs", "all_layers", cwd=tmp_path)
    assert "Results are up to date" in same.stderr, same.stderr


def test_an_estimator_fitted_per_resampled_split_is_not_marked_deterministic():
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.executors.cell import build_cell_doc
    from ablation_cli.grid import expand
    from tests.conftest import TINY_DEMO

    def run(k: int, acc: float) -> dict:
        return {"run": k, "seed": 41 + k, "metrics": {"test_acc": acc}, "best_epoch": 0, "epochs_run": 0,
                "train_time_s": 0.1, "device": "cpu", "feature_dim": 5, "label_names": ["a", "b", "c"],
                "learning_curve": {}, "confusion_matrices": {}, "per_class": {}, "deterministic": True,
                "predictions": stored_predictions([acc])[0], "split_sizes": {"train": 84, "val": 12, "test": 24}}

    runs = [run(1, 0.5), run(2, 0.6)]
    for resample, marked in ((False, True), (True, False)):
        cfg = tiny_config(split={"resample": resample})
        cell_ = expand(cfg, DemoSource(name="tinydemo", **TINY_DEMO).describe())[0]
        doc = build_cell_doc(cell_, cfg, runs)
        assert bool(doc.get("deterministic")) is marked
        assert doc["duration_s"] == pytest.approx(0.2) and len(doc["predictions"]) == 2
