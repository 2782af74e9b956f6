"""Batched per-matrix features, following the precise conventions of docs/representations.md.

Every representation takes a stack ``x`` of shape (N, out, in) and returns (N, F), computed in
float64 with no per-sample Python loop. :func:`compute_many` computes several representations of
one stack in a single pass: the sorted entries (percentiles, quantiles, median), the moments, the
singular values and the FFT magnitudes are each computed once and shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np

EPS = 1e-8
TOP_K = 10
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
QUANTILES = (5, 10, 25, 50, 75, 90, 95)
HIST_BINS = 50


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _top_k(values: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The k largest of each row, descending, zero-padded when a row has fewer."""
    m = values.shape[1]
    take = min(k, m)
    top = -np.sort(-values, axis=1)[:, :take]
    return np.pad(top, ((0, 0), (0, k - take)))


def _entropy(p: np.ndarray) -> np.ndarray:
    """-sum p ln p over p > 0, per row."""
    plogp = np.zeros_like(p)
    np.multiply(p, np.log(p, where=p > 0, out=np.zeros_like(p)), out=plogp, where=p > 0)
    return -plogp.sum(axis=1)


class Stack:
    """One (N, out, in) stack and the intermediates its representations share, each computed once."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self.n = self.x.shape[0]
        self.v = self.x.reshape(self.n, -1)  # (N, m) entries

    @cached_property
    def sorted(self) -> np.ndarray:
        return np.sort(self.v, axis=1)

    def percentiles(self, qs: Sequence[float]) -> np.ndarray:
        """numpy's default (linear) percentiles from the sorted entries, (N, len(qs))."""
        s = self.sorted
        m = s.shape[1]
        pos = np.asarray(qs, dtype=np.float64) / 100.0 * (m - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, m - 1)
        t = pos - lo
        a, b = s[:, lo], s[:, hi]
        # numpy's lerp: a + (b - a) t, computed from the nearer end for accuracy
        return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)

    @cached_property
    def mean(self) -> np.ndarray:
        return self.v.mean(axis=1)

    @cached_property
    def centered(self) -> np.ndarray:
        return self.v - self.mean[:, None]

    @cached_property
    def std(self) -> np.ndarray:
        """Sample std (ddof=1)."""
        c = self.centered
        return np.sqrt(np.einsum("ij,ij->i", c, c) / max(self.v.shape[1] - 1, 1))

    @cached_property
    def skew_kurt(self) -> tuple[np.ndarray, np.ndarray]:
        """mean z^3 and mean z^4 with z = (x - mean) / (std + 1e-8); kurtosis is not excess."""
        z = self.centered / (self.std[:, None] + EPS)
        z2 = z * z
        return (z2 * z).mean(axis=1), (z2 * z2).mean(axis=1)

    @cached_property
    def min(self) -> np.ndarray:
        return self.sorted[:, 0] if "sorted" in self.__dict__ else self.v.min(axis=1)

    @cached_property
    def max(self) -> np.ndarray:
        return self.sorted[:, -1] if "sorted" in self.__dict__ else self.v.max(axis=1)

    @cached_property
    def fro(self) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->i", self.v, self.v))

    @cached_property
    def singular_values(self) -> np.ndarray:
        """All singular values, descending, (N, min(out, in)).

        Values below numpy's rank tolerance (s_1 * max(out, in) * eps) are round-off of a
        rank-deficient matrix and set to exactly 0, so that a rank-1 matrix has one singular
        value and the condition number never divides by ~1e-16. A vector (one row or column)
        has one singular value, its norm: no SVD is needed.
        """
        out_dim, in_dim = self.x.shape[1:]
        if min(out_dim, in_dim) == 1:
            return self.fro[:, None].copy()
        s = np.linalg.svd(self.x, compute_uv=False)
        tol = s[:, :1] * max(out_dim, in_dim) * np.finfo(np.float64).eps
        return np.where(s > tol, s, 0.0)

    @cached_property
    def abs_sum_maxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Largest column and row sums of |x| (the 1- and inf-norms)."""
        a = np.abs(self.x)
        return a.sum(axis=1).max(axis=1), a.sum(axis=2).max(axis=1)

    @cached_property
    def mad(self) -> np.ndarray:
        return np.abs(self.centered).mean(axis=1)

    @cached_property
    def fft_summary(self) -> tuple[np.ndarray, np.ndarray]:
        """Top-10 magnitudes of the full 2-D FFT (N, 10), and their mean, std, max, top-10 energy share (N, 4)."""
        mag = np.abs(np.fft.fft2(self.x)).reshape(self.n, -1)
        top = _top_k(mag)
        energy = _safe_div((top**2).sum(axis=1), np.einsum("ij,ij->i", mag, mag))
        return top, np.stack([mag.mean(axis=1), mag.std(axis=1, ddof=1), mag.max(axis=1), energy], axis=1)

    @cached_property
    def hist_counts(self) -> np.ndarray:
        """Counts of a 50-bin equal-width histogram over [min, max] of each matrix, (N, 50), bin for bin
        those of ``np.histogram(m, bins=50, range=(m.min(), m.max()))``."""
        lo, hi, edges = hist_edges(self.min, self.max)
        bins = ((self.v - lo[:, None]) / (hi - lo)[:, None] * HIST_BINS).astype(np.intp)
        bins[bins == HIST_BINS] -= 1
        # as np.histogram: the division can land one ULP off a bin edge; the edges decide
        bins[self.v < np.take_along_axis(edges, bins, axis=1)] -= 1
        bins[(self.v >= np.take_along_axis(edges, bins + 1, axis=1)) & (bins != HIST_BINS - 1)] += 1
        offsets = (np.arange(self.n) * HIST_BINS)[:, None]
        return np.bincount((bins + offsets).ravel(), minlength=self.n * HIST_BINS).reshape(self.n, HIST_BINS)


def hist_edges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.histogram's range and bin edges per row: [min, max], widened by 0.5 each way when min == max."""
    same = lo == hi
    lo, hi = np.where(same, lo - 0.5, lo), np.where(same, hi + 0.5, hi)
    return lo, hi, np.linspace(lo, hi, HIST_BINS + 1, axis=1)


class TorchStack(Stack):
    """The same intermediates computed with torch on a device (float64); results come back as numpy.

    Used when features are computed on a GPU. Every quantity the representations read is
    overridden, so the (N, m) entries never return to the host: only the small summaries do.
    """

    def __init__(self, x: np.ndarray, device: Any) -> None:
        import torch  # the GPU path only

        self.torch = torch
        self.n = x.shape[0]
        self.shape = tuple(x.shape[1:])
        self.t = torch.as_tensor(np.asarray(x)).to(device=device, dtype=torch.float64)
        self.tv = self.t.reshape(self.n, -1)

    def _np(self, t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()

    @cached_property
    def _sorted(self) -> Any:
        return self.torch.sort(self.tv, dim=1).values

    def percentiles(self, qs: Sequence[float]) -> np.ndarray:
        s = self._sorted
        m = s.shape[1]
        pos = np.asarray(qs, dtype=np.float64) / 100.0 * (m - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, m - 1)
        t = self.torch.as_tensor(pos - lo, device=s.device)
        a, b = s[:, lo], s[:, hi]
        return self._np(self.torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t))

    @cached_property
    def _mean(self) -> Any:
        return self.tv.mean(dim=1)

    @cached_property
    def _centered(self) -> Any:
        return self.tv - self._mean[:, None]

    @cached_property
    def _std(self) -> Any:
        c = self._centered
        return self.torch.sqrt((c * c).sum(dim=1) / max(self.tv.shape[1] - 1, 1))

    @cached_property
    def mean(self) -> np.ndarray:
        return self._np(self._mean)

    @cached_property
    def std(self) -> np.ndarray:
        return self._np(self._std)

    @cached_property
    def skew_kurt(self) -> tuple[np.ndarray, np.ndarray]:
        z = self._centered / (self._std[:, None] + EPS)
        z2 = z * z
        return self._np((z2 * z).mean(dim=1)), self._np((z2 * z2).mean(dim=1))

    @cached_property
    def _min(self) -> Any:
        return self.tv.amin(dim=1)

    @cached_property
    def _max(self) -> Any:
        return self.tv.amax(dim=1)

    @cached_property
    def min(self) -> np.ndarray:
        return self._np(self._min)

    @cached_property
    def max(self) -> np.ndarray:
        return self._np(self._max)

    @cached_property
    def fro(self) -> np.ndarray:
        return self._np(self.torch.sqrt((self.tv * self.tv).sum(dim=1)))

    @cached_property
    def singular_values(self) -> np.ndarray:
        out_dim, in_dim = self.shape
        if min(out_dim, in_dim) == 1:
            return self.fro[:, None].copy()
        s = self._np(self.torch.linalg.svdvals(self.t))
        tol = s[:, :1] * max(out_dim, in_dim) * np.finfo(np.float64).eps
        return np.where(s > tol, s, 0.0)

    @cached_property
    def abs_sum_maxes(self) -> tuple[np.ndarray, np.ndarray]:
        a = self.t.abs()
        return self._np(a.sum(dim=1).amax(dim=1)), self._np(a.sum(dim=2).amax(dim=1))

    @cached_property
    def mad(self) -> np.ndarray:
        return self._np(self._centered.abs().mean(dim=1))

    @cached_property
    def fft_summary(self) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        mag = torch.fft.fft2(self.t).abs().reshape(self.n, -1)
        k = min(TOP_K, mag.shape[1])
        top = torch.zeros((self.n, TOP_K), dtype=mag.dtype, device=mag.device)
        top[:, :k] = torch.topk(mag, k, dim=1).values
        sq = (mag * mag).sum(dim=1)
        top_sq = (top * top).sum(dim=1)
        energy = torch.where(sq != 0, top_sq / torch.where(sq != 0, sq, 1.0), 0.0)
        extra = torch.stack([mag.mean(dim=1), mag.std(dim=1, correction=1), mag.amax(dim=1), energy], dim=1)
        return self._np(top), self._np(extra)

    @cached_property
    def hist_counts(self) -> np.ndarray:
        torch = self.torch
        lo, hi, edges = (torch.as_tensor(a, device=self.tv.device) for a in hist_edges(self.min, self.max))
        bins = ((self.tv - lo[:, None]) / (hi - lo)[:, None] * HIST_BINS).long()
        bins = torch.where(bins == HIST_BINS, bins - 1, bins)
        bins = torch.where(self.tv < torch.gather(edges, 1, bins), bins - 1, bins)
        bins = torch.where((self.tv >= torch.gather(edges, 1, bins + 1)) & (bins != HIST_BINS - 1), bins + 1, bins)
        offsets = (torch.arange(self.n, device=bins.device) * HIST_BINS)[:, None]
        counts = torch.bincount((bins + offsets).reshape(-1), minlength=self.n * HIST_BINS)
        return self._np(counts.reshape(self.n, HIST_BINS))


def _simple_stats(st: Stack) -> np.ndarray:
    return np.stack([st.fro, st.mean, st.std, st.max, st.min], axis=1)


def _rank_based(st: Stack) -> np.ndarray:
    p = st.percentiles(PERCENTILES)  # (N, 9)
    return np.concatenate([p, (p[:, 5] - p[:, 3])[:, None], (p[:, 8] - p[:, 0])[:, None]], axis=1)


def _stats(st: Stack) -> np.ndarray:
    skew, kurt = st.skew_kurt
    median = st.percentiles((50,))[:, 0]
    return np.stack([st.mean, st.std, median, st.min, st.max, skew, kurt], axis=1)


def _spectral(st: Stack) -> np.ndarray:
    s = _top_k(st.singular_values)  # (N, 10), zero-padded
    total = s.sum(axis=1, keepdims=True)
    p = _safe_div(s, total)
    gaps = _safe_div(s[:, :-1] - s[:, 1:], s[:, :-1])
    smallest = np.where(s > 0, s, np.inf).min(axis=1)
    finite = np.isfinite(smallest)
    condition = np.where(finite, _safe_div(s[:, 0], np.where(finite, smallest, 1.0)), 1.0)
    return np.concatenate([s, p, gaps, _entropy(p)[:, None], condition[:, None], total], axis=1)


def _matrix_norms(st: Stack) -> np.ndarray:
    s = st.singular_values
    fro, nuclear, spec = st.fro, s.sum(axis=1), s[:, 0]
    max_col, max_row = st.abs_sum_maxes
    return np.stack([fro, nuclear, spec, max_col, max_row, _safe_div(nuclear, fro), _safe_div(spec, fro)], axis=1)


def _distribution(st: Stack) -> np.ndarray:
    q = st.percentiles(QUANTILES)  # (N, 7)
    skew, kurt = st.skew_kurt
    iqr = q[:, 4] - q[:, 2]
    mad = st.mad
    cv = st.std / (np.abs(st.mean) + EPS)
    return np.concatenate([q, np.stack([iqr, mad, cv, skew, kurt], axis=1)], axis=1)


def _frequency(st: Stack) -> np.ndarray:
    top, extra = st.fft_summary
    return np.concatenate([top, extra], axis=1)


def _info_theoretic(st: Stack) -> np.ndarray:
    counts = st.hist_counts
    entropy = _entropy(counts / counts.sum(axis=1, keepdims=True))
    return np.stack([entropy, entropy / np.log(HIST_BINS)], axis=1)


def _ensemble(st: Stack) -> np.ndarray:
    return np.concatenate([_spectral(st), _matrix_norms(st), _distribution(st), _frequency(st),
                           _info_theoretic(st)], axis=1)


_ON_STACK: dict[str, Callable[[Stack], np.ndarray]] = {
    "simple_stats": _simple_stats, "rank_based": _rank_based, "stats": _stats, "spectral": _spectral,
    "matrix_norms": _matrix_norms, "distribution": _distribution, "frequency": _frequency,
    "info_theoretic": _info_theoretic, "ensemble": _ensemble,
}


def compute_many(x: np.ndarray, computes: dict[str, Callable[[np.ndarray], np.ndarray]],
                 device: Any = None) -> dict[str, np.ndarray]:
    """Several per-matrix representations of one stack in one pass. The built-in ones share the
    stack's intermediates, computed with numpy, or with torch on ``device`` when one is given; any
    other function is simply called on the stack."""
    st = Stack(x) if device is None else TorchStack(x, device)
    out = {}
    for name, fn in computes.items():
        on_stack = getattr(fn, "on_stack", None)
        out[name] = on_stack(st) if on_stack is not None else fn(x)
    return out


def _single(name: str) -> Callable[[np.ndarray], np.ndarray]:
    def compute(x: np.ndarray) -> np.ndarray:
        return _ON_STACK[name](Stack(x))

    compute.__name__ = name
    compute.on_stack = _ON_STACK[name]  # type: ignore[attr-defined]
    return compute


simple_stats = _single("simple_stats")
rank_based = _single("rank_based")
stats = _single("stats")
spectral = _single("spectral")
matrix_norms = _single("matrix_norms")
distribution = _single("distribution")
frequency = _single("frequency")
info_theoretic = _single("info_theoretic")
ensemble = _single("ensemble")


def flat_vec(x: np.ndarray) -> np.ndarray:
    """Every entry, row-major: the raw weights (float32 kept, nothing to compute)."""
    return np.asarray(x).reshape(x.shape[0], -1)


def delta_spectral(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Per module: top-10 singular values of dW = up @ down * scale (zero-padded), Frobenius and nuclear norm.

    ``down`` is (N, r, in), ``up`` (N, out, r). dW is never formed: with up = Q_u R_u and
    down^T = Q_d R_d (thin QR), dW = Q_u (R_u R_d^T) Q_d^T * scale, and Q_u, Q_d have orthonormal
    columns, so dW's singular values are those of the r x r core R_u R_d^T times |scale|. They
    are therefore invariant to the GL(r) reparametrisation down -> G down, up -> up G^-1.
    """
    d = np.asarray(down, dtype=np.float64)
    u = np.asarray(up, dtype=np.float64)
    n, _, n_in = d.shape
    n_out = u.shape[1]
    r_u = np.linalg.qr(u, mode="r")  # (N, r, r) when out >= r; (N, out, r) otherwise
    r_d = np.linalg.qr(np.swapaxes(d, 1, 2), mode="r")
    core = r_u @ np.swapaxes(r_d, 1, 2)
    s = np.linalg.svd(core, compute_uv=False) * np.abs(np.broadcast_to(np.asarray(scale, np.float64), (n,)))[:, None]
    tol = s[:, :1] * max(n_out, n_in) * np.finfo(np.float64).eps  # numpy's rank tolerance for dW itself
    s = np.where(s > tol, s, 0.0)
    fro = np.sqrt((s**2).sum(axis=1))
    return np.concatenate([_top_k(s), fro[:, None], s.sum(axis=1)[:, None]], axis=1)
