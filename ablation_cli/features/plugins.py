"""Representation plugins: functions decorated with :func:`ablation_cli.api.representation`.

ablate finds them (plugin_loader.py)

  - in the entry-point group ``ablate.representations`` of installed packages (the entry point names a
    module, whose decorated functions all count, or one decorated function), and
  - in ``plugins = ["mypkg.reps", "path/to/reps.py"]`` of the experiment config (a module to import,
    or a Python file, relative to the config file).

Identity: a plugin's declared version and the digest of its source (:func:`source_digest`: its package's
Python files, or its lone file) go into its cells' fingerprints and its feature-cache key
(``Representation.cache_version``), so editing the plugin or a helper module it imports makes its cells
stale and never reuses its cached features. Its function is wrapped: the first bad output
(wrong shape, a column count other than its feature names', non-finite values) or an exception is a
:class:`PluginError` naming the plugin (exit 2), raised before anything of the pass is stored.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ablation_cli.errors import PluginError
from ablation_cli.features import registry
from ablation_cli.features.registry import Representation
from ablation_cli.plugin_source import (
    checked_name,
    exception_line,
    first_line,
    package_root,
    source_digest,
    source_file,
)

__all__ = ["ATTRIBUTE", "ENTRY_POINT_GROUP", "Declared", "FeatureNames", "Unit", "declare", "declared",
           "package_root", "register", "source_digest"]

ENTRY_POINT_GROUP = "ablate.representations"
ATTRIBUTE = "__ablate_representation__"
Unit = Literal["matrix", "module"]
FeatureNames = Sequence[str] | Callable[[tuple[int, ...]], Sequence[str]]


@dataclass(frozen=True)
class Declared:
    """What the decorator records on a function (the function itself is returned unchanged)."""

    name: str
    version: int
    unit: Unit
    features: FeatureNames
    description: str
    function: Callable[..., Any]


_identities: dict[str, tuple[str, str]] = {}  # plugin representation -> (source sha, function)


def declared(obj: Any) -> Declared | None:
    """The declaration on ``obj``, if it is a decorated function."""
    d = getattr(obj, ATTRIBUTE, None)
    return d if isinstance(d, Declared) else None


def register(d: Declared, origin: str) -> None:
    """Add a declared representation; the same code met twice is one plugin, two codes under one name fail."""
    rep = _representation(d, origin)
    if registry.is_built_in(rep.name):
        raise PluginError(f"plugin {origin}: representation '{rep.name}' shadows the built-in one",
                          "give it another name")
    identity = (rep.source_sha or "", d.function.__qualname__)
    if rep.name not in _identities:
        _identities[rep.name] = identity
        registry.register(rep)
    elif _identities[rep.name] != identity:
        existing = registry.get(rep.name)
        raise PluginError(f"two plugins define representation '{rep.name}': {existing.origin} "
                          f"({_identities[rep.name][1]}) and {rep.origin} ({identity[1]})",
                          "rename one, or list only one of them")


def _representation(d: Declared, origin: str) -> Representation:
    source = source_file(d.function, d.name, origin)
    sha = source_digest(Path(source))
    fixed = None if callable(d.features) else [str(n) for n in d.features]
    names: Callable[[tuple[int, ...]], list[str]] = (
        (lambda shape: list(fixed)) if fixed is not None
        else _names_of(d, origin))
    rep = Representation(
        name=d.name, version=d.version, dim_per_layer=len(fixed) if fixed is not None else None,
        compute=d.function, description=d.description or first_line(d.function.__doc__), unit=d.unit, default=False,
        names=names, origin=f"{origin} ({source})" if source not in origin else origin, source_sha=sha)
    return dataclasses.replace(rep, compute=_checked(rep, d.function))


def _names_of(d: Declared, origin: str) -> Callable[[tuple[int, ...]], list[str]]:
    assert callable(d.features)
    features = d.features

    def names(shape: tuple[int, ...]) -> list[str]:
        try:
            return [str(n) for n in features(shape)]
        except Exception as exc:
            raise PluginError(f"representation {d.name} ({origin}): its feature names for shape {shape} failed: "
                              f"{exception_line(exc)}", details="".join(traceback.format_exception(exc))) from None

    return names


# -- checks on use -----------------------------------------------------------------------------------

def _checked(rep: Representation, fn: Callable[..., Any]) -> Callable[..., np.ndarray]:
    """``fn``, with its output checked: (N, len(feature names)) finite numbers, as float32."""

    def compute(*args: Any) -> np.ndarray:
        first = np.asarray(args[0])
        n, shape = first.shape[0], tuple(first.shape[1:])
        what = "modules with down factors" if rep.unit == "module" else "matrices"
        try:
            out = fn(*args)
        except Exception as exc:
            raise PluginError(f"representation {rep.name} ({rep.origin}) failed on {n} {what} of shape {shape}: "
                              f"{exception_line(exc)}", "fix the plugin, or leave it out of representations",
                              details=_plugin_traceback(exc)) from None
        arr = _as_numpy(out)
        expected = rep.dim(shape)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise PluginError(f"representation {rep.name} ({rep.origin}) returned shape {tuple(arr.shape)} for {n} "
                              f"{what} of shape {shape}; expected ({n}, {expected})")
        if arr.shape[1] != expected:
            raise PluginError(f"representation {rep.name} ({rep.origin}) returned {arr.shape[1]} columns for shape "
                              f"{shape} but declares {expected} feature names",
                              "declare one feature name per column")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise PluginError(f"representation {rep.name} ({rep.origin}) returned {arr.dtype} values; "
                              "expected real numbers")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).any(axis=1).sum())
            raise PluginError(f"representation {rep.name} ({rep.origin}) returned non-finite values for {bad} of "
                              f"{n} {what} of shape {shape}", "guard divisions and logarithms in the plugin")
        return arr

    compute.__name__ = rep.name
    return compute


def _plugin_traceback(exc: BaseException) -> str:
    """The traceback from the plugin's own frames on (this wrapper's frame left out)."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _as_numpy(out: Any) -> np.ndarray:
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().numpy()
    return np.asarray(out)


def declare(function: Callable[..., Any], name: str | None, version: int, unit: Unit, features: FeatureNames,
            description: str) -> Declared:
    """Validate the decorator's arguments (a mistake there is the plugin's, named at import)."""
    name, where = checked_name("representation", function, name, version)
    if unit not in ("matrix", "module"):
        raise PluginError(f"{where}: unit must be 'matrix' or 'module', got {unit!r}")
    if not callable(features) and (isinstance(features, str) or not list(features)):
        raise PluginError(f"{where}: features must be a list of names, or a function of the shape giving one")
    return Declared(name, version, unit, features, description, function)
