"""The reference training loop: what a researcher writes by hand, kept plain on purpose.

Per run: a DataLoader over a TensorDataset of shuffled batches of 64, zero_grad / backward / step,
one validation pass per epoch for ReduceLROnPlateau and early stopping, the best weights kept, a
test pass at the end. Default environment (no MKL settings), no train-set evaluation per epoch,
no progress bar, nothing else. The same protocol as ablate's trainer (MLP 3 x 512, BatchNorm,
dropout 0.5, Adam 1e-3 / 1e-4, plateau 0.5 / 10, patience 15, 300 epochs at most, the same split).

    python scripts/plain_loop.py FEATURES.npy LABELS.npy [--runs 3] [--seed 42]

Prints one JSON line: epochs trained (all runs), mean test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ablation_cli.training.split import make_split  # the same 70/10/20 stratified split


def mlp(in_dim: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(3):
        layers += [nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.5)]
        width = 512
    return nn.Sequential(*layers, nn.Linear(width, classes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("features")
    parser.add_argument("labels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-epochs", type=int, default=300)
    args = parser.parse_args()
    x = np.load(args.features).astype(np.float32)
    y = np.load(args.labels).astype(np.int64)
    classes = int(y.max()) + 1
    split = make_split(y, 0.7, 0.1, 0.2, 42, True)
    mean, std = x[split.train].mean(0), x[split.train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    part = {name: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
            for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))}
    epochs_total, accs = 0, []
    started = time.perf_counter()  # the training loops alone (ablate's runs record the same span)
    for k in range(args.runs):
        torch.manual_seed(args.seed + k)
        model = mlp(x.shape[1], classes)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=10)
        train = DataLoader(TensorDataset(*part["train"]), batch_size=64, shuffle=True, drop_last=False)
        best, best_state, since = -1.0, None, 0
        for _epoch in range(args.max_epochs):
            model.train()
            for xb, yb in train:
                if len(yb) < 2:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                acc = float((model(part["val"][0]).argmax(1) == part["val"][1]).float().mean())
            sched.step(acc)
            epochs_total += 1
            if acc > best:
                best, best_state, since = acc, {n: t.clone() for n, t in model.state_dict().items()}, 0
            else:
                since += 1
                if since >= 15:
                    break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            accs.append(float((model(part["test"][0]).argmax(1) == part["test"][1]).float().mean()))
    print(json.dumps({"epochs": epochs_total, "test_acc": float(np.mean(accs)), "threads": torch.get_num_threads(),
                      "train_s": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
