"""Process set-up shared by the CLI and its children (workers, Slurm tasks): environment, stop
signals and torch threads. One home, so every process that trains behaves the same."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import FrameType

from ablation_cli.errors import EXIT_SIGINT, EXIT_SIGTERM, Stopped

log = logging.getLogger("ablation_cli")

# MKL may pick kernels at run time, so a resumed run would not reproduce an uninterrupted one's last
# bits; strict reproducibility costs nothing measurable (docs/benchmarks.md). Set before torch is
# imported; a user's own setting wins (MKL_CBWR=AUTO ablate run ...).
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE"}

_EXIT_CODES = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}
_stop: Stopped | None = None  # set by the handler of stop_on


def apply_env(env: Mapping[str, str] = REPRODUCIBLE_ENV) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)


def stop_on(signums: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT), note: str | None = None) -> None:
    """Turn each of ``signums`` into :class:`Stopped` (exit 143 / 130), raised where the process is:
    everything finished is already on disk, and the half-done run is simply not written.
    ``note`` is logged first (a Slurm task says why it stops)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        global _stop
        if note:
            log.warning("%s", note)
        sig = signal.Signals(signum)
        _stop = Stopped(sig.name, _EXIT_CODES[sig])
        raise _stop

    for signum in signums:
        signal.signal(signum, handler)


def raise_if_stopped() -> None:
    """Raise again a stop a signal asked for. The handler raises where the process is, and a library
    can swallow that: logging does, when the signal lands inside a log write. Cells call this at
    every epoch and run, so a stop is never lost."""
    if _stop is not None:
        raise _stop


@functools.cache
def git_commit() -> str | None:
    """The commit of ablate's own source, when it runs from a git checkout (provenance)."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def skip_the_last_collection() -> None:
    """At exit, exempt what is still alive from the interpreter's last garbage collection. With torch and
    scikit-learn loaded it walked every live object for 1.5 s after the work was done (docs/benchmarks.md);
    those objects die with the process anyway. Called where a process starts (the CLI, a worker, a Slurm
    task), so it runs after the atexit handlers registered later (mlflow's, submitit's); thread joins
    and module teardown run as usual."""
    atexit.register(gc.freeze)


# Each CPU training step frees its temporaries at once; glibc would return them to the kernel and
# page them back in on the next step, so keep freed heap for training (docs/benchmarks.md, page faults).
_MALLOC_TRIM_THRESHOLD, _MALLOC_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_TRAINING_MALLOC = {_MALLOC_TRIM_THRESHOLD: 128 << 20, _MALLOC_MMAP_THRESHOLD: 32 << 20}


@functools.cache
def keep_freed_memory_for_training() -> bool:
    """Tune glibc's malloc for training's step-by-step temporaries (above). A no-op elsewhere (macOS,
    musl) or where the user set MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ themselves."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                             "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _TRAINING_MALLOC.items())


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads. Results on CPU are bit-identical for a given thread count."""
    if threads:
        import torch  # only when asked: `ablate status` never imports torch

        torch.set_num_threads(threads)


def stop_with_parent(grace_s: float = 60.0, poll_s: float = 0.5) -> None:
    """Stop this process once its parent is gone (kill -9 of ``ablate run --workers``), so that no
    orphan trains on, holding cells a rerun would have to leave to it. The stop is SIGTERM's (finished
    runs are on disk, the half-done one is dropped); the caller ends the process after it with
    :func:`exit_if_orphaned`, and after ``grace_s`` the process ends regardless: a worker of a process
    pool would otherwise wait forever for the dead parent's next task."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("The parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        _exit(EXIT_SIGTERM)

    threading.Thread(target=watch, name="ablate-parent-watch", daemon=True).start()


def exit_if_orphaned(parent: int) -> None:
    """End the process (exit 143) when ``parent`` is no longer its parent; see :func:`stop_with_parent`."""
    if os.getppid() != parent:
        _exit(EXIT_SIGTERM)


def _exit(code: int) -> None:
    logging.shutdown()  # flush the log file: os._exit skips every handler
    os._exit(code)
