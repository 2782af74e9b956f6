"""Classifier plugins: factories ``(seed) -> estimator`` decorated with :func:`ablation_cli.api.classifier`.

ablate finds them in the entry-point group ``ablate.classifiers`` and in the config's ``plugins``
(plugin_loader.py); this module declares and registers them. Identity: the declared version and the
digest of the plugin's source go into its cells' fingerprints (training/classifiers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation_cli.errors import PluginError
from ablation_cli.plugin_source import checked_name, first_line, source_digest, source_file

ENTRY_POINT_GROUP = "ablate.classifiers"
ATTRIBUTE = "__ablate_classifier__"


@dataclass(frozen=True)
class DeclaredClassifier:
    """What :func:`ablation_cli.api.classifier` records on a factory ``(seed) -> estimator``."""

    name: str
    version: int
    seeded: bool
    description: str
    function: Callable[..., Any]


@dataclass(frozen=True)
class ClassifierPlugin:
    name: str
    version: int
    factory: Callable[[int], Any]  # seed -> an object with fit(X, y) and predict_proba(X)
    seeded: bool
    origin: str
    source_sha: str
    description: str = ""


_PLUGINS: dict[str, ClassifierPlugin] = {}
_identities: dict[str, tuple[str, str]] = {}  # classifier -> (source sha, function)


def declare(function: Callable[..., Any], name: str | None, version: int, seeded: bool,
            description: str) -> DeclaredClassifier:
    """Validate the decorator's arguments (a mistake there is the plugin's, named at import)."""
    name, _ = checked_name("classifier", function, name, version)
    return DeclaredClassifier(name, version, bool(seeded), description, function)


def declared(obj: Any) -> DeclaredClassifier | None:
    """The declaration on ``obj``, if it is a decorated factory."""
    d = getattr(obj, ATTRIBUTE, None)
    return d if isinstance(d, DeclaredClassifier) else None


def register(d: DeclaredClassifier, origin: str) -> None:
    """Add a declared classifier; the same code met twice is one plugin, two codes under one name fail."""
    from ablation_cli.training.classifiers import BUILT_IN  # the kinds table imports this registry

    source = source_file(d.function, d.name, origin)
    if d.name in BUILT_IN:
        raise PluginError(f"plugin {origin}: classifier '{d.name}' shadows the built-in one", "give it another name")
    sha = source_digest(Path(source))
    identity = (sha, d.function.__qualname__)
    if d.name in _identities and _identities[d.name] != identity:
        existing = plugin(d.name)
        raise PluginError(f"two plugins define classifier '{d.name}': {existing.origin if existing else '?'} "
                          f"({_identities[d.name][1]}) and {origin} ({identity[1]})", "rename one")
    _identities[d.name] = identity
    _PLUGINS[d.name] = ClassifierPlugin(
        d.name, d.version, d.function, d.seeded, origin if source in origin else f"{origin} ({source})", sha,
        d.description or first_line(d.function.__doc__))


def plugin(name: str) -> ClassifierPlugin | None:
    return _PLUGINS.get(name)


def plugins() -> list[ClassifierPlugin]:
    return list(_PLUGINS.values())
