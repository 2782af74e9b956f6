"""scripts/gpu_check.py is run once, in one go, when a GPU is lent: its --smoke mode runs the same
code on the CPU at toy sizes, so it works the day it is needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu():
    res = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--no-write"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "| stacked runs = per-run training | PASS |" in out  # bit-identical on CPU
    for cuda_only in ("bf16 / fp16 within 0.02 of fp32", "GPU features = numpy within 1e-5", "OOM halving"):
        assert f"| {cuda_only} | skipped | needs CUDA |" in out
    assert "| all_layers | simple_stats | 640 |" in out and "| visual_only | simple_stats | 320 |" in out
    assert out.strip().endswith('{"failed": 0}')
