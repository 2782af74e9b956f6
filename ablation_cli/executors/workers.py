"""``ablate run --workers N``: run the pending cells in N processes on one machine.

Each worker is pinned to one device (``cuda:i`` when CUDA is used, round-robin over the GPUs; on
CPU each gets its share of the cores as torch threads), walks the pending cells starting at its
own offset, and claims a cell before running it (``ExperimentStore.claim``: an OS lock that dies
with its process). A claimed cell is left to its owner, a cell finished meanwhile is skipped, so
no cell runs twice and none is skipped. The parent computes the features once, into the shared
feature cache, before the workers start; the workers read them from there.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor

from ablation_cli.executors.spec import JobSpec, set_threads, setup_child_logging
from ablation_cli.orchestrator import Outcome

log = logging.getLogger(__name__)


def worker_threads(spec: JobSpec, workers: int) -> int:
    return spec.threads or max(1, (os.cpu_count() or 1) // workers)


def run_workers(spec: JobSpec, cell_ids: list[str], workers: int, fail_fast: bool) -> Outcome:
    ctx = multiprocessing.get_context("spawn")  # no forked torch / thread state
    log.info("Running %d cells in %d worker processes (%d torch threads each on CPU)", len(cell_ids), workers,
             worker_threads(spec, workers))
    outcome = Outcome()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(worker_main, spec, cell_ids, i, workers, fail_fast) for i in range(workers)]
        for future in futures:
            part = future.result()
            outcome.done.extend(part.done)
            outcome.failed.update(part.failed)
    outcome.skipped = [c for c in cell_ids if c not in outcome.done and c not in outcome.failed]
    return outcome


def _stop(signum: int, _frame: object) -> None:
    from ablation_cli.errors import EXIT_SIGINT, EXIT_SIGTERM, Stopped

    raise Stopped("SIGTERM" if signum == signal.SIGTERM else "SIGINT",
                  EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT)


def worker_main(spec: JobSpec, cell_ids: list[str], index: int, workers: int, fail_fast: bool) -> Outcome:
    for key, value in spec.env.items():
        os.environ.setdefault(key, value)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    store = spec.store()
    setup_child_logging(f"[worker {index}] ", store.log_file)
    set_threads(worker_threads(spec, workers))
    device = _pin_device(spec.device, index)

    from ablation_cli.executors.workspace import Workspace
    from ablation_cli.grid import expand
    from ablation_cli.orchestrator import run_cells
    from ablation_cli.progress import PlainReporter

    cfg = spec.cfg()
    source = spec.source()
    by_id = {c.id: c for c in expand(cfg, source.describe())}
    order = cell_ids[index:] + cell_ids[:index]  # start at a different cell than the other workers
    cells = [by_id[c] for c in order]
    workspace = Workspace(source, cfg.split, spec.cache(), device)
    log.info("worker %d/%d on %s, pid %d", index + 1, workers, device, os.getpid())
    return run_cells(cells, cfg, store, workspace, PlainReporter(), device, Outcome(), fail_fast)


def _pin_device(spec_device: str, index: int) -> str:
    if spec_device == "cpu":
        return "cpu"
    import torch

    if spec_device.startswith("cuda") or (spec_device == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count == 0:
            return spec_device  # resolve_device will say that CUDA is missing
        return f"cuda:{index % count}"
    return "cpu"

