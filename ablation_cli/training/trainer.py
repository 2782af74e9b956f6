"""The MLP protocol of DOMAIN.md: one run = one seeded training with best-epoch restore.

3 x [Linear(hidden) -> BatchNorm1d -> ReLU -> Dropout] -> Linear(num_classes);
Adam; ReduceLROnPlateau on validation accuracy; early stopping on validation
accuracy; the weights evaluated are a *copy* of the best validation epoch's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ablation_cli.errors import DataError
from ablation_cli.training.metrics import classification_metrics, per_class_and_confusion
from ablation_cli.training.split import Split

EVAL_BATCH = 8192


@dataclass(frozen=True)
class TrainParams:
    hidden_dim: int = 512
    num_hidden_layers: int = 3
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 15
    plateau_factor: float = 0.5
    plateau_patience: int = 10


@dataclass(frozen=True)
class PreparedData:
    """Standardised features on the device, one tensor per split."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    num_classes: int
    device: torch.device

    @property
    def feature_dim(self) -> int:
        return int(self.x["train"].shape[1])


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {spec}: CUDA is not available on this machine", hint="use --device cpu")
    return device


def prepare(features: np.ndarray, labels: np.ndarray, split: Split, num_classes: int,
            device: torch.device) -> PreparedData:
    """Standardise with train-split statistics only, move every split to the device once."""
    train = features[split.train].astype(np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    x, y = {}, {}
    for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        z = ((features[idx] - mean) / std).astype(np.float32)
        x[name] = torch.from_numpy(z).to(device)
        y[name] = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
    return PreparedData(x, y, num_classes, device)


class MLP(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, num_hidden_layers: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)])


EpochCallback = Callable[[int, float], None]  # (epoch, val_acc)


def train_run(data: PreparedData, params: TrainParams, seed: int,
              on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train one run. All randomness (init, shuffling, dropout) derives from ``seed`` alone."""
    started = time.perf_counter()
    torch.manual_seed(seed)  # init and dropout
    shuffle = torch.Generator().manual_seed(seed)
    model = MLP(data.feature_dim, data.num_classes, params.hidden_dim, params.num_hidden_layers,
                params.dropout).to(data.device)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=params.plateau_factor, patience=params.plateau_patience
    )
    x_tr, y_tr = data.x["train"], data.y["train"]
    n = x_tr.shape[0]
    curve: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": [], "lr": []}
    best_acc, best_epoch, since_best = -1.0, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, params.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(data.device)
        loss_sum, seen = 0.0, 0
        for start in range(0, n, params.batch_size):
            idx = order[start : start + params.batch_size]
            if idx.numel() < 2:  # BatchNorm cannot train on a single sample
                continue
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        val_logits = _predict(model, data.x["val"])
        val_loss = float(F.cross_entropy(val_logits, data.y["val"]))
        val_acc = int((val_logits.argmax(1) == data.y["val"]).sum()) / data.y["val"].shape[0]
        curve["train_loss"].append(loss_sum / max(seen, 1))
        curve["val_loss"].append(val_loss)
        curve["val_acc"].append(val_acc)
        curve["lr"].append(float(opt.param_groups[0]["lr"]))
        sched.step(val_acc)
        if val_acc > best_acc:
            best_acc, best_epoch, since_best = val_acc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, val_acc)
        if since_best >= params.patience:
            break
    model.load_state_dict(best_state)
    return _evaluate(model, data) | {
        "learning_curve": curve,
        "best_epoch": best_epoch,
        "epochs_run": len(curve["val_acc"]),
        "train_time_s": time.perf_counter() - started,
        "feature_dim": data.feature_dim,
        "device": str(data.device),
    }


def _evaluate(model: nn.Module, data: PreparedData) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        proba = torch.softmax(_predict(model, data.x[split]).double(), dim=1).cpu().numpy()
        y = data.y[split].cpu().numpy()
        m = classification_metrics(y, proba, data.num_classes, split)
        metrics.update(m if split != "train" else {"train_acc": m["train_acc"]})
        if split != "train":
            details[split] = per_class_and_confusion(y, proba, data.num_classes)
    return {
        "metrics": metrics,
        "confusion_matrices": {s: details[s]["confusion_matrix"] for s in ("val", "test")},
        "per_class": {s: details[s]["per_class"] for s in ("val", "test")},
    }
