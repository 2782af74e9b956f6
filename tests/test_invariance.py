"""The invariant representations against their references, and every representation flagged invariant
against the reparametrisations of docs/invariance.md."""

from __future__ import annotations

import numpy as np
import pytest

from ablation_cli import features
from ablation_cli.data.layers import sd15_layers
from ablation_cli.data.table import LoraChunk
from ablation_cli.features import invariant
from ablation_cli.features.reference import ref_delta_canonical, ref_delta_sketch
from ablation_cli.features.transforms import TRANSFORMS, gl_matrices, reparametrise, transform_chunk

# every (out, in) of an SD1.5 attention module (the module's up is (out, r), its down (r, in))
_SHAPES = {s.name: s.shape for s in sd15_layers()}
SD15_MODULES = sorted({(_SHAPES[n][0], _SHAPES[n[:-3] + ".down"][1]) for n in _SHAPES if n.endswith(".up")})
RANKS = (1, 4, 8)
INVARIANT = [n for n in features.available() if features.get(n).invariant]


def _factors(rank: int, n_out: int, n_in: int, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + rank * 7919 + n_out + n_in)
    down = (rng.standard_normal((n, rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
    up = (rng.standard_normal((n, n_out, rank)) * 1e-2).astype(np.float32)
    return down, up


def test_the_invariant_representations_are_flagged():
    assert INVARIANT == ["delta_spectral", "delta_canonical", "delta_sketch"]
    assert not any(features.get(n).invariant for n in features.default_grid())
    assert SD15_MODULES == [(320, 320), (320, 768), (640, 640), (640, 768), (1280, 768), (1280, 1280)]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize(("n_out", "n_in"), SD15_MODULES)
def test_delta_canonical_and_sketch_match_their_references(rank, n_out, n_in):
    down, up = _factors(rank, n_out, n_in, n=2)
    scale = np.array([0.125, 16.0])  # alpha / r of two adapters
    canonical = features.get("delta_canonical")
    got = canonical.compute(down, up, scale)
    shapes = {"m.down": (rank, n_in), "m.up": (n_out, rank)}
    assert got.shape == (2, canonical.unit_dim("m", shapes)) == (2, min(rank, 4) * (1 + n_out + n_in))
    want = np.array([ref_delta_canonical(down[i], up[i], scale[i]) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    sketch = features.get("delta_sketch")
    got = sketch.compute(down, up, scale, unit="down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    want = np.array([ref_delta_sketch(down[i], up[i], scale[i], "down_blocks.0.attentions.0.transformer_blocks.0"
                                      ".attn1.to_q") for i in range(2)])
    assert got.shape == (2, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rank_one_canonical_form_is_sigma_and_the_unit_factors():
    rng = np.random.default_rng(3)
    b, a = rng.standard_normal(320), rng.standard_normal(768)
    b[5] = -10.0  # the largest entry of b is negative: the sign rule flips both
    got = features.get("delta_canonical").compute(a[None, None, :], b[:, None][None], np.array([0.5]))[0]
    sigma = 0.5 * np.linalg.norm(b) * np.linalg.norm(a)
    assert got[0] == pytest.approx(sigma, rel=1e-12)
    np.testing.assert_allclose(got[1:321], np.sqrt(sigma) * -b / np.linalg.norm(b), rtol=1e-10)
    np.testing.assert_allclose(got[321:], np.sqrt(sigma) * -a / np.linalg.norm(a), rtol=1e-10)


def test_sketches_are_seeded_by_the_module_name():
    s1, s2 = invariant.sketches("a.to_q", 320, 768)
    again = invariant.sketches.__wrapped__("a.to_q", 320, 768)
    np.testing.assert_array_equal(s1, again[0])
    assert not np.allclose(invariant.sketches("b.to_q", 320, 768)[0], s1)
    assert s1.shape == (8, 320) and s2.shape == (8, 768)
    assert np.std(s1) == pytest.approx(1 / np.sqrt(8), rel=0.05)


def test_a_k_in_the_name_sets_the_size():
    assert features.known("delta_sketch_k4") and features.known("delta_canonical_k8")
    assert not features.known("delta_sketch_k0") and not features.known("delta_sketch_4")
    assert features.get("delta_sketch_k4").dim((1, 320)) == 16
    down, up = _factors(8, 320, 320)
    assert features.get("delta_canonical_k8").compute(down, up).shape == (3, 8 * 641)


def test_gl_matrices_are_well_conditioned():
    r = gl_matrices(np.random.default_rng(0), 200, 4)
    cond = np.linalg.cond(r)
    assert cond.max() <= 100 + 1e-9 and cond.min() >= 1 - 1e-9


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("rank", RANKS)
def test_every_transform_keeps_each_modules_update(transform, rank):
    down, up = _factors(rank, 320, 768, n=4)
    alpha = np.array([float(rank), 2.0 * rank, 0.5, 8.0])
    d, u, a = reparametrise(transform, down, up, alpha, np.random.default_rng(1))
    before = (alpha / rank)[:, None, None] * (up.astype(np.float64) @ down.astype(np.float64))
    after = (a / rank)[:, None, None] * (u @ d)
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-12 * np.abs(before).max())
    assert not np.allclose(u, up)


def _chunk(rank: int, with_alpha: bool) -> LoraChunk:
    weights, alphas = {}, {}
    for i, (n_out, n_in) in enumerate(SD15_MODULES[:3]):
        down, up = _factors(rank, n_out, n_in, n=5, seed=i)
        weights[f"m{i}.down"], weights[f"m{i}.up"] = down, up
        if with_alpha:
            alphas[f"m{i}"] = np.array([rank, 1.0, 2.0 * rank, np.nan, 4.0], dtype=np.float32)
    return LoraChunk(weights, alphas)


def _features(rep_name: str, chunk: LoraChunk) -> np.ndarray:
    rep = features.get(rep_name)
    blocks = []
    for module in sorted({k.rsplit(".", 1)[0] for k in chunk.weights}):
        down, up = chunk.weights[module + ".down"], chunk.weights[module + ".up"]
        alpha = chunk.alphas.get(module)
        scale = np.where(np.isfinite(alpha), alpha / down.shape[1], 1.0) if alpha is not None else 1.0
        blocks.append(rep.compute(down, up, scale, **({"unit": module} if rep.named_unit else {})))
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("with_alpha", [True, False], ids=["alpha", "no-alpha"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", INVARIANT)
def test_a_representation_flagged_invariant_does_not_move(name, rank, transform, with_alpha):
    chunk = _chunk(rank, with_alpha)
    moved = transform_chunk(chunk, transform, seed=0, first_row=0)
    before = _features(name, chunk).astype(np.float32)  # as the feature pass stores them
    after = _features(name, moved).astype(np.float32)
    scale = np.abs(before).max(axis=0)
    change = np.abs(after - before).max(axis=0) / np.where(scale > 0, scale, 1.0)
    assert change.max() < 1e-5, f"{name} moved by {change.max():.2e} under {transform}"


def test_the_factor_representations_do_move():
    chunk = _chunk(1, True)
    moved = transform_chunk(chunk, "gl", seed=0, first_row=0)
    stack = chunk.weights["m0.up"]
    assert not np.allclose(features.get("stats").compute(moved.weights["m0.up"]), features.get("stats").compute(stack))


# -- end to end: the audit of an experiment, a single-module probe grid -----------------------------------------

@pytest.mark.slow
def test_the_audit_of_an_experiment_scores_each_cell_on_the_transformed_test_sets(tmp_path):
    import json

    from tests.conftest import ablate_in_process, all_layers_project

    all_layers_project(tmp_path, ["stats", "delta_spectral"])
    done = ablate_in_process("run", "-c", "exp.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = ablate_in_process("audit", "invariance", "--transform", "gl,sign", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (exp,) = (tmp_path / "results").iterdir()
    assert sorted(p.name for p in (exp / "audit").iterdir()) == ["invariance.json", "invariance.md",
                                                                 "invariance.pdf", "invariance.png"]
    report = json.loads((exp / "audit" / "invariance.json").read_text())
    reps = {r["name"]: r for r in report["representations"]}
    assert list(reps) == ["stats", "delta_spectral", "delta_canonical", "delta_sketch"]
    assert [r["in_experiment"] for r in reps.values()] == [True, True, False, False]
    assert all(max(c["max_rel_change"] for c in reps[n]["change"].values()) < 1e-5 for n in list(reps)[1:])
    assert reps["stats"]["change"]["sign"]["max_rel_change"] > 0.5  # the mean's sign flips
    cells = {c["cell"]: c for c in report["cells"]}
    assert sorted(cells) == ["all_layers_delta_spectral", "all_layers_stats"]
    for cell in cells.values():  # the retrained run 1 is its checkpoint's run (CPU)
        assert cell["reproduced"] and cell["retrained_test_acc"] == cell["test_acc"], cell
        assert set(cell["drop"]) == {"gl", "sign"}
    # features that do not move give the very same predictions
    assert cells["all_layers_delta_spectral"]["drop"] == {"gl": 0.0, "sign": 0.0}
    assert "| all_layers_stats |" in (exp / "audit" / "invariance.md").read_text()
    assert (report["retrain"], report["stale_cells"]) == (True, [])
    done = ablate_in_process("audit", "invariance", "--transform", "sign", "--no-retrain", "--reps", "stats",
                             cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "No cell was trained again (--no-retrain)" in (exp / "audit" / "invariance.md").read_text()
    assert "Auditing " in done.stderr and "Resuming" not in done.stderr


@pytest.mark.slow
def test_a_single_module_probe_grid_reads_the_data_once_and_names_the_best_module(tmp_path):
    from tests.conftest import ablate_in_process, all_layers_project, load_json

    all_layers_project(tmp_path, ["stats"])
    text = (tmp_path / "exp.toml").read_text()
    (tmp_path / "exp.toml").write_text(text + '[layer_sweep]\nby = "module"\nmode = "alone"\n')
    done = ablate_in_process("run", "-c", "exp.toml", "--threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (exp,) = (tmp_path / "results").iterdir()
    log = (exp / "run.log").read_text()
    assert log.count("in one pass") == 1, log  # one feature pass for the 65 layer configs
    results = load_json(exp / "results.json")
    swept = [lc for lc in results["config"]["layer_configs"]] + [
        k[: -len("_results")] for k in results if k.endswith("_results") and k.startswith("only_")]
    assert len(swept) == 65
    cells = [c for k, v in results.items() if k.endswith("_results") and k.startswith("only_") for c in v]
    best = max(cells, key=lambda c: (round(c["val_acc_mean"], 9), -cells.index(c)))["layer_config"]
    assert results["findings"]["best_in_layer_sweep"] == {"stats": best}
    assert f"(alone, 64 layer configs): for stats, the best on validation accuracy is {best} " in \
        results["findings"]["text"]
    assert len(results["statistics"]["layer_effects"]) == 64  # all_layers against each: linear, not all pairs


@pytest.mark.parametrize("rep", ["ensemble", "stats", "delta_canonical"])
def test_the_audits_unit_columns_are_the_workspaces(rep):
    from ablation_cli.audit import unit_columns
    from ablation_cli.config_sections import SplitConfig
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.workspace import Workspace
    from tests.conftest import TINY_DEMO

    ws = Workspace(DemoSource(name="tinydemo", **TINY_DEMO), SplitConfig(), None)
    names = ws.columns(rep, ws.index.layers)
    columns = unit_columns(rep, ws.index.shapes)
    assert sum(c.stop - c.start for c in columns.values()) == len(names)
    for unit, cols in columns.items():
        assert {n.split("/")[0] for n in names[cols]} == {unit}
