"""New SQLite tracking stores: made atomically, as a copy of an empty store kept per MLflow version.

MLflow's schema migrations then run once per machine and version, not once per store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from ablation_cli.durable import temp_name
from ablation_cli.tracking.uri import sqlite_path

log = logging.getLogger(__name__)


def create_sqlite_atomically(uri: str) -> None:
    """A new SQLite store is created in a temp file, then linked into place: a process killed while it is
    made must not leave a half-made store that MLflow refuses (``table _alembic_tmp_runs already
    exists``). Of processes creating it at once, the first link wins. The temp file is a copy of
    :func:`schema_template` where there is one."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(path.name)
    tmp.unlink(missing_ok=True)
    try:
        template = schema_template()
        if template is not None:
            shutil.copyfile(template, tmp)
        else:
            create_schema(tmp)
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_schema(path: Path) -> None:
    """MLflow's own empty store at ``path``: its tables and every schema migration, no experiment (MLflow
    adds its Default experiment, with this store's artifact root, when it first opens the store)."""
    try:
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # what MLflow runs on an empty database

        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
    except ImportError:  # another MLflow layout: let MLflow make its store (Default experiment included)
        from mlflow.tracking import MlflowClient

        path.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)


def schema_template() -> Path | None:
    """An empty MLflow store for this MLflow, SQLAlchemy and alembic, made once and kept in the user's
    cache (``$XDG_CACHE_HOME/ablate``, ``~/.cache/ablate``); None where that folder cannot be written."""
    import alembic
    import mlflow
    import sqlalchemy

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablate"
    versions = f"mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}-alembic-{alembic.__version__}"
    template = cache / f"{versions}.empty.db"
    if template.is_file():
        return template
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{template.name}.{os.getpid()}.tmp"
        try:
            create_schema(tmp)
            os.replace(tmp, template)
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as exc:  # an unwritable cache folder: the store is made directly, as before
        log.debug("tracking: no schema template in %s (%s)", cache, exc)
        return None
    return template
