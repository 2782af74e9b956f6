"""Slow, obviously correct per-matrix references of every representation.

One matrix at a time, plain numpy, written to read like docs/representations.md. The tests check the
batched implementations against these; scripts/bench_features.py times them as the
per-sample loop the original code ran.
"""

from __future__ import annotations

import numpy as np


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
    top = list(_svals(m)[:10])
    s = np.array(top + [0.0] * (10 - len(top)))
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




def ref_flat_vec(m):
    return list(m.ravel())


def ref_delta_spectral(down, up, scale=1.0):
    """Singular values of the explicit product dW = up @ down * scale (full SVD), top 10 padded,
    then the Frobenius and nuclear norms of dW."""
    dw = (up @ down) * scale
    s = np.linalg.svd(dw, compute_uv=False)
    s = np.where(s > s.max(initial=0.0) * max(dw.shape) * np.finfo(np.float64).eps, s, 0.0)
    top = list(s[:10]) + [0.0] * max(0, 10 - len(s))
    return [*top, np.linalg.norm(dw, "fro"), s.sum()]



def _dw(down, up, scale):
    return (np.asarray(up, np.float64) @ np.asarray(down, np.float64)) * scale


def ref_delta_canonical(down, up, scale=1.0, k=4):
    """dW formed explicitly and decomposed by a full SVD; each (u_i, v_i) flipped so that u_i's entry of
    largest magnitude (the first such) is positive; s_i, sqrt(s_i) u_i, sqrt(s_i) v_i for the top k."""
    dw = _dw(down, up, scale)
    u, s, vt = np.linalg.svd(dw)
    kk = min(k, down.shape[0], *dw.shape)
    s = np.where(s > s.max(initial=0.0) * max(dw.shape) * np.finfo(np.float64).eps, s, 0.0)
    values, lefts, rights = [], [], []
    for i in range(kk):
        sign = -1.0 if u[np.argmax(np.abs(u[:, i])), i] < 0 else 1.0
        values.append(s[i])
        lefts.extend(np.sqrt(s[i]) * sign * u[:, i])
        rights.extend(np.sqrt(s[i]) * sign * vt[i])
    return [*values, *lefts, *rights]


def ref_delta_sketch(down, up, scale=1.0, unit="", k=8):
    """S1 dW S2^T with dW formed explicitly, the module's seeded sketches."""
    from ablation_cli.features.invariant import sketches

    dw = _dw(down, up, scale)
    s1, s2 = sketches(unit, dw.shape[0], dw.shape[1], k)
    return list((s1 @ dw @ s2.T).ravel())


# Per-matrix representations (the per-module delta_* ones are separate: they need both factors).
REFERENCES = {name[4:]: fn for name, fn in dict(globals()).items()
              if name.startswith("ref_") and not name.startswith("ref_delta_")}
