"""Tracking URIs: where an experiment logs, read the same by every process. Imports no mlflow."""

from __future__ import annotations

import re
from pathlib import Path

from ablation_cli.durable import read_json_object
from ablation_cli.store import ExperimentStore

_SQLITE = re.compile(r"^sqlite:///(.+)$")  # sqlite:///relative.db, sqlite:////absolute.db


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """A tracking URI every process reads the same, wherever it runs: a relative SQLite file or local
    folder is made absolute against ``base`` (the current folder, as MLflow itself would)."""
    base = base or Path.cwd()
    if (path := sqlite_path(uri)) is not None:
        return f"sqlite:///{(base / path).resolve()}"  # an absolute path stays as it is
    if "://" not in uri and not uri.startswith("file:"):
        return str((base / uri).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for any other URI)."""
    m = _SQLITE.match(uri)
    return Path(m.group(1)) if m else None


def configured_uri(store: ExperimentStore) -> str | None:
    """The tracking URI recorded in the experiment (``[tracking] mlflow`` or ``--mlflow`` of its run)."""
    doc = read_json_object(store.experiment_file) or {}
    return ((doc.get("config") or {}).get("tracking") or {}).get("mlflow")
