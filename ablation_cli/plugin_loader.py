"""Finding plugins: installed packages' entry points and the config's ``plugins``, loaded on request.

Each declaration found goes to its kind's registry: representations (features/plugins.py),
classifiers (training/plugins.py). Nothing here runs as a side effect of validating a config:
config.load_plugins calls it before validation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ablation_cli import plugin_source
from ablation_cli.errors import PluginError
from ablation_cli.features import plugins as representations
from ablation_cli.training import plugins as classifiers

_loaded: dict[str, str] = {}  # plugin spec (module name, absolute file) -> where it came from
_entry_points_done = False

Declaration = representations.Declared | classifiers.DeclaredClassifier


def load_entry_points() -> None:
    """Register every plugin of the installed packages' entry points (once per process); one that fails
    to import is skipped, and naming one of its representations then says why it is unknown."""
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True
    groups = (representations.ENTRY_POINT_GROUP, classifiers.ENTRY_POINT_GROUP)
    for obj, origin in plugin_source.entry_point_objects(groups):
        _register_all(_declared_in(obj, origin), origin)


def load(specs: Iterable[str], base: Path | None = None) -> list[str]:
    """Import the config's ``plugins`` (module names, or .py files relative to ``base``) and register
    what they declare; returns the specs as absolute (files resolved), for child processes."""
    resolved = []
    for spec in specs:
        key = plugin_source.resolve(spec, base)
        resolved.append(key)
        if key in _loaded:
            continue
        origin = key if plugin_source.is_file(spec) else f"module {key}"
        module = plugin_source.import_spec(key, spec)
        _register_all(_declared_in(module, origin), origin)
        _loaded[key] = origin
    return resolved


def _of(obj: Any) -> Declaration | None:
    return representations.declared(obj) or classifiers.declared(obj)


def _declared_in(obj: Any, origin: str) -> list[Declaration]:
    if (one := _of(obj)) is not None:
        return [one]
    if isinstance(obj, ModuleType):
        found = [d for v in vars(obj).values() if (d := _of(v)) is not None]
        if not found:
            raise PluginError(f"plugin {origin}: declares no representation or classifier",
                              "decorate a function with @ablation_cli.api.representation(...) or .classifier(...)")
        return found
    raise PluginError(f"plugin {origin}: {obj!r} is neither a module nor a function decorated with "
                      "@ablation_cli.api.representation or @ablation_cli.api.classifier")


def _register_all(declared: list[Declaration], origin: str) -> None:
    for d in declared:
        if isinstance(d, classifiers.DeclaredClassifier):
            classifiers.register(d, origin)
        else:
            representations.register(d, origin)
