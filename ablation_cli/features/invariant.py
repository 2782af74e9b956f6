"""Per-module representations that are invariant to the LoRA factors' GL(r) symmetry by construction.

A module's update is dW = s * up @ down (s = alpha / r), and (up G^-1, G down) gives the same dW for
any invertible r x r matrix G. Both representations here are functions of dW alone, computed from the
factors without forming dW (docs/invariance.md; formulas in docs/representations.md):

- :func:`delta_canonical`: the canonical form of dW from its r x r core (QR of both factors, SVD of
  the core): the top k singular values and the singular vectors scaled by their square roots, with
  one sign rule. For rank 1 it is a complete invariant: (sigma, sign * b / |b|, sign * a / |a|).
- :func:`delta_sketch`: a fixed random sketch S1 dW S2^T (k x k), as (S1 up)(down S2^T) * s, with
  Gaussian sketches seeded by the module's name: its cost is that of the factors.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

CANONICAL_K = 4  # singular directions kept per module (at most the rank)
SKETCH_K = 8  # the sketch's side


def _scale(scale: np.ndarray | float, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,)).copy()


def canonical_k(rank: int, d_out: int, d_in: int, k: int = CANONICAL_K) -> int:
    """Directions kept: k, at most the rank (and the sides, for a factor wider than the matrix)."""
    return min(rank, d_out, d_in, k)


def canonical_names(down_shape: tuple[int, ...], up_shape: tuple[int, ...], k: int = CANONICAL_K) -> list[str]:
    """s1..sk, then u1_0.. (the scaled left vectors, d_out each), then v1_0.. (right, d_in each)."""
    rank, d_in = down_shape
    d_out = up_shape[0]
    kk = canonical_k(rank, d_out, d_in, k)
    return ([f"s{i}" for i in range(1, kk + 1)]
            + [f"u{i}_{j}" for i in range(1, kk + 1) for j in range(d_out)]
            + [f"v{i}_{j}" for i in range(1, kk + 1) for j in range(d_in)])


def delta_canonical(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float = 1.0,
                    k: int = CANONICAL_K) -> np.ndarray:
    """(N, kk + kk * d_out + kk * d_in): singular values s_i of dW, sqrt(s_i) u_i and sqrt(s_i) v_i.

    up = Q_u R_u and down^T = Q_d R_d (thin QR); the core C = s R_u R_d^T is r x r and
    dW = Q_u C Q_d^T, so C = U S V^T gives dW's singular triplets (S, Q_u U, Q_d V). Each pair
    (u_i, v_i) is flipped so that the entry of u_i with the largest magnitude is positive (ties:
    the lowest index). Directions below numpy's rank tolerance are zero.
    """
    d = np.asarray(down, dtype=np.float64)
    u = np.asarray(up, dtype=np.float64)
    n, rank, d_in = d.shape
    d_out = u.shape[1]
    kk = canonical_k(rank, d_out, d_in, k)
    q_u, r_u = np.linalg.qr(u)  # (N, out, r), (N, r, r) for out >= r
    q_d, r_d = np.linalg.qr(np.swapaxes(d, 1, 2))
    core = (r_u @ np.swapaxes(r_d, 1, 2)) * _scale(scale, n)[:, None, None]
    cu, s, cvt = np.linalg.svd(core)
    left = (q_u @ cu)[:, :, :kk]  # (N, out, kk)
    right = (q_d @ np.swapaxes(cvt, 1, 2))[:, :, :kk]  # (N, in, kk)
    s = s[:, :kk]
    tol = s[:, :1] * max(d_out, d_in) * np.finfo(np.float64).eps
    s = np.where(s > tol, s, 0.0)
    biggest = np.take_along_axis(left, np.abs(left).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]  # (N, kk)
    sign = np.where(biggest < 0, -1.0, 1.0)
    root = np.sqrt(s) * sign
    left = left * root[:, None, :]
    right = right * root[:, None, :]
    return np.concatenate([s, np.swapaxes(left, 1, 2).reshape(n, -1), np.swapaxes(right, 1, 2).reshape(n, -1)],
                          axis=1)


def module_seed(module: str) -> int:
    """A module's sketch seed: the first 8 bytes of the sha256 of its canonical name."""
    return int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "little")


@lru_cache(maxsize=512)
def sketches(module: str, d_out: int, d_in: int, k: int = SKETCH_K) -> tuple[np.ndarray, np.ndarray]:
    """S1 (k, d_out) and S2 (k, d_in), entries N(0, 1/k), the same for a module wherever it is drawn."""
    rng = np.random.default_rng(module_seed(module))
    s1 = rng.normal(0.0, 1.0 / np.sqrt(k), size=(k, d_out))
    s2 = rng.normal(0.0, 1.0 / np.sqrt(k), size=(k, d_in))
    s1.flags.writeable = s2.flags.writeable = False
    return s1, s2


def sketch_names(k: int = SKETCH_K) -> list[str]:
    return [f"k{i}_{j}" for i in range(k) for j in range(k)]


def delta_sketch(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float = 1.0, *, unit: str,
                 k: int = SKETCH_K) -> np.ndarray:
    """(N, k * k): s * (S1 up)(down S2^T), row-major; O(k r (d_out + d_in)) per LoRA, dW never formed."""
    d = np.asarray(down, dtype=np.float64)
    u = np.asarray(up, dtype=np.float64)
    n = d.shape[0]
    s1, s2 = sketches(unit, u.shape[1], d.shape[2], k)
    left = np.einsum("ko,nor->nkr", s1, u)  # (N, k, r)
    right = np.einsum("nri,ji->nrj", d, s2)  # (N, r, k)
    return ((left @ right) * _scale(scale, n)[:, None, None]).reshape(n, k * k)
