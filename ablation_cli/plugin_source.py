"""A plugin's code, whatever it declares: importing it, naming its failures, digesting its source.

Representation plugins (features/plugins.py) and classifier plugins (training/plugins.py) both use
it; plugin_loader.py finds the plugins and hands each declaration to its kind's registry.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ablation_cli.errors import PluginError

log = logging.getLogger(__name__)

_broken_entry_points: list[str] = []  # one line each: entry points that failed to import


# -- importing ---------------------------------------------------------------------------------------

def entry_point_objects(groups: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    """What each entry point of ``groups`` names, with where it comes from. One that fails to import is
    skipped with a warning: it must not break grids that do not use it."""
    for group in groups:
        for ep in metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            origin = f"entry point {ep.name} = {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            try:
                obj = ep.load()
            except Exception as exc:
                line = f"{origin}: {exception_line(exc)}"
                _broken_entry_points.append(line)
                log.warning("plugin %s failed to import; its representations are unavailable", line)
                continue
            yield obj, origin


def broken_entry_points() -> list[str]:
    return list(_broken_entry_points)


def is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve(spec: str, base: Path | None) -> str:
    """A config's plugin spec as the key it loads under: a file made absolute, a module name as is."""
    if not is_file(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(path.resolve())


def import_spec(key: str, spec: str) -> ModuleType:
    """The module of a resolved spec: a Python file, or a module name."""
    return _import_file(key, spec) if is_file(spec) else _import_module(key)


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
    return PluginError(f"plugin {spec} failed to import: {exception_line(exc)}",
                       "its traceback is in run.log when one is open, and on the console with -v",
                       details="".join(traceback.format_exception(exc)))


def exception_line(exc: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame (the plugin's own line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" at {Path(exc.filename).name}:{exc.lineno}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


# -- identity ----------------------------------------------------------------------------------------

def source_file(function: Callable[..., Any], name: str, origin: str) -> str:
    """The file that defines a declared function (its digest is the plugin's identity)."""
    source = inspect.getsourcefile(function)
    if source is None or not Path(source).is_file():
        raise PluginError(f"plugin {origin}: cannot find the source file of {name}")
    return source


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


# -- declaring ---------------------------------------------------------------------------------------

def first_line(doc: str | None) -> str:
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def checked_name(decorator: str, function: Callable[..., Any], name: str | None, version: int) -> tuple[str, str]:
    """The declared name (default: the function's) and where to point at, both checked."""
    name = name or function.__name__
    where = f"@{decorator} on {function.__module__}.{function.__qualname__}"
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or not name[0].isalpha():
        raise PluginError(f"{where}: name {name!r} must start with a letter and hold letters, digits, '_' or '-'")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PluginError(f"{where}: version must be a positive integer, got {version!r}")
    return name, where
