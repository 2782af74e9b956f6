"""Training one cell: ablate's trainer vs the original per-run loop with a DataLoader, same protocol.

One cell: R runs (default 10) on N samples (default 2,000) of ensemble-size features (8,576 dims,
3 classes of Gaussian blobs), the DOMAIN.md MLP (3 x 512, BatchNorm, dropout 0.5), Adam, a fixed
number of epochs (no early stop, so every method does the same number of steps).
  - baseline: the original approach: for each run, a TensorDataset + DataLoader(shuffle, batch 64)
    for training and a DataLoader for per-epoch validation, global seeding;
  - ablate, runs one at a time: batches read and standardised from the features (on CUDA: the data
    on the device as one tensor), evaluation in large batches (ablate's CPU default);
  - ablate, all runs together, stacked: the CUDA algorithm (one batched matmul per layer for all
    runs), run here on the CPU.
Each in a fresh process; mean test accuracy is printed beside each time.

    python scripts/bench_training.py [--runs 10] [--n 2000] [--epochs 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.benchlib import publish, run_child  # noqa: E402

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT"); os.environ.setdefault("MKL_DYNAMIC", "FALSE")
import numpy as np, torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from ablation_cli.training.split import make_split
from ablation_cli.training.trainer import MLP, TrainParams, prepare, train_runs
mode, runs, n, epochs, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dim, classes = 8576, 3
rng = np.random.default_rng(0)
y = np.arange(n) % classes
x = (rng.normal(size=(classes, dim))[y] * 0.05 + rng.normal(size=(n, dim))).astype(np.float32)
split = make_split(y, 0.7, 0.1, 0.2, seed=42, stratify=True)
dev = torch.device(device)
data = prepare(x, y, split, classes, dev)
params = TrainParams(max_epochs=epochs, patience=epochs + 1)
seeds = list(range(42, 42 + runs))
start = time.perf_counter()
if mode == "dataloader":
    accs = []
    xs = {k: v[:] for k, v in data.x.items()}  # the baseline's own standardised copy (ablate reads batches)
    for seed in seeds:
        torch.manual_seed(seed)
        model = MLP(dim, classes, 512, 3, 0.5).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=10)
        train = DataLoader(TensorDataset(xs["train"], data.y["train"]), batch_size=64, shuffle=True)
        val = DataLoader(TensorDataset(xs["val"], data.y["val"]), batch_size=64)
        test = DataLoader(TensorDataset(xs["test"], data.y["test"]), batch_size=64)
        best, best_state = -1.0, None
        for epoch in range(epochs):
            model.train()
            for xb, yb in train:
                if len(yb) < 2:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in val:
                    correct += int((model(xb).argmax(1) == yb).sum())
            acc = correct / len(data.y["val"])
            sched.step(acc)
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            accs.append(sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in test) / len(data.y["test"]))
else:
    results = train_runs(data, params, seeds, stacked=(mode == "stacked")) if mode == "stacked" else [
        r for s in seeds for r in train_runs(data, params, [s])]
    accs = [r["metrics"]["test_acc"] for r in results]
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "test_acc": float(np.mean(accs)), "threads": torch.get_num_threads()}))
"""

MODES = {
    "dataloader": "original: per-run loop, DataLoader",
    "sequential": "ablate: runs one at a time (CPU default)",
    "stacked": "ablate: all runs stacked (the CUDA algorithm)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    got = {}
    for mode in MODES:
        got[mode] = run_child(CHILD, mode, args.runs, args.n, args.epochs, args.device)
        print(mode, got[mode], flush=True)
    base = got["dataloader"]["seconds"]
    lines = [
        f"One cell: {args.runs} runs x {args.epochs} epochs on {args.n} samples x 8,576 features (ensemble size), "
        f"MLP 3 x 512, batch 64, device {args.device} ({got['dataloader']['threads']} torch threads), "
        "a fresh process per method.", "",
        "| method | time | speed-up vs original | mean test acc |", "|---|---|---|---|",
    ]
    for mode, label in MODES.items():
        r = got[mode]
        lines.append(f"| {label} | {r['seconds']:.1f} s | {base / r['seconds']:.2f}x | {r['test_acc']:.3f} |")
    train_n = int(args.n * 0.7)
    steps = args.runs * args.epochs * -(-train_n // 64)
    weights = 8576 * 512 + 2 * 512 * 512 + 512 * 3
    flops = steps * 64 * 2 * (2 * weights + 2 * (weights - 8576 * 512))  # forward + weight grads + input grads
    lines += ["", f"The matrix products alone are about {flops / 1e12:.1f} TFLOP here ({steps} steps), so the fastest "
              f"method runs at {flops / 1e9 / min(r['seconds'] for r in got.values()):.0f} GFLOP/s. On a CPU the "
              "work is the matrix products, which batching runs does not reduce: stacking R runs into one batched "
              "matmul is no faster than R matmuls, and ablate therefore trains runs one at a time on CPU. Batching "
              "pays where one small MLP leaves the device idle: on a GPU. GPU figures: run this script with "
              "`--device cuda`."]
    key = "training" if args.device == "cpu" else f"training-{args.device.replace(':', '')}"
    publish(key, f"Training one cell ({args.device})", lines,
            f"python scripts/bench_training.py --device {args.device}")


if __name__ == "__main__":
    main()
