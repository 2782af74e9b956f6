"""CPU and wall time of the real `ablate` processes the tests start: a fresh interpreter against a child
forked from the warm server (tests/warm.py), in the same run, alternating.

Each round times `ablate run` on a tiny project from scratch (4 cells x 2 runs, a merge with its 5
plots), then `ablate status`, once each way. A fresh process's CPU is what this process reaps; a warm
child is the server's, so its CPU is read from /proc every 10 ms until it ends. Writes docs/benchmarks.md.

    python scripts/bench_warm.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.benchlib import publish  # noqa: E402
from tests import warm  # noqa: E402
from tests.conftest import write_project  # noqa: E402


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh(args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -m ablation_cli ARGS``."""
    cpu, start = _children_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ablation_cli", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return time.perf_counter() - start, _children_cpu() - cpu


def forked(args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the same command forked from the warm server (CPU: /proc of the child)."""
    start = time.perf_counter()
    proc = warm.popen(args, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert isinstance(proc, warm.WarmProcess), "the warm server started a fresh interpreter"
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    while proc.poll() is None:  # the child is not ours to reap: sample its CPU until it ends
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"warm {args} exited {proc.returncode}")
    return time.perf_counter() - start, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    warm.socket_path()
    server_start = time.perf_counter() - started
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {"ablate run": {"fresh": [], "warm": []},
                                                            "ablate status": {"fresh": [], "warm": []}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_project(work)
        fresh(["run", "-c", "exp.toml"], work)  # the feature cache, so that every timed run trains and merges
        for _ in range(args.rounds):
            for way, call in (("fresh", fresh), ("warm", forked)):
                shutil.rmtree(work / "results", ignore_errors=True)
                rows["ablate run"][way].append(call(["run", "-c", "exp.toml"], work))
                rows["ablate status"][way].append(call(["status"], work))
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Median of {args.rounds} rounds, fresh and warm alternating; the "
        f"warm server itself took {server_start:.1f}s to start (once per test process).",
        "",
        "| command | fresh wall (s) | warm wall (s) | fresh CPU (s) | warm CPU (s) | CPU saved |",
        "|---|---|---|---|---|---|",
    ]
    for name, ways in rows.items():
        fw, fc = (statistics.median(t[i] for t in ways["fresh"]) for i in (0, 1))
        ww, wc = (statistics.median(t[i] for t in ways["warm"]) for i in (0, 1))
        lines.append(f"| {name} | {fw:.2f} | {ww:.2f} | {fc:.2f} | {wc:.2f} | {fc / max(wc, 1e-9):.1f}x |")
    lines += ["", "`ablate run` on the tiny project trains 8 runs and merges (tables, statistics, 5 plots as PNG "
              "and PDF); a fresh process also imports torch, scikit-learn, matplotlib and the rest first."]
    publish("warm", "Real processes in the tests: fresh against forked from a warm server",
            lines, "python scripts/bench_warm.py")


if __name__ == "__main__":
    main()
