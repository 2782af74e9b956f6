"""Representations from outside ablate: a researcher's module or file, or a pip-installed package.

A plugin is a function decorated with :func:`ablation_cli.api.representation`. ablate finds them

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
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from ablation_cli.errors import PluginError
from ablation_cli.features import registry
from ablation_cli.features.registry import Representation

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ablate.representations"
CLASSIFIER_GROUP = "ablate.classifiers"
ATTRIBUTE = "__ablate_representation__"
CLASSIFIER_ATTRIBUTE = "__ablate_classifier__"
Unit = Literal["matrix", "module"]
FeatureNames = Sequence[str] | Callable[[tuple[int, ...]], Sequence[str]]


@dataclass(frozen=True)
class DeclaredClassifier:
    """What :func:`ablation_cli.api.classifier` records on a factory ``(seed) -> estimator``."""

    name: str
    version: int
    seeded: bool
    description: str
    function: Callable[..., Any]


@dataclass(frozen=True)
class Declared:
    """What the decorator records on a function (the function itself is returned unchanged)."""

    name: str
    version: int
    unit: Unit
    features: FeatureNames
    description: str
    function: Callable[..., Any]


_loaded: dict[str, str] = {}  # plugin spec (module name, absolute file, entry point) -> what it gave
_broken_entry_points: list[str] = []  # one line each: entry points that failed to import
_entry_points_done = False
_identities: dict[str, tuple[str, str]] = {}  # plugin representation -> (source sha, function)


# -- discovery ---------------------------------------------------------------------------------------

def load_entry_points() -> None:
    """Register every representation of the installed packages' ``ablate.representations`` entry points
    (once per process). One that fails to import is skipped with a warning: it must not break grids
    that do not use it; naming one of its representations then says why it is unknown."""
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True
    for ep in [*metadata.entry_points(group=ENTRY_POINT_GROUP), *metadata.entry_points(group=CLASSIFIER_GROUP)]:
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.name} = {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
        try:
            obj = ep.load()
        except Exception as exc:
            line = f"{origin}: {_exception_line(exc)}"
            _broken_entry_points.append(line)
            log.warning("plugin %s failed to import; its representations are unavailable", line)
            continue
        _register_all(_declared_in(obj, origin), origin)


def load(specs: Iterable[str], base: Path | None = None) -> list[str]:
    """Import the config's ``plugins`` (module names, or .py files relative to ``base``) and register
    their representations; returns the specs as absolute (files resolved), for child processes."""
    resolved = []
    for spec in specs:
        key = _resolve(spec, base)
        resolved.append(key)
        if key in _loaded:
            continue
        origin = key if _is_file(spec) else f"module {key}"
        module = _import_file(key, spec) if _is_file(spec) else _import_module(key)
        _register_all(_declared_in(module, origin), origin)
        _loaded[key] = origin
    return resolved


def broken_entry_points() -> list[str]:
    return list(_broken_entry_points)


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _resolve(spec: str, base: Path | None) -> str:
    if not _is_file(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(path.resolve())


def _import_file(path: str, spec: str) -> ModuleType:
    if not Path(path).is_file():
        raise PluginError(f"plugin {spec}: no such file {path}", "plugins are paths relative to the config file")
    name = "ablate_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _import_error(spec, exc) from None
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise _import_error(name, exc) from None


def _import_error(spec: str, exc: Exception) -> PluginError:
    return PluginError(f"plugin {spec} failed to import: {_exception_line(exc)}",
                       "its traceback is in run.log when one is open, and on the console with -v",
                       details="".join(traceback.format_exception(exc)))


def _exception_line(exc: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame (the plugin's own line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" at {Path(exc.filename).name}:{exc.lineno}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _declared_in(obj: Any, origin: str) -> list[Declared | DeclaredClassifier]:
    def of(v: Any) -> Declared | DeclaredClassifier | None:
        d = getattr(v, ATTRIBUTE, None) or getattr(v, CLASSIFIER_ATTRIBUTE, None)
        return d if isinstance(d, Declared | DeclaredClassifier) else None

    if (one := of(obj)) is not None:
        return [one]
    if isinstance(obj, ModuleType):
        found = [d for v in vars(obj).values() if (d := of(v)) is not None]
        if not found:
            raise PluginError(f"plugin {origin}: declares no representation or classifier",
                              "decorate a function with @ablation_cli.api.representation(...) or .classifier(...)")
        return found
    raise PluginError(f"plugin {origin}: {obj!r} is neither a module nor a function decorated with "
                      "@ablation_cli.api.representation or @ablation_cli.api.classifier")


# -- identity ----------------------------------------------------------------------------------------

def package_root(source: Path) -> Path | None:
    """The folder of the top-level regular package ``source`` belongs to (the highest folder above it that
    still has an ``__init__.py``), or None for a module of its own."""
    root = None
    folder = source.resolve().parent
    while (folder / "__init__.py").is_file():
        root = folder
        if folder.parent == folder:
            break
        folder = folder.parent
    return root


def source_digest(source: Path) -> str:
    """What a plugin's numbers come from, as a sha256: every .py file of its top-level package (a helper
    module it imports included), or the file alone when it is in no package (then the plain sha256 of
    that file, as plugins were identified before). Not the environment: other packages are versioned."""
    root = package_root(source)
    if root is None:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    h = hashlib.sha256(b"ablate package digest 1\n")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # hidden folders (.venv, .git) are not the package's code
        data = path.read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _register_classifier(d: DeclaredClassifier, origin: str) -> None:
    from ablation_cli.training import classifiers

    source = inspect.getsourcefile(d.function)
    if source is None or not Path(source).is_file():
        raise PluginError(f"plugin {origin}: cannot find the source file of {d.name}")
    if d.name in classifiers.BUILT_IN:
        raise PluginError(f"plugin {origin}: classifier '{d.name}' shadows the built-in one", "give it another name")
    sha = source_digest(Path(source))
    identity = (sha, d.function.__qualname__)
    key = "classifier:" + d.name
    if key in _identities and _identities[key] != identity:
        existing = classifiers.plugin(d.name)
        raise PluginError(f"two plugins define classifier '{d.name}': {existing.origin if existing else '?'} "
                          f"({_identities[key][1]}) and {origin} ({identity[1]})", "rename one")
    _identities[key] = identity
    classifiers.register_plugin(classifiers.ClassifierPlugin(
        d.name, d.version, d.function, d.seeded, origin if source in origin else f"{origin} ({source})", sha,
        d.description or _first_line(d.function.__doc__)))


def _register_all(declared: list[Declared | DeclaredClassifier], origin: str) -> None:
    for d in declared:
        if isinstance(d, DeclaredClassifier):
            _register_classifier(d, origin)
            continue
        rep = _representation(d, origin)
        if registry.is_built_in(rep.name):
            raise PluginError(f"plugin {origin}: representation '{rep.name}' shadows the built-in one",
                              "give it another name")
        identity = (rep.source_sha or "", d.function.__qualname__)  # the same code met twice is one plugin
        if rep.name not in _identities:
            _identities[rep.name] = identity
            registry.register(rep)
        elif _identities[rep.name] != identity:
            existing = registry.get(rep.name)
            raise PluginError(f"two plugins define representation '{rep.name}': {existing.origin} "
                              f"({_identities[rep.name][1]}) and {rep.origin} ({identity[1]})",
                              "rename one, or list only one of them")


def _representation(d: Declared, origin: str) -> Representation:
    source = inspect.getsourcefile(d.function)
    if source is None or not Path(source).is_file():
        raise PluginError(f"plugin {origin}: cannot find the source file of {d.name}")
    sha = source_digest(Path(source))
    fixed = None if callable(d.features) else [str(n) for n in d.features]
    names: Callable[[tuple[int, ...]], list[str]] = (
        (lambda shape: list(fixed)) if fixed is not None
        else _names_of(d, origin))
    rep = Representation(
        name=d.name, version=d.version, dim_per_layer=len(fixed) if fixed is not None else None,
        compute=d.function, description=d.description or _first_line(d.function.__doc__), unit=d.unit, default=False,
        names=names, origin=f"{origin} ({source})" if source not in origin else origin, source_sha=sha)
    return dataclasses.replace(rep, compute=_checked(rep, d.function))


def _first_line(doc: str | None) -> str:
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def _names_of(d: Declared, origin: str) -> Callable[[tuple[int, ...]], list[str]]:
    assert callable(d.features)
    features = d.features

    def names(shape: tuple[int, ...]) -> list[str]:
        try:
            return [str(n) for n in features(shape)]
        except Exception as exc:
            raise PluginError(f"representation {d.name} ({origin}): its feature names for shape {shape} failed: "
                              f"{_exception_line(exc)}", details="".join(traceback.format_exception(exc))) from None

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
                              f"{_exception_line(exc)}", "fix the plugin, or leave it out of representations",
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


def _named(decorator: str, function: Callable[..., Any], name: str | None, version: int) -> tuple[str, str]:
    """The declared name (default: the function's) and where to point at, both checked."""
    name = name or function.__name__
    where = f"@{decorator} on {function.__module__}.{function.__qualname__}"
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or not name[0].isalpha():
        raise PluginError(f"{where}: name {name!r} must start with a letter and hold letters, digits, '_' or '-'")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PluginError(f"{where}: version must be a positive integer, got {version!r}")
    return name, where


def declare(function: Callable[..., Any], name: str | None, version: int, unit: Unit, features: FeatureNames,
            description: str) -> Declared:
    """Validate the decorator's arguments (a mistake there is the plugin's, named at import)."""
    name, where = _named("representation", function, name, version)
    if unit not in ("matrix", "module"):
        raise PluginError(f"{where}: unit must be 'matrix' or 'module', got {unit!r}")
    if not callable(features) and (isinstance(features, str) or not list(features)):
        raise PluginError(f"{where}: features must be a list of names, or a function of the shape giving one")
    return Declared(name, version, unit, features, description, function)


def declare_classifier(function: Callable[..., Any], name: str | None, version: int, seeded: bool,
                       description: str) -> DeclaredClassifier:
    name, _ = _named("classifier", function, name, version)
    return DeclaredClassifier(name, version, bool(seeded), description, function)
