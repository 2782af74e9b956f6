"""What MLflow tracking adds to the wall time of a demo grid.

Runs the same grid as fresh processes on a warm feature cache, in fresh output folders, alternating:
without tracking (the baseline, measured in the same run) and with ``--mlflow`` to a new SQLite store,
and prints the ratio of the medians. The tracked run pays everything: importing mlflow, creating the
store (a copy of ablate's empty-store template, as on every store after a machine's first), a parent
run per cell, a child run per training run (params, metrics, learning curves, two artifacts) and the
merge's artifacts. The template's one-time creation (MLflow's schema migrations, once per machine and
MLflow version) is timed on its own. Writes docs/benchmarks.md.

    python scripts/bench_tracking.py [--num-runs 3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.benchlib import publish  # noqa: E402

CPU: dict[str, list[float]] = {"plain": [], "tracked": []}  # user + system seconds of each grid process


def timed_run(args: list[str], cwd: Path, env: dict[str, str], kind: str | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ablation_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ablate {' '.join(args)} failed:\n{err[-3000:]}")
    if "tracking:" in err:
        raise SystemExit(f"tracking failed during the benchmark:\n{err[-3000:]}")
    if kind is not None:
        CPU[kind].append(usage.ru_utime + usage.ru_stime)
    return elapsed


def count_runs(db: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, filter_string="tags.`ablate.kind` = 'run'", max_results=5000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-runs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    grid = ["run", "--dataset", "demo", "--num-runs", str(args.num_runs), "--cache-dir", str(REPO / ".feature_cache")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "user-cache")}  # no template yet
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from ablation_cli.tracking.template import schema_template; "
                        "assert schema_template() is not None"], check=True, env=env, cwd=REPO)
        template_s = time.perf_counter() - start
        subprocess.run([sys.executable, "-m", "ablation_cli", "features", "--dataset", "demo", "--out",
                        str(work / "warm"), "--cache-dir", str(REPO / ".feature_cache")], check=True,
                       capture_output=True)  # every feature in the cache: both runs only train
        plain, tracked, logged = [], [], 0
        for i in range(args.repeat):
            plain.append(timed_run([*grid, "-o", str(work / f"plain{i}")], work, env, "plain"))
            db = work / f"mlflow{i}.db"
            tracked.append(timed_run([*grid, "-o", str(work / f"tracked{i}"), "--mlflow", f"sqlite:///{db}"], work,
                                     env, "tracked"))
            logged = count_runs(db)
            print(f"pair {i + 1}: {plain[-1]:.1f} s plain, {tracked[-1]:.1f} s tracked", flush=True)
        # the logging work alone, without the grid's noise: the same experiment synced into a fresh store
        sync = timed_run(["track", "sync", "-o", str(work / "plain0"), "--mlflow", f"sqlite:///{work / 'fresh.db'}"],
                         work, env)
    base, with_tracking = statistics.median(plain), statistics.median(tracked)
    ratio = with_tracking / base
    lines = [
        f"Demo grid (800 LoRAs, 2 x 9 cells x {args.num_runs} runs, CPU, features cached), fresh processes, "
        f"median of {args.repeat}; {platform.processor() or platform.machine()}, {platform.python_version()}.",
        "",
        "| | wall time (median) | each | vs baseline |",
        "|---|---|---|---|",
        f"| `ablate run` (baseline, same run) | {base:.1f} s | {', '.join(f'{t:.1f}' for t in plain)} | 1.00x |",
        f"| `ablate run --mlflow sqlite:///...` | {with_tracking:.1f} s | {', '.join(f'{t:.1f}' for t in tracked)} "
        f"| {ratio:.3f}x |",
        "",
        f"Tracking adds {100 * (ratio - 1):.1f} % ({with_tracking - base:.1f} s: importing mlflow, creating the "
        f"SQLite store from the template, {logged} child runs, 18 parent runs, the merge's artifacts). "
        "Target: under 5 %.",
        "",
        f"CPU time (user + system, median): {statistics.median(CPU['plain']):.1f} s without tracking, "
        f"{statistics.median(CPU['tracked']):.1f} s with it: the logging's own work is "
        f"{statistics.median(CPU['tracked']) - statistics.median(CPU['plain']):.1f} CPU seconds.",
        "",
        f"Once per machine and MLflow version, the first tracked store also makes the empty-store template "
        f"(MLflow's schema migrations): {template_s:.1f} s in a process of its own, {100 * template_s / base:.1f} % "
        "of this grid.",
        "",
        f"The logging work alone, measured without the grid's run-to-run noise: `ablate track sync` of the "
        f"finished baseline experiment into a fresh SQLite store (the same runs, parents and artifacts, plus "
        f"a process start) takes {sync:.1f} s, {100 * sync / base:.1f} % of the baseline grid.",
    ]
    publish("tracking", "MLflow tracking overhead (scripts/bench_tracking.py)", lines,
            f"python scripts/bench_tracking.py --num-runs {args.num_runs} --repeat {args.repeat}")


if __name__ == "__main__":
    main()
