"""Logging set-up: only the CLI and child processes install handlers; library code only logs.

The console gets rich lines on a terminal (the handler comes from ``reports.terminal``) or plain
timestamped lines otherwise (nohup, pipes); ``run.log`` in the experiment folder gets plain lines.
``ablate.file`` is a logger for run.log only: errors the console already shows in red.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("ablation_cli")
file_log = logging.getLogger("ablate.file")

_DATE = "%Y-%m-%d %H:%M:%S"


class _QuietFileHandler(logging.FileHandler):
    """run.log on a full or read-only disk: lines that cannot be written are dropped, so that the one
    error line on the console is not buried under logging's own tracebacks."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def setup_console(verbose: bool, handler: logging.Handler | None = None) -> None:
    """Console logging for a CLI command: ``handler`` (rich, on a terminal) or plain lines on stderr."""
    log.handlers.clear()
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", _DATE))
    log.addHandler(handler)
    file_log.handlers[:] = [logging.NullHandler()]
    file_log.propagate = False


def add_file_log(path: Path, prefix: str = "") -> None:
    """Append this process's lines to ``path`` (run.log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {prefix}%(message)s", _DATE))
    log.addHandler(handler)
    if not prefix:
        file_log.addHandler(handler)


def setup_child(prefix: str, log_file: Path | None) -> None:
    """Plain timestamped lines on stderr (and appended to run.log) for a worker or a Slurm task."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", _DATE))
    log.addHandler(handler)
    if log_file is not None:
        add_file_log(log_file, prefix)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def error_to_file(message: object) -> None:
    """Record in run.log (when one is open) an error the console shows as its red line."""
    if file_log.handlers:
        file_log.error("%s", message)
