"""Batched per-matrix features, following the precise conventions of DOMAIN.md.

Every function takes a stack ``x`` of shape (N, out, in) and returns (N, F),
computed in float64 with no per-sample Python loop.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8
TOP_K = 10
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
QUANTILES = (5, 10, 25, 50, 75, 90, 95)
HIST_BINS = 50


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _moments(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mean, sample std (ddof=1), skewness, kurtosis (mean z^3, mean z^4; not excess)."""
    mean, std = _mean_std(v)
    z = (v - mean[:, None]) / (std[:, None] + EPS)
    z2 = z * z
    return mean, std, (z2 * z).mean(axis=1), (z2 * z2).mean(axis=1)


def _mean_std(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean and sample std (ddof=1)."""
    return v.mean(axis=1), v.std(axis=1, ddof=1)


def _singular_values(x: np.ndarray) -> np.ndarray:
    """All singular values, descending, (N, min(out, in)).

    Values below numpy's rank tolerance (s_1 * max(out, in) * eps) are round-off of
    a rank-deficient matrix and set to exactly 0, so that a rank-1 matrix has one
    singular value and the condition number never divides by ~1e-16.
    """
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    tol = s[:, :1] * max(x.shape[1:]) * np.finfo(np.float64).eps
    return np.where(s > tol, s, 0.0)


def _top_k(values: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The k largest of each row, descending, zero-padded when a row has fewer."""
    m = values.shape[1]
    take = min(k, m)
    top = -np.sort(-values, axis=1)[:, :take]
    return np.pad(top, ((0, 0), (0, k - take)))


def simple_stats(x: np.ndarray) -> np.ndarray:
    v = _flat(x)
    mean, std = _mean_std(v)
    fro = np.sqrt(np.einsum("ij,ij->i", v, v))
    return np.stack([fro, mean, std, v.max(axis=1), v.min(axis=1)], axis=1)


def rank_based(x: np.ndarray) -> np.ndarray:
    p = np.percentile(_flat(x), PERCENTILES, axis=1).T  # (N, 9)
    iqr = p[:, 5] - p[:, 3]
    spread = p[:, 8] - p[:, 0]
    return np.concatenate([p, iqr[:, None], spread[:, None]], axis=1)


def stats(x: np.ndarray) -> np.ndarray:
    v = _flat(x)
    mean, std, skew, kurt = _moments(v)
    return np.stack([mean, std, np.median(v, axis=1), v.min(axis=1), v.max(axis=1), skew, kurt], axis=1)


def spectral(x: np.ndarray) -> np.ndarray:
    s = _top_k(_singular_values(x))  # (N, 10), zero-padded
    total = s.sum(axis=1, keepdims=True)
    p = _safe_div(s, total)
    gaps = _safe_div(s[:, :-1] - s[:, 1:], s[:, :-1])
    plogp = np.zeros_like(p)
    np.multiply(p, np.log(p, where=p > 0, out=np.zeros_like(p)), out=plogp, where=p > 0)
    entropy = -plogp.sum(axis=1)
    smallest = np.where(s > 0, s, np.inf).min(axis=1)
    condition = np.where(np.isfinite(smallest), _safe_div(s[:, 0], np.where(np.isfinite(smallest), smallest, 1.0)), 1.0)
    return np.concatenate([s, p, gaps, entropy[:, None], condition[:, None], total], axis=1)


def matrix_norms(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    s = _singular_values(a)
    fro = np.sqrt((a**2).sum(axis=(1, 2)))
    nuclear = s.sum(axis=1)
    spec = s[:, 0]
    max_col = np.abs(a).sum(axis=1).max(axis=1)
    max_row = np.abs(a).sum(axis=2).max(axis=1)
    return np.stack(
        [fro, nuclear, spec, max_col, max_row, _safe_div(nuclear, fro), _safe_div(spec, fro)], axis=1
    )


def distribution(x: np.ndarray) -> np.ndarray:
    v = _flat(x)
    q = np.percentile(v, QUANTILES, axis=1).T  # (N, 7)
    mean, std, skew, kurt = _moments(v)
    iqr = q[:, 4] - q[:, 2]
    mad = np.abs(v - mean[:, None]).mean(axis=1)
    cv = std / (np.abs(mean) + EPS)
    return np.concatenate([q, np.stack([iqr, mad, cv, skew, kurt], axis=1)], axis=1)


def frequency(x: np.ndarray) -> np.ndarray:
    mag = np.abs(np.fft.fft2(np.asarray(x, dtype=np.float64))).reshape(x.shape[0], -1)
    top = _top_k(mag)
    energy = _safe_div((top**2).sum(axis=1), (mag**2).sum(axis=1))
    extra = np.stack([mag.mean(axis=1), mag.std(axis=1, ddof=1), mag.max(axis=1), energy], axis=1)
    return np.concatenate([top, extra], axis=1)


def info_theoretic(x: np.ndarray) -> np.ndarray:
    v = _flat(x)
    n, m = v.shape
    lo = v.min(axis=1, keepdims=True)
    width = v.max(axis=1, keepdims=True) - lo
    scaled = _safe_div(v - lo, width) * HIST_BINS
    bins = np.clip(np.floor(scaled).astype(np.int64), 0, HIST_BINS - 1)
    offsets = (np.arange(n) * HIST_BINS)[:, None]
    counts = np.bincount((bins + offsets).ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
    p = counts / m
    plogp = np.zeros_like(p)
    np.multiply(p, np.log(p, where=p > 0, out=np.zeros_like(p)), out=plogp, where=p > 0)
    entropy = -plogp.sum(axis=1)
    return np.stack([entropy, entropy / np.log(HIST_BINS)], axis=1)


def ensemble(x: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [spectral(x), matrix_norms(x), distribution(x), frequency(x), info_theoretic(x)], axis=1
    )
