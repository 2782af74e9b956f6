"""Each representation against a slow, obviously correct per-matrix reference."""

from __future__ import annotations

import numpy as np
import pytest

from ablation_cli import features
from ablation_cli.data.layers import sd15_layers
from ablation_cli.features.reference import REFERENCES, ref_delta_spectral

SHAPES = [(1, 320), (1280, 1), (1, 768), (4, 64), (7, 5)]



MATRIX_REPS = [n for n in features.available() if features.get(n).unit == "matrix"]


def test_every_registered_representation_has_a_reference():
    assert set(REFERENCES) == set(MATRIX_REPS)
    assert [n for n in features.available() if n not in MATRIX_REPS] == ["delta_spectral", "delta_canonical",
                                                                         "delta_sketch"]


def test_default_grid_is_the_nine_of_domain_md():
    assert features.default_grid() == ["simple_stats", "rank_based", "stats", "spectral", "matrix_norms",
                                       "distribution", "frequency", "info_theoretic", "ensemble"]


@pytest.mark.parametrize("name", MATRIX_REPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_matches_per_matrix_reference(name, shape):
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((6, *shape)).astype(np.float32) * 0.05
    stack[1] *= 10.0
    rep = features.get(name)
    got = rep.compute(stack)
    assert got.shape == (6, rep.dim(shape)) == (6, len(rep.feature_names(shape)))
    expected = np.array([REFERENCES[name](m.astype(np.float64)) for m in stack])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", MATRIX_REPS)
def test_zero_matrix_is_finite(name):
    got = features.get(name).compute(np.zeros((2, 1, 320), dtype=np.float32))
    assert np.isfinite(got).all()


def test_rank_one_spectral_guards_the_condition_number():
    m = np.outer(np.arange(1, 5), np.arange(1, 4)).astype(np.float32)[None]
    s = features.get("spectral").compute(m)[0]
    assert s[0] > 0 and np.all(s[1:10] < 1e-5)  # one non-zero singular value
    assert s[1:10].tolist() == [0.0] * 9  # exactly one non-zero singular value
    assert s[30] == 1.0  # condition number: s1 / s1, not s1 / 1e-16
    assert s[31] == pytest.approx(s[0])  # nuclear norm = s1


@pytest.mark.parametrize(
    ("name", "dims"),
    [("simple_stats", (640, 320)), ("rank_based", (1408, 704)), ("stats", (896, 448)), ("spectral", (4096, 2048)),
     ("matrix_norms", (896, 448)), ("distribution", (1536, 768)), ("frequency", (1792, 896)),
     ("info_theoretic", (256, 128)), ("ensemble", (8576, 4288))],
)
def test_feature_dims_match_domain(name, dims):
    layers = sd15_layers()
    visual = [s for s in layers if ".attn1." in s.name]
    per = features.get(name).dim_per_layer
    assert (per * len(layers), per * len(visual)) == dims


def test_flat_vec_and_delta_spectral_dims():
    layers = sd15_layers()
    flat = features.get("flat_vec")
    assert sum(flat.dim(s.shape) for s in layers) == 99_648
    assert sum(flat.dim(s.shape) for s in layers if ".attn1." in s.name) == 49_920
    modules = {s.name.rsplit(".", 1)[0] for s in layers}
    assert len(modules) * features.get("delta_spectral").dim_per_layer == 768  # 64 modules x 12


# -- delta_spectral ---------------------------------------------------------------------------

DELTA_CASES = [(1, 320, 320), (1, 640, 768), (4, 64, 96), (12, 20, 30), (4, 3, 50)]  # (r, out, in)


@pytest.mark.parametrize(("r", "n_out", "n_in"), DELTA_CASES)
def test_delta_spectral_equals_the_svd_of_the_explicit_product(r, n_out, n_in):
    rng = np.random.default_rng(r * 1000 + n_out)
    down = rng.standard_normal((5, r, n_in)).astype(np.float32)
    up = rng.standard_normal((5, n_out, r)).astype(np.float32)
    scale = np.array([1.0, 0.5, 2.0, 0.25, 1.0])
    got = features.get("delta_spectral").compute(down, up, scale)
    expected = np.array([ref_delta_spectral(down[k].astype(np.float64), up[k].astype(np.float64), scale[k])
                         for k in range(5)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    if r == 1:  # a rank-1 product has exactly one non-zero singular value
        assert (got[:, 1:10] == 0).all()


@pytest.mark.parametrize(("r", "n_out", "n_in"), DELTA_CASES)
def test_delta_spectral_is_invariant_to_gl_r(r, n_out, n_in):
    rng = np.random.default_rng(7)
    down = rng.standard_normal((4, r, n_in))
    up = rng.standard_normal((4, n_out, r))
    g = rng.standard_normal((4, r, r)) + 3 * np.eye(r)  # well-conditioned, invertible
    moved_down, moved_up = g @ down, up @ np.linalg.inv(g)
    rep = features.get("delta_spectral")
    np.testing.assert_allclose(rep.compute(moved_down, moved_up), rep.compute(down, up), rtol=1e-7, atol=1e-12)
    # while the per-matrix features of the factors do change
    assert not np.allclose(features.get("spectral").compute(moved_down), features.get("spectral").compute(down))


def test_delta_spectral_of_a_zero_factor_is_zero():
    got = features.get("delta_spectral").compute(np.zeros((2, 1, 320)), np.ones((2, 320, 1)))
    assert got.tolist() == [[0.0] * 12] * 2


def test_unknown_representation_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown representation 'nope'; available: simple_stats, rank_based"):
        features.get("nope")


# -- the torch path (what runs on a GPU), checked on the CPU ---------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_torch_path_equals_numpy_path(shape):
    import torch

    from ablation_cli.features.matrix import compute_many

    rng = np.random.default_rng(1)
    stack = rng.standard_normal((7, *shape)).astype(np.float32) * 0.05
    stack[2] = 0.0  # degenerate: a zero matrix
    names = [n for n in MATRIX_REPS if n not in ("flat_vec", "ensemble")]
    computes = {n: features.get(n).compute for n in names}
    on_numpy = compute_many(stack, computes)
    on_torch = compute_many(stack, computes, device=torch.device("cpu"))
    for name in names:
        np.testing.assert_allclose(on_torch[name], on_numpy[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_workspace_uses_numpy_on_cpu_and_torch_on_cuda_devices():
    from ablation_cli.config import SplitConfig
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.workspace import Workspace

    ws = Workspace(DemoSource(name="d", num_samples=30, num_classes=3), SplitConfig(), None, device="cpu")
    assert ws.feature_device is None


def test_delta_spectral_uses_kohya_alpha_over_rank():
    from dataclasses import replace

    from ablation_cli.config import SplitConfig
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.data.table import LoraStream
    from ablation_cli.workspace import Workspace

    table = DemoSource(name="d", num_samples=12, num_classes=2, seed=1).load()
    module = table.layers[0].rsplit(".", 1)[0]
    alpha = np.full(12, np.nan, dtype=np.float32)
    alpha[:6] = 4.0  # rank 1: scale 4 for the first six LoRAs, absent (scale 1) for the others
    scaled = replace(table, alphas={module: alpha})

    class Fixed:
        def __init__(self, t):
            self.t = t

        def describe(self):
            return self.t.info

        def stream(self, chunk_bytes):
            return LoraStream.of(self.t)

    plain = Workspace(Fixed(table), SplitConfig(), None).features("delta_spectral", table.layers)
    with_alpha = Workspace(Fixed(scaled), SplitConfig(), None).features("delta_spectral", table.layers)
    np.testing.assert_allclose(with_alpha[:6, :12], 4 * plain[:6, :12], rtol=1e-6)  # the module's 12 columns
    np.testing.assert_array_equal(with_alpha[6:], plain[6:])
    np.testing.assert_array_equal(with_alpha[:, 12:], plain[:, 12:])  # other modules untouched


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (round to nearest even on the top 16 bits)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("rounding", ["fp16", "bf16"])
def test_histogram_bins_are_numpys_for_half_precision_weights(rounding):
    """fp16/bf16-trained LoRAs put many entries exactly on bin edges: each must land in np.histogram's bin."""
    import torch

    from ablation_cli.features.matrix import HIST_BINS, Stack, TorchStack

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((400, 1, 320)) * 0.05).astype(np.float32)
    x = x.astype(np.float16).astype(np.float32) if rounding == "fp16" else _bf16(x)
    v = x.reshape(len(x), -1).astype(np.float64)
    expected = np.stack([np.histogram(row, bins=HIST_BINS, range=(row.min(), row.max()))[0] for row in v])
    np.testing.assert_array_equal(Stack(x).hist_counts, expected)
    np.testing.assert_array_equal(TorchStack(x, torch.device("cpu")).hist_counts, expected)
    # the data does exercise the edges: the old floor((x - min) / width * 50) gives other counts for some rows
    lo, width = v.min(axis=1, keepdims=True), np.ptp(v, axis=1, keepdims=True)
    floor_bins = np.clip(np.floor((v - lo) / width * HIST_BINS).astype(int), 0, HIST_BINS - 1)
    floor_counts = np.stack([np.bincount(b, minlength=HIST_BINS) for b in floor_bins])
    assert (floor_counts != expected).any(axis=1).sum() > 0
    got = features.get("info_theoretic").compute(x)
    ref = np.array([REFERENCES["info_theoretic"](m.astype(np.float64)) for m in x])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_constant_matrix_histogram_is_numpys():
    from ablation_cli.features.matrix import Stack

    x = np.full((2, 4, 5), 0.25, dtype=np.float32)
    assert Stack(x).hist_counts[0].tolist() == np.histogram(x[0].ravel(), bins=50,
                                                            range=(0.25, 0.25))[0].tolist()
