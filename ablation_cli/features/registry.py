"""Registry of representations keyed by name.

Bump a representation's ``version`` whenever its math changes: the version is
part of every checkpoint fingerprint and of every feature-cache key, so old
results become stale and old cache entries are never read.

Two kinds of unit: a ``matrix`` representation maps each LoRA factor matrix
(canonical layer ``<module>.down`` / ``<module>.up``) to a vector; a ``module``
representation maps each module's pair of factors (its product dW = up @ down)
to a vector, and a layer config selects a module when it selects both factors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ablation_cli.features import invariant, matrix


@dataclass(frozen=True)
class Representation:
    name: str
    version: int
    dim_per_layer: int | None  # None: it varies with the matrix shape (flat_vec)
    compute: Callable[..., np.ndarray]  # matrix: (N, out, in) -> (N, F); module: (down, up, scale) -> (N, F)
    description: str
    parts: tuple[str, ...] = ()  # a composite is the per-layer concatenation of these
    unit: Literal["matrix", "module"] = "matrix"
    default: bool = True  # in the default grid (the researcher's nine)
    cacheable: bool = True  # False: computed on every use, never stored (cheap ones)
    # plugins (features/plugins.py): their feature names for a unit's shape, where they come from, and
    # the digest of their source, their package's .py files or their lone file (plugins.source_digest: in
    # the fingerprint and the cache key, so an edit of the plugin or a helper it imports makes them stale)
    # a composite: its parts' versions when its own version was last set. Its fingerprint names the
    # parts' versions only once they differ, so cells made before that rule stay valid.
    parts_at: tuple[tuple[str, int | str], ...] = ()
    names: Callable[[tuple[int, ...]], list[str]] | None = None
    origin: str = "built-in"
    source_sha: str | None = None
    # a function of dW alone: unchanged by the factors' GL(r) symmetry and by where alpha is stored
    # (its unit test and `ablate audit invariance` hold it to that)
    invariant: bool = False
    # a module representation whose features depend on both factors' shapes: names from (down, up) shapes
    module_names: Callable[[tuple[int, ...], tuple[int, ...]], list[str]] | None = None
    named_unit: bool = False  # compute(down, up, scale, unit=<module>): seeded by the module's name

    @property
    def plugin(self) -> bool:
        return self.source_sha is not None

    @property
    def cache_version(self) -> int | str:
        """The version in its feature-cache entries' names: a plugin's also names its source."""
        return f"{self.version}-{self.source_sha[:12]}" if self.source_sha is not None else self.version

    @property
    def base(self) -> tuple[Representation, ...]:
        """What is computed (and cached) for it: its parts for a composite, else itself."""
        return tuple(get(p) for p in self.parts) or (self,)

    def dim(self, shape: tuple[int, ...]) -> int:
        """Features per unit for a matrix of ``shape`` (a module: its down factor's shape)."""
        if self.names is not None:
            return len(self.names(tuple(shape)))
        return self.dim_per_layer if self.dim_per_layer is not None else int(np.prod(shape))

    def unit_dim(self, unit: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Features of ``unit`` (a layer, or a module) of a dataset with these layer shapes."""
        return len(self.unit_names(unit, shapes)) if self.module_names is not None else self.dim(_shape(unit, shapes))

    def unit_names(self, unit: str, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        if self.module_names is not None:
            return self.module_names(tuple(shapes[unit + ".down"]), tuple(shapes[unit + ".up"]))
        return self.feature_names(_shape(unit, shapes))

    def feature_names(self, shape: tuple[int, ...]) -> list[str]:
        if self.parts:
            return [n for p in self.parts for n in get(p).feature_names(shape)]
        if self.names is not None:
            return list(self.names(tuple(shape)))
        names = FEATURE_NAMES.get(self.name)
        return list(names) if names is not None else [f"w{i}" for i in range(self.dim(shape))]


def _shape(unit: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """A layer's shape; a module's is its down factor's."""
    return tuple(shapes.get(unit) or shapes[unit + ".down"])


def _numbered(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, n + 1)]


FEATURE_NAMES: dict[str, list[str]] = {
    "simple_stats": ["fro", "mean", "std", "max", "min"],
    "rank_based": [f"p{q}" for q in matrix.PERCENTILES] + ["iqr", "range_1_99"],
    "stats": ["mean", "std", "median", "min", "max", "skew", "kurt"],
    "spectral": _numbered("s", 10) + _numbered("p", 10) + _numbered("gap", 9) + ["entropy", "condition", "nuclear"],
    "matrix_norms": ["fro", "nuclear", "spectral", "max_col_abs_sum", "max_row_abs_sum", "nuclear_over_fro",
                     "spectral_over_fro"],
    "distribution": [f"q{q}" for q in matrix.QUANTILES] + ["iqr", "mad", "cv", "skew", "kurt"],
    "frequency": [*_numbered("fft_top", 10), "fft_mean", "fft_std", "fft_max", "fft_energy_top10"],
    "info_theoretic": ["hist_entropy", "hist_entropy_norm"],
    "delta_spectral": [*_numbered("s", 10), "fro", "nuclear"],
}

_PARAMETRISED = re.compile(r"^(delta_canonical|delta_sketch)_k([1-9][0-9]{0,2})$")


def _parametrised(name: str, k: int | None) -> Representation:
    """``delta_canonical`` (k = 4 directions) or ``delta_sketch`` (k = 8), or either with its k in the
    name (``delta_sketch_k16``): the name is what fingerprints and cache keys hold, so it names k."""
    full = name if k is None else f"{name}_k{k}"
    if name == "delta_canonical":
        kk = invariant.CANONICAL_K if k is None else k

        def canonical(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
            return invariant.delta_canonical(down, up, scale, k=kk)

        return Representation(full, 1, None, canonical,
                              f"per module: canonical form of dW (top-{kk} singular values, sqrt(s) u, sqrt(s) v)",
                              unit="module", default=False, invariant=True,
                              module_names=lambda d, u: invariant.canonical_names(d, u, kk))
    ks = invariant.SKETCH_K if k is None else k

    def sketch(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float = 1.0, *, unit: str) -> np.ndarray:
        return invariant.delta_sketch(down, up, scale, unit=unit, k=ks)

    return Representation(full, 1, ks * ks, sketch, f"per module: {ks}x{ks} seeded random sketch S1 dW S2^T",
                          unit="module", default=False, invariant=True, named_unit=True,
                          names=lambda _shape: invariant.sketch_names(ks))


# In docs/representations.md order: this is the default grid order. Optional ones follow.
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
        # v2: a value on a bin edge falls in np.histogram's bin (v1 floored (x - min) / width * 50)
        Representation("info_theoretic", 2, 2, matrix.info_theoretic, "50-bin histogram entropy, normalised"),
        # v2: its info_theoretic part is v2
        Representation("ensemble", 2, 67, matrix.ensemble, "spectral + matrix_norms + distribution + frequency + info",
                       parts=("spectral", "matrix_norms", "distribution", "frequency", "info_theoretic"),
                       parts_at=(("spectral", 1), ("matrix_norms", 1), ("distribution", 1), ("frequency", 1),
                                 ("info_theoretic", 2))),
        Representation("flat_vec", 1, None, matrix.flat_vec, "every entry of every matrix (99,648 per LoRA at r=1)",
                       default=False),
        # v2: alpha / r also from PEFT adapter_config.json and diffusers' lora_adapter_metadata
        Representation("delta_spectral", 2, 12, matrix.delta_spectral,
                       "per module: top-10 singular values of dW = up @ down * alpha/r, Frobenius, nuclear",
                       unit="module", default=False, invariant=True),
        *(_parametrised(name, None) for name in ("delta_canonical", "delta_sketch")),
    )
}


_BUILT_IN = frozenset(_REGISTRY)
_BUILT_IN_ORDER = tuple(_REGISTRY)
_SIZED: dict[str, Representation] = {}  # delta_sketch_k16 and the like


def available() -> list[str]:
    return list(_REGISTRY)


def is_built_in(name: str) -> bool:
    return name in _BUILT_IN or _PARAMETRISED.match(name) is not None


def register(rep: Representation) -> None:
    """Add a plugin's representation (features/plugins.py checks names before it calls this)."""
    _REGISTRY[rep.name] = rep


def invariant_built_ins() -> list[str]:
    """The built-in representations flagged invariant, in registry order (k at its default)."""
    return [name for name in _BUILT_IN_ORDER if _REGISTRY[name].invariant]


def default_grid() -> list[str]:
    """The nine representations of the default grid, in docs/representations.md's order."""
    return [name for name, r in _REGISTRY.items() if r.default]


def known(name: str) -> bool:
    """A registered name, or a built-in one with its k in the name (``delta_sketch_k16``)."""
    return name in _REGISTRY or _PARAMETRISED.match(name) is not None


def get(name: str) -> Representation:
    try:
        return _REGISTRY[name] if name in _REGISTRY else _SIZED[name]
    except KeyError:
        if (m := _PARAMETRISED.match(name)) is not None:  # made on first use; not listed by available()
            return _SIZED.setdefault(name, _parametrised(m.group(1), int(m.group(2))))
        raise KeyError(f"unknown representation '{name}'; available: {', '.join(_REGISTRY)}") from None
