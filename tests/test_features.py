"""Each representation against a slow, obviously correct per-matrix reference."""

from __future__ import annotations

import numpy as np
import pytest

from ablation_cli import features
from ablation_cli.data.layers import sd15_layers

SHAPES = [(1, 320), (1280, 1), (1, 768), (4, 64), (7, 5)]


def _skew_kurt(x):
    z = (x - x.mean()) / (x.std(ddof=1) + 1e-8)
    return np.mean(z**3), np.mean(z**4)


def ref_simple_stats(m):
    x = m.ravel()
    return [np.linalg.norm(m), x.mean(), x.std(ddof=1), x.max(), x.min()]


def ref_rank_based(m):
    p = [np.percentile(m.ravel(), q) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)]
    return [*p, p[5] - p[3], p[8] - p[0]]


def ref_stats(m):
    x = m.ravel()
    return [x.mean(), x.std(ddof=1), np.median(x), x.min(), x.max(), *_skew_kurt(x)]


def _svals(m):
    s = np.linalg.svd(m, compute_uv=False)
    return np.where(s > s.max() * max(m.shape) * np.finfo(np.float64).eps, s, 0.0)  # numpy's rank tolerance


def ref_spectral(m):
    s = list(_svals(m)[:10])
    s += [0.0] * (10 - len(s))
    s = np.array(s)
    total = s.sum()
    p = s / total if total > 0 else np.zeros(10)
    gaps = [(s[i] - s[i + 1]) / s[i] if s[i] > 0 else 0.0 for i in range(9)]
    entropy = -sum(v * np.log(v) for v in p if v > 0)
    nonzero = [v for v in s if v > 0]
    cond = s[0] / min(nonzero) if nonzero else 1.0
    return [*s, *p, *gaps, entropy, cond, total]


def ref_matrix_norms(m):
    fro = np.linalg.norm(m, "fro")
    nuc = _svals(m).sum()
    spec = np.linalg.norm(m, 2)
    return [fro, nuc, spec, np.linalg.norm(m, 1), np.linalg.norm(m, np.inf), nuc / fro, spec / fro]


def ref_distribution(m):
    x = m.ravel()
    q = [np.percentile(x, v) for v in (5, 10, 25, 50, 75, 90, 95)]
    mad = np.mean(np.abs(x - x.mean()))
    cv = x.std(ddof=1) / (abs(x.mean()) + 1e-8)
    return [*q, q[4] - q[2], mad, cv, *_skew_kurt(x)]


def ref_frequency(m):
    mag = np.abs(np.fft.fft2(m)).ravel()
    top = sorted(mag, reverse=True)[:10]
    energy = sum(v**2 for v in top) / np.sum(mag**2)
    return [*top, mag.mean(), mag.std(ddof=1), mag.max(), energy]


def ref_info_theoretic(m):
    counts, _ = np.histogram(m.ravel(), bins=50, range=(m.min(), m.max()))
    p = counts / m.size
    h = -sum(v * np.log(v) for v in p if v > 0)
    return [h, h / np.log(50)]


def ref_ensemble(m):
    return [*ref_spectral(m), *ref_matrix_norms(m), *ref_distribution(m), *ref_frequency(m), *ref_info_theoretic(m)]


REFERENCES = {name: globals()[f"ref_{name}"] for name in features.available()}


def test_every_registered_representation_has_a_reference():
    assert set(REFERENCES) == set(features.available())


@pytest.mark.parametrize("name", features.available())
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_matches_per_matrix_reference(name, shape):
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((6, *shape)).astype(np.float32) * 0.05
    stack[1] *= 10.0
    rep = features.get(name)
    got = rep.compute(stack)
    assert got.shape == (6, rep.dim_per_layer)
    expected = np.array([REFERENCES[name](m.astype(np.float64)) for m in stack])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", features.available())
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


def test_unknown_representation_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown representation 'nope'; available: simple_stats, rank_based"):
        features.get("nope")
