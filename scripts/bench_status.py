"""Wall time of `ablate status` on an 18-cell experiment and of `ablate run` on a finished one.

Builds a real 18-cell experiment (2 layer configs x 9 representations x 10 runs, small demo
data, short training), then times each command as a fresh process (median of several), beside
two baselines measured in the same run: a bare Python start and `import torch` (what every
command would pay if the read-only path imported torch). Writes docs/benchmarks.md.

    python scripts/bench_status.py [--repeat 7]
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

CONFIG = """name = "bench"
dataset = "benchdemo"
num_runs = 10
device = "cpu"
[layer_configs.all_layers]
include = ["*"]
[layer_configs.visual_only]
include = ["*.attn1.*"]
[classifier]
hidden_dim = 32
[training]
max_epochs = 20
patience = 20
"""
DATASETS = '[benchdemo]\nkind = "demo"\nnum_samples = 200\nnum_classes = 10\nseed = 0\n'


def timed(cmd: list[str], cwd: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    ablate = [sys.executable, "-m", "ablation_cli"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "exp.toml").write_text(CONFIG)
        (work / "datasets.toml").write_text(DATASETS)
        print("building an 18-cell experiment (2 x 9 cells x 10 runs) ...", flush=True)
        build = timed([*ablate, "run", "--config", "exp.toml"], work, 1)
        rows = {
            "python -c pass (baseline)": timed([sys.executable, "-c", "pass"], work, args.repeat),
            "python -c 'import torch' (baseline)": timed([sys.executable, "-c", "import torch"], work, args.repeat),
            "ablate status": timed([*ablate, "status"], work, args.repeat),
            "ablate status --json": timed([*ablate, "status", "--json"], work, args.repeat),
            "ablate run (all 18 cells finished)": timed([*ablate, "run", "--config", "exp.toml"], work,
                                                        max(3, args.repeat // 2)),
        }
        n_files = sum(1 for _ in (work / "results").rglob("*.json"))
    torch_import = rows["python -c 'import torch' (baseline)"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Experiment: 18 cells x 10 runs ({n_files} JSON files), "
        f"built in {build:.1f}s. Median wall time of a fresh process over {args.repeat} calls.",
        "",
        "| command | wall time (s) | vs `import torch` |",
        "|---|---|---|",
    ]
    for name, seconds in rows.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / torch_import:.2f}x |")
    lines += ["", f"`ablate status` answers in {rows['ablate status']:.3f}s (target: well under 0.5s); "
              f"a finished `ablate run` verifies all {n_files} checkpoints and exits in "
              f"{rows['ablate run (all 18 cells finished)']:.3f}s."]
    publish("status", "`ablate status` and a finished `ablate run`", lines, "python scripts/bench_status.py")


if __name__ == "__main__":
    main()
