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
from concurrent.futures import ProcessPoolExecutor

from ablation_cli import runtime
from ablation_cli.executors import child
from ablation_cli.executors.base import Batch, Outcome
from ablation_cli.executors.local import run_cells
from ablation_cli.executors.spec import JobSpec

log = logging.getLogger(__name__)


def worker_threads(spec: JobSpec, workers: int) -> int:
    return spec.threads or max(1, (os.cpu_count() or 1) // workers)


class WorkersExecutor:
    """The cell loop in ``workers`` spawned processes; the parent has computed the features."""

    in_process = True

    def __init__(self, spec: JobSpec, workers: int) -> None:
        self.spec = spec
        self.workers = workers

    def run(self, batch: Batch, fail_fast: bool = False) -> Outcome:
        cell_ids = [c.id for c in batch.cells]
        ctx = multiprocessing.get_context("spawn")  # no forked torch / thread state
        log.info("Running %d cells in %d worker processes (%d torch threads each on CPU)", len(cell_ids),
                 self.workers, worker_threads(self.spec, self.workers))
        outcome = Outcome()
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
            futures = [pool.submit(worker_main, self.spec, cell_ids, i, self.workers, fail_fast)
                       for i in range(self.workers)]
            for future in futures:
                outcome.add(future.result())
        outcome.skipped = [c for c in cell_ids if c not in outcome.done and c not in outcome.failed]
        return outcome


def worker_main(spec: JobSpec, cell_ids: list[str], index: int, workers: int, fail_fast: bool) -> Outcome:
    parent = os.getppid()
    me = child.start(spec, f"[worker {index}] ", worker_threads(spec, workers))
    runtime.stop_with_parent()
    device = _pin_device(spec.device, index)
    order = cell_ids[index:] + cell_ids[:index]  # start at a different cell than the other workers
    log.info("worker %d/%d on %s, pid %d", index + 1, workers, device, os.getpid())
    try:
        return run_cells(me.batch(order, device), fail_fast)
    finally:  # stopped because the run was killed: end here, not in the pool's wait for a next task
        runtime.exit_if_orphaned(parent)


def _pin_device(spec_device: str, index: int) -> str:
    if spec_device == "cpu":
        return "cpu"
    import torch  # the worker trains anyway; here only to count the GPUs

    if spec_device.startswith("cuda") or (spec_device == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count == 0:
            return spec_device  # resolve_device will say that CUDA is missing
        return f"cuda:{index % count}"
    return "cpu"
