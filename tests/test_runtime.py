"""runtime.py: a stop asked for by a signal is never lost, even when a library swallows it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from ablation_cli import runtime
from ablation_cli.errors import Stopped


def test_a_swallowed_stop_is_raised_again(monkeypatch):
    monkeypatch.setattr(runtime, "_stop", None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        runtime.stop_on((signal.SIGTERM,))
        runtime.raise_if_stopped()  # nothing asked yet
        try:  # what logging does when the signal lands inside a log write
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            logging.getLogger("ablation_cli.test").debug("swallowed")
        with pytest.raises(Stopped) as info:
            runtime.raise_if_stopped()
        assert info.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)


_CHURN = """
import resource, sys
import torch
from ablation_cli import runtime
if sys.argv[1] == "tuned":
    assert runtime.keep_freed_memory_for_training()
torch.manual_seed(0)
models = [torch.nn.Linear(8576, 512) for _ in range(3)]  # the ensemble's first layer, three runs in lockstep
opts = [torch.optim.Adam(m.parameters()) for m in models]
x = torch.randn(64, 8576)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    sum(m(x).square().mean() for m in models).backward()
    for opt in opts:
        opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_keeps_freed_memory_instead_of_faulting_it_back_every_step():
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                                  check=True).stdout)

    default, tuned = faults("default"), faults("tuned")
    # by default glibc gives the step's freed gradients and Adam temporaries back and faults them in again
    # (here 400-490 k faults over 30 steps, tuned 58-66 k: the first step's)
    assert default > 200_000
    assert tuned < default / 3
    # the user's own malloc setting wins
    with_env = subprocess.run([sys.executable, "-c", "from ablation_cli import runtime; "
                               "print(runtime.keep_freed_memory_for_training())"],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert with_env.stdout.strip() == "False"


def test_a_process_that_skips_the_last_collection_still_runs_its_atexit_handlers():
    """The CLI, workers and Slurm tasks call it at their start (cli.main, executors.child.start)."""
    probe = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count() > 0))\n"
        "from ablation_cli import runtime\n"
        "runtime.skip_the_last_collection()\n"
        "runtime.skip_the_last_collection()  # once per process\n"
        "atexit.register(lambda: print('later handler ran, frozen', gc.get_freeze_count() > 0))\n"
        "print('before exit, frozen', gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["before exit, frozen False", "later handler ran, frozen False",
                                       "frozen at exit True"]
