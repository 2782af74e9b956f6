"""Registry of representations keyed by name.

Bump a representation's ``version`` whenever its math changes: the version is
part of every checkpoint fingerprint, so old results become stale, not reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ablation_cli.features import matrix


@dataclass(frozen=True)
class Representation:
    name: str
    version: int
    dim_per_layer: int
    compute: Callable[[np.ndarray], np.ndarray]  # (N, out, in) -> (N, dim_per_layer)
    description: str
    parts: tuple[str, ...] = ()  # a composite is the per-layer concatenation of these


# In DOMAIN.md order: this is the default grid order.
_REGISTRY: dict[str, Representation] = {
    r.name: r
    for r in (
        Representation("simple_stats", 1, 5, matrix.simple_stats, "Frobenius norm, mean, std, max, min"),
        Representation("rank_based", 1, 11, matrix.rank_based, "9 percentiles, IQR, 1-99 range"),
        Representation("stats", 1, 7, matrix.stats, "mean, std, median, min, max, skewness, kurtosis"),
        Representation("spectral", 1, 32, matrix.spectral, "top-10 singular values, normalised, gaps, entropy, ..."),
        Representation("matrix_norms", 1, 7, matrix.matrix_norms, "Frobenius, nuclear, spectral, 1/inf norms, ratios"),
        Representation("distribution", 1, 12, matrix.distribution, "7 quantiles, IQR, MAD, CV, skewness, kurtosis"),
        Representation("frequency", 1, 14, matrix.frequency, "2-D FFT magnitudes: top-10, mean, std, max, energy"),
        Representation("info_theoretic", 1, 2, matrix.info_theoretic, "50-bin histogram entropy, normalised"),
        Representation("ensemble", 1, 67, matrix.ensemble, "spectral + matrix_norms + distribution + frequency + info",
                       parts=("spectral", "matrix_norms", "distribution", "frequency", "info_theoretic")),
    )
}


def available() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Representation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown representation '{name}'; available: {', '.join(_REGISTRY)}") from None
