"""Feature extraction: all 9 representations in one batched pass vs a per-sample loop, same run.

N synthetic rank-1 LoRAs at the real SD1.5 shapes (the demo generator: 128 matrices, 99,648 floats).
  - baseline: the way the original code computed features: for each LoRA, for each of the 9
    representations (the ensemble recomputing its parts), for each of the 128 matrices, call a
    per-matrix numpy function (ablation_cli.features.reference, the tests' reference definitions);
  - ablate:   Workspace.prepare(all 9) without the cache: every layer's stack once, in row chunks,
    every representation batched, intermediates (sort, moments, SVD, FFT) shared.
The per-sample loop costs the same for every LoRA, so it is timed on the first --baseline-samples
LoRAs and scaled to N (the printout says so); each mode runs in a fresh process, which also
measures its peak RSS growth.

    python scripts/bench_features.py [--n 2000] [--baseline-samples 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.benchlib import publish, run_child  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
from ablation_cli.config import SplitConfig
from ablation_cli.data.demo import DemoSource
from ablation_cli.data.table import LoraStream
from ablation_cli.workspace import Workspace
from ablation_cli.features import default_grid, reference
mode, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
table = DemoSource(name="bench", num_samples=n, num_classes=10, seed=1).load()
def status_mb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) after the data is in memory
    fh.write("5")
base = status_mb("VmRSS:")
reps = default_grid()
layers = sorted(table.weights)
start = time.perf_counter()
if mode == "loop":
    rows = {rep: [] for rep in reps}
    for i in range(k):
        for rep in reps:
            fn = reference.REFERENCES[rep]
            rows[rep].append(np.concatenate([fn(table.weights[la][i].astype(np.float64)) for la in layers]))
    done, dims = k, {rep: len(rows[rep][0]) for rep in reps}
else:
    class Loaded:
        def describe(self): return table.info
        def stream(self, chunk_bytes):  # the whole table, already in memory, as one chunk
            return LoraStream.of(table)
    ws = Workspace(Loaded(), SplitConfig(), cache=None)
    ws.prepare(reps)
    dims = {rep: ws.features(rep, layers).shape[1] for rep in reps}
    done = n
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "samples": done, "dims": dims,
                  "rss_growth_mb": status_mb("VmHWM:") - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--baseline-samples", type=int, default=100)
    args = parser.parse_args()
    n, k = args.n, min(args.baseline_samples, args.n)
    batched = run_child(CHILD, "batched", n, k)
    loop = run_child(CHILD, "loop", n, k)
    assert batched["dims"] == loop["dims"], (batched["dims"], loop["dims"])
    per_sample = loop["seconds"] / loop["samples"]
    loop_total = per_sample * n
    ratio = loop_total / batched["seconds"]
    total_dim = sum(batched["dims"].values())
    lines = [
        f"{n} synthetic rank-1 LoRAs at the real SD1.5 shapes (128 matrices), all 9 representations "
        f"({total_dim} features per LoRA in all), 2-core CPU, a fresh process per mode.", "",
        "| method | time for all LoRAs | per LoRA | peak RSS growth (MiB) |",
        "|---|---|---|---|",
        f"| per-sample loop (original way; timed on {k} LoRAs, scaled to {n}) | {loop_total:.1f} s | "
        f"{per_sample * 1000:.1f} ms | {loop['rss_growth_mb']:.0f} |",
        f"| ablate: one batched pass | {batched['seconds']:.1f} s | {batched['seconds'] / n * 1000:.2f} ms | "
        f"{batched['rss_growth_mb']:.0f} |",
        "", f"**Speed-up: {ratio:.0f}x** (target: 20x). The batched pass's RSS growth is its output "
        f"({n * total_dim * 4 / 2**20:.0f} MiB of float32 features over the 9 representations, the ensemble "
        "included) plus float64 temporaries of one row chunk of one layer.",
    ]
    publish("features", "Feature extraction", lines, "python scripts/bench_features.py")


if __name__ == "__main__":
    main()
