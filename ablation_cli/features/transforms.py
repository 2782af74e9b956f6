"""Reparametrisations of LoRA factors that leave every module's update dW = (alpha / r) up @ down unchanged.

``ablate audit invariance`` applies them to a dataset (:class:`TransformedSource`) and measures how much
each representation moves; a representation flagged ``invariant`` must not move beyond float round-off.

- ``gl``: up -> up R, down -> R^-1 down with R = Q D, Q a random orthogonal r x r matrix and D diagonal
  with random signs and magnitudes 10^u, u uniform in [-1, 1] (so |D| in [0.1, 10]).
- ``scale``: up -> c up, down -> down / c with c = 10^u, u uniform in [-2, 2] (rank 1: any c).
- ``sign``: c = -1.
- ``alpha``: alpha -> c alpha, up -> up / c with c = 10^u, u uniform in [-2, 2]: the scale moves
  between alpha and the factors (a LoRA that stores no alpha has alpha = r).

Each LoRA gets its own draw, from a generator seeded by (seed, transform, module, first row of the
chunk), so a dataset is transformed the same way every time it is read. The transformed factors are
float64: the audit measures the representations, not float32 storage.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ablation_cli.data.table import DatasetInfo, DatasetSource, LoraChunk, LoraStream, LoraTable, collect
from ablation_cli.features.invariant import module_seed

TRANSFORMS = ("gl", "scale", "sign", "alpha")


def _log_uniform(rng: np.random.Generator, n: int, decades: float) -> np.ndarray:
    return 10.0 ** rng.uniform(-decades, decades, size=n)


def gl_matrices(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """(n, r, r) well-conditioned random R = Q D (condition number at most 100)."""
    q, tri = np.linalg.qr(rng.standard_normal((n, rank, rank)))
    q = q * np.sign(np.diagonal(tri, axis1=1, axis2=2))[:, None, :]  # Haar-distributed Q
    d = rng.choice([-1.0, 1.0], size=(n, rank)) * _log_uniform(rng, n * rank, 1.0).reshape(n, rank)
    return q * d[:, None, :]


def reparametrise(name: str, down: np.ndarray, up: np.ndarray, alpha: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One module's factors (N, r, in), (N, out, r) and alphas (N,) after transform ``name``."""
    d, u, a = (np.asarray(v, dtype=np.float64) for v in (down, up, alpha))
    n, rank = d.shape[0], d.shape[1]
    if name == "gl":
        r = gl_matrices(rng, n, rank)
        return np.linalg.solve(r, d), u @ r, a
    if name in ("scale", "sign"):
        c = _log_uniform(rng, n, 2.0) if name == "scale" else -np.ones(n)
        return d / c[:, None, None], u * c[:, None, None], a
    if name == "alpha":
        c = _log_uniform(rng, n, 2.0)
        return d, u / c[:, None, None], a * c
    raise ValueError(f"unknown transform '{name}' (allowed: {', '.join(TRANSFORMS)})")


def transform_chunk(chunk: LoraChunk, name: str, seed: int, first_row: int) -> LoraChunk:
    """Every module of ``chunk`` (the rows from ``first_row`` on) transformed; other layers unchanged."""
    weights = dict(chunk.weights)
    alphas = dict(chunk.alphas)
    modules = sorted({layer.rsplit(".", 1)[0] for layer in weights
                      if layer.endswith(".down") and layer[:-5] + ".up" in weights})
    for module in modules:
        down, up = weights[module + ".down"], weights[module + ".up"]
        rank = down.shape[1]
        stored = alphas.get(module)
        alpha = (np.full(down.shape[0], float(rank)) if stored is None
                 else np.where(np.isfinite(stored), stored, float(rank)))
        rng = np.random.default_rng([seed, TRANSFORMS.index(name), module_seed(module) & 0xFFFFFFFF, first_row])
        weights[module + ".down"], weights[module + ".up"], new_alpha = reparametrise(name, down, up, alpha, rng)
        if name == "alpha" or stored is not None:
            alphas[module] = new_alpha
    return LoraChunk(weights, alphas)


class TransformedSource:
    """``source`` with every LoRA reparametrised by ``name``: the same rows, labels and layers."""

    def __init__(self, source: DatasetSource, name: str, seed: int = 0) -> None:
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform '{name}' (allowed: {', '.join(TRANSFORMS)})")
        self.source, self.name, self.seed = source, name, seed

    def describe(self) -> DatasetInfo:
        return self.source.describe()

    def stream(self, chunk_bytes: int) -> LoraStream:
        inner = self.source.stream(chunk_bytes)

        def chunks() -> Iterator[LoraChunk]:
            row = 0
            for chunk in inner:
                yield transform_chunk(chunk, self.name, self.seed, row)
                row += chunk.num_rows

        return LoraStream(chunks(), inner.table)

    def load(self) -> LoraTable:
        return collect(self.stream(1 << 62))
