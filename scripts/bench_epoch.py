"""Training at the hardware's pace: ablate's whole `run` against a plain hand-written loop, per epoch.

The same features (the demo generator's, 800 LoRAs as `demo` or more with ``--samples``, exported with
`ablate features`), the same protocol and split, the same thread count, each a fresh process timed
whole (start-up, loading, training, evaluation, checkpoints, merge). The process's fixed costs
(imports, the merge and its plots) weigh on a tiny dataset's few short epochs and fade on larger ones.
Early stopping makes epoch counts differ, so the figure is wall time per epoch trained. Methods:
  - baseline: scripts/plain_loop.py (DataLoader of shuffled batches of 64, zero_grad/backward/step,
    one validation pass per epoch; default environment);
  - ablate run, as shipped (MKL_CBWR=AUTO,STRICT: bit-reproducible across processes);
  - ablate run with MKL_CBWR=AUTO (the user's setting wins over ablate's default): the price of
    strict reproducibility.

    python scripts/bench_epoch.py [--runs 3] [--reps stats,ensemble] [--samples 800] [--repeats 3]

The machine may be noisy (the same plain loop measured 277 and 398 ms per epoch an hour apart on the
2-core VM of docs/benchmarks.md): each method runs ``--repeats`` times, interleaved, and the medians
are reported with the range of the ratio.
"""

from __future__ import annotations

import argparse
import json
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

CACHE = str(REPO / ".feature_cache")
METHODS = ["plain", "strict", "auto"]


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return elapsed, out.stdout


def ablate_epochs(root: Path) -> tuple[int, float]:
    """Epochs trained and seconds in training (each run's own span: model, epochs, final evaluation)."""
    runs = [json.loads(p.read_text()) for p in root.glob("*/checkpoints/runs/*/run_*.json")]
    return sum(r["epochs_run"] for r in runs), sum(r["train_time_s"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reps", default="stats,ensemble")
    parser.add_argument("--samples", type=int, default=800, help="LoRAs of the demo generator (800: `demo`)")
    parser.add_argument("--repeats", type=int, default=3, help="each method this many times, interleaved")
    args = parser.parse_args()
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    ablate = [sys.executable, "-m", "ablation_cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = "demo" if args.samples == 800 else f"demo{args.samples}"
        config = work / "exp.toml"  # the default experiment, its datasets.toml beside it with the larger demo
        config.write_text((REPO / "configs/visual_ablation.toml").read_text())
        larger = f'\n[{dataset}]\nkind = "demo"\nnum_samples = {args.samples}\nnum_classes = 10\nseed = 0\n'
        (work / "datasets.toml").write_text((REPO / "configs/datasets.toml").read_text()
                                            + (larger if dataset != "demo" else ""))
        data = ["-c", str(config), "--dataset", dataset, "--cache-dir", CACHE]
        for rep in args.reps.split(","):
            subprocess.run([*ablate, "features", *data, "--reps", rep, "--layer-config", "all_layers",
                            "--out", str(work / rep)], check=True, capture_output=True)
            plain = [sys.executable, str(REPO / "scripts/plain_loop.py"), str(work / rep / f"{rep}.npy"),
                     str(work / rep / "labels.npy"), "--runs", str(args.runs)]
            # per method: (whole-process seconds per epoch, training seconds per epoch, epochs), per repeat
            got: dict[str, list[tuple[float, float, int]]] = {m: [] for m in METHODS}
            for repeat in range(args.repeats):
                for method in METHODS[repeat % 3:] + METHODS[: repeat % 3]:  # each method first in turn
                    if method == "plain":
                        secs, out = timed(plain, plain_env, work)
                        base = json.loads(out.strip().splitlines()[-1])
                        epochs, train_s = base["epochs"], base["train_s"]
                    else:
                        out_dir = work / f"{rep}-{method}-{repeat}"
                        env = plain_env if method == "strict" else {**plain_env, "MKL_CBWR": "AUTO"}
                        secs, _ = timed([*ablate, "run", *data, "--reps", rep, "--layer-configs", "all_layers",
                                         "--num-runs", str(args.runs), "-o", str(out_dir)], env, work)
                        epochs, train_s = ablate_epochs(out_dir)
                    got[method].append((secs / epochs, train_s / epochs, epochs))
                    print(rep, repeat, method, f"{secs:.1f} s, {epochs} epochs", flush=True)
            med = {m: (statistics.median(w for w, _, _ in v), statistics.median(t for _, t, _ in v), v[0][2])
                   for m, v in got.items()}
            ratios = {m: [w / b[0] for (w, _, _), b in zip(got[m], got["plain"])] for m in ("strict", "auto")}
            b, bt = med["plain"][0], med["plain"][1]
            rows.append(f"| {rep} | {med['plain'][2]} | {b * 1000:.0f} ms | {bt * 1000:.0f} ms | "
                        + " | ".join(f"{med[k][2]} | {med[k][0] * 1000:.0f} ms | **{med[k][0] / b:.2f}x** "
                                     f"({min(ratios[k]):.2f}-{max(ratios[k]):.2f}) | {med[k][1] * 1000:.0f} ms | "
                                     f"{med[k][1] / bt:.2f}x" for k in ("strict", "auto")) + " |")
            print(rows[-1], flush=True)
    lines = [
        f"Demo generator ({args.samples} LoRAs, all_layers), {args.runs} runs per method, early stopping "
        "(patience 15), "
        f"{platform.machine()}, {os.cpu_count()} cores, torch default threads; each method one fresh process, "
        f"timed whole, {args.repeats} times, the methods interleaved (each first in turn); medians, and in "
        "brackets the range of the ratio over the repeats (each against the plain loop of its own repeat). "
        "Per epoch = wall time / epochs trained (all runs). Training only = the runs' own time "
        "(model, epochs, final evaluation) / epochs: what is left of the whole process is its fixed costs "
        "(imports, loading, the split; ablate's checkpoints, merge and plots).",
        "",
        "| representation | plain loop: epochs | per epoch | training only | ablate (strict MKL): epochs | per epoch "
        "| vs plain | training only | vs plain | ablate (MKL_CBWR=AUTO): epochs | per epoch | vs plain "
        "| training only | vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    key = "epoch" if args.samples == 800 else f"epoch-{args.samples}"
    publish(key, f"Training per epoch against a plain loop, {args.samples} LoRAs (scripts/bench_epoch.py)", lines,
            f"python scripts/bench_epoch.py --runs {args.runs} --reps {args.reps} --samples {args.samples} "
            f"--repeats {args.repeats}")


if __name__ == "__main__":
    main()
