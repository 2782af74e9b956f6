"""Merge outputs: golden tables, statistics, plots, and cross-dataset comparison."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from ablation_cli.errors import ExperimentError
from ablation_cli.reports import compare, plots, tables
from ablation_cli.reports.merge import write_merge
from tests.conftest import cell, make_experiment, make_results
from tests.test_statistics import analysed

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ABLATE_UPDATE_GOLDEN") == "1"


def shuffled(results: dict[str, Any]) -> dict[str, Any]:
    """The same cells in another order, layer-config lists included."""
    out = copy.deepcopy(results)
    out["all_layers_results"].reverse()
    out["visual_only_results"] = out["visual_only_results"][1:] + out["visual_only_results"][:1]
    keys = list(out)
    keys.remove("visual_only_results")
    return {k: out[k] for k in ["visual_only_results", *keys]}


@pytest.mark.parametrize(("name", "fmt"), [("results.md", tables.format_results_md),
                                           ("results.csv", tables.format_results_csv),
                                           ("results.tex", tables.format_results_tex)])
def test_golden_tables(name, fmt):
    text = fmt(analysed(make_results()))  # with the statistics merge computes from stored predictions
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text()
    assert fmt(analysed(shuffled(make_results()))) == text  # paired by name, never by position


def test_tex_bolds_the_best_of_each_column():
    tex = tables.format_results_tex(make_results())
    ensemble = next(line for line in tex.splitlines() if line.startswith("ensemble"))
    assert ensemble.count("\\textbf") == 4
    assert "simple\\_stats" in tex and "\\toprule" in tex and "\\cmidrule(lr){2-4}" in tex


def test_welch_and_effect_size():
    rows = {r["representation"]: r for r in tables.comparisons(make_results())}
    a, b = [0.62, 0.61, 0.63], [0.36, 0.37, 0.36]
    r = rows["ensemble"]
    assert r["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    assert r["cohens_d"] == pytest.approx((np.mean(a) - np.mean(b)) / pooled)
    assert r["drop_abs"] == pytest.approx(np.mean(a) - np.mean(b))
    assert r["drop_rel"] == pytest.approx((np.mean(a) - np.mean(b)) / np.mean(a))
    assert r["n_runs"] == [3, 3]


def test_identical_runs_have_no_welch_p_nor_effect_size():
    # a deterministic classifier (kNN) reports R identical runs: np.var([0.3375] * 3) is 4.6e-33, not 0,
    # which made Cohen's d 4e15 in the demo's results.md
    results = make_results()
    results["all_layers_results"][0] = cell("simple_stats", "all_layers", [0.3375] * 3)
    results["visual_only_results"][0] = cell("simple_stats", "visual_only", [0.1375] * 3)
    r = {r["representation"]: r for r in tables.comparisons(results)}["simple_stats"]
    assert (r["welch_p"], r["cohens_d"]) == (None, None)
    assert r["drop_abs"] == pytest.approx(0.2)
    row = next(line for line in tables.format_results_md(results).splitlines()
               if line.startswith("| all_layers - visual_only | simple_stats"))
    assert row.endswith("| n/a | - |")


def test_per_class_f1_and_confusion_come_from_the_real_matrices():
    c = cell("x", "all_layers", [0.5, 0.5])
    f1 = plots.per_class_f1(c)
    assert f1.tolist() == pytest.approx([2 * 8 / (9 + 10), 2 * 7 / (12 + 10), 2 * 7 / (9 + 10)])
    assert plots.mean_confusion(c)[1].tolist() == pytest.approx([0.1, 0.7, 0.2])


def test_plots_are_written_non_empty_and_deterministic(tmp_path):
    first = plots.write_all(make_results(), tmp_path / "a")
    second = plots.write_all(shuffled(make_results()), tmp_path / "b")
    names = sorted(p.name for p in first)
    assert names == sorted(f"{n}.{ext}" for n in ("accuracy_by_representation", "drop_all_to_visual",
                                                   "learning_curves_best", "confusion_best", "per_class_f1_drop")
                           for ext in ("png", "pdf"))
    for p, q in zip(sorted(first), sorted(second)):
        assert p.stat().st_size > 5000
        assert p.read_bytes() == q.read_bytes(), p.name


def test_compare_pairs_by_name_whatever_the_order(tmp_path):
    small, large = make_results("1k", 1000), make_results("10k", 9170, scale=1.1)
    md = compare.format_compare_md([large, small])
    assert md == compare.format_compare_md([small, shuffled(large)])
    lines = md.splitlines()
    assert lines[0] == "| layer config | representation | 1k (n=1000) | 10k (n=9170) | change (first -> last) |"
    ens = next(line for line in lines if "| all_layers | ensemble |" in line)
    assert ens == "| all_layers | ensemble | 0.6200 ± 0.0082 | 0.6820 ± 0.0090 | +0.0620 |"
    csv_text = compare.format_compare_csv([large, small])
    assert csv_text.splitlines()[1].startswith("all_layers,simple_stats,1k,1000,")
    paths = compare.compare_plot([large, small], tmp_path)
    assert [p.name for p in paths] == ["comparison.png", "comparison.pdf"] and paths[0].stat().st_size > 5000


def test_merge_without_matplotlib_writes_tables_only(tmp_path, monkeypatch):
    store = make_experiment(tmp_path)
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    with pytest.raises(ExperimentError, match=r"refusing to merge .* visual_only_stats \(dropout: 0.3 -> 0.2\)"):
        write_merge(store)
    results, paths = write_merge(store, partial=True)
    assert [p.name for p in paths] == ["results.json", "results.md", "results.csv", "results.tex"]
    assert results["missing"] == ["all_layers_stats", "all_layers_spectral", "visual_only_simple_stats",
                                  "visual_only_spectral", "visual_only_stats"]
