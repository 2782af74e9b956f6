"""The MLP protocol (docs/training.md): one run = one seeded training with best-epoch restore.

3 x [Linear(hidden) -> BatchNorm1d -> ReLU -> Dropout] -> Linear(num_classes);
Adam; ReduceLROnPlateau on validation accuracy; early stopping on validation
accuracy; the weights evaluated are a *copy* of the best validation epoch's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ablation_cli import __version__, runtime
from ablation_cli.durable import atomic_write, crash_point
from ablation_cli.errors import DataError
from ablation_cli.training.metrics import evaluate
from ablation_cli.training.mlp import MLP
from ablation_cli.training.results import Evaluation, LearningCurve, RunDoneCallback, RunResult
from ablation_cli.training.stacked import stacked_logits, stacked_losses
from ablation_cli.training.standardise import PreparedData, Split_
from ablation_cli.training.standardise import prepare as prepare  # callers prepare through the trainer
from ablation_cli.training.state import SavedState, TrainingState

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
    runs_in_parallel: int = 0  # 0: all of a cell's runs together on CUDA, one at a time on CPU
    amp: str = "off"  # off, bf16, fp16 (CUDA)
    checkpoint_every_s: float = 300.0  # how often the training state of unfinished runs is handed to save


class RunStates:
    """Where a chunk's runs keep their training state between epochs (executors/cell.py writes it next to
    the run checkpoints): ``load(i)`` the state run i saved, or None; ``save(i, state)`` after an epoch."""

    def load(self, i: int) -> TrainingState | None:
        return None

    def save(self, i: int, state: TrainingState) -> None:
        pass


def library_versions() -> dict[str, str]:
    """What a run's numbers depend on besides its inputs (recorded in every checkpoint's meta)."""
    return {"ablate": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}


OutOfMemoryError: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def free_cuda_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {spec}: CUDA is not available on this machine", hint="use --device cpu")
    return device



@torch.no_grad()
def _predict(model: nn.Module, x: Split_) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)])


EpochCallback = Callable[[int, float], None]  # (epoch, val_acc)
RunEpochCallback = Callable[[int, int, float], None]  # (run position, epoch, val_acc)


def train_run(data: PreparedData, params: TrainParams, seed: int,
              on_epoch: EpochCallback | None = None) -> RunResult:
    """Train one run. All randomness (init, shuffling, dropout) derives from ``seed`` alone."""
    return train_runs(data, params, [seed], on_epoch=(lambda _i, e, a: on_epoch(e, a)) if on_epoch else None)[0]


class _Run:
    """One run's model, optimiser, schedule, random streams and early-stopping state."""

    def __init__(self, data: PreparedData, params: TrainParams, seed: int) -> None:
        self.seed = seed
        started = time.perf_counter()
        torch.manual_seed(seed)  # initialisation (and CUDA's stream), exactly as a run trained alone
        self.model = MLP(data.feature_dim, data.num_classes, params.hidden_dim, params.num_hidden_layers,
                         params.dropout).to(data.device)
        # the run's own dropout stream: the global generator's state right after its initialisation,
        # swapped in around each of its forward passes, so interleaving runs changes nothing
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(data.device) if data.device.type == "cuda" else None
        self.shuffle = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="max", factor=params.plateau_factor, patience=params.plateau_patience)
        self.curve: LearningCurve = {"train_loss": [], "val_loss": [], "val_acc": [], "lr": []}
        self.best_acc, self.best_epoch, self.since_best = -1.0, 0, 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.epoch = 0  # epochs trained
        self.loss_sum, self.seen = 0.0, 0
        # this run's share of the wall time: its own set-up and evaluation, and 1/k of each epoch that
        # k runs trained together (so the shares of a chunk add up to its wall time)
        self.time_s = time.perf_counter() - started

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A training forward pass on this run's own random stream."""
        saved = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(x.device) if self.cuda_rng is not None else None
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, x.device)
        try:
            return self.model(x)
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(saved)
            if self.cuda_rng is not None and saved_cuda is not None:
                self.cuda_rng = torch.cuda.get_rng_state(x.device)
                torch.cuda.set_rng_state(saved_cuda, x.device)

    def state(self, scaler: torch.amp.GradScaler | None = None) -> TrainingState:
        """Everything the next epoch depends on, between two epochs (tensors and plain values only)."""
        return {"seed": self.seed, "epoch": self.epoch, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "rng": self.rng,
                "cuda_rng": self.cuda_rng, "shuffle": self.shuffle.get_state(), "curve": self.curve,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "best_state": self.best_state, "time_s": self.time_s,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def load_state(self, saved: TrainingState, device: torch.device) -> None:
        """Go on from :meth:`state` (of a run of the same seed, cell and settings)."""
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.rng = saved["rng"].cpu()
        if self.cuda_rng is not None and (cuda_rng := saved.get("cuda_rng")) is not None:
            self.cuda_rng = cuda_rng.cpu()
        self.shuffle.set_state(saved["shuffle"].cpu())
        curve = saved["curve"]
        self.curve = {"train_loss": list(curve["train_loss"]), "val_loss": list(curve["val_loss"]),
                      "val_acc": list(curve["val_acc"]), "lr": list(curve["lr"])}
        self.best_acc, self.best_epoch = float(saved["best_acc"]), int(saved["best_epoch"])
        self.since_best, self.epoch = int(saved["since_best"]), int(saved["epoch"])
        self.best_state = {k: v.to(device) for k, v in saved["best_state"].items()}
        self.time_s += float(saved["time_s"])

    def end_epoch(self, epoch: int, val_logits: torch.Tensor, y_val: torch.Tensor, patience: int) -> bool:
        """Record the epoch, step the schedule, keep a copy of the best weights; True when it stops."""
        val_loss = float(F.cross_entropy(val_logits.float(), y_val))
        val_acc = int((val_logits.argmax(1) == y_val).sum()) / y_val.shape[0]
        self.curve["train_loss"].append(self.loss_sum / max(self.seen, 1))
        self.curve["val_loss"].append(val_loss)
        self.curve["val_acc"].append(val_acc)
        self.curve["lr"].append(float(self.opt.param_groups[0]["lr"]))
        self.loss_sum, self.seen = 0.0, 0
        self.sched.step(val_acc)
        if val_acc > self.best_acc:
            self.best_acc, self.best_epoch, self.since_best = val_acc, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # a copy
        else:
            self.since_best += 1
        return self.since_best >= patience


def train_runs(data: PreparedData, params: TrainParams, seeds: list[int],
               on_epoch: RunEpochCallback | None = None, on_done: RunDoneCallback | None = None,
               stacked: bool | None = None, states: RunStates | None = None) -> list[RunResult]:
    """Train ``len(seeds)`` runs together, in lockstep: every step takes one batch of each run (its own
    shuffle), one backward pass over the sum of their losses, then each run's own Adam step. Each
    run keeps its own schedule, early stopping and best weights, and ``on_done`` gets its result the
    moment it stops. On CUDA (``stacked``) the runs' layers are stacked and multiplied as one batched
    matmul; on CPU each run's forward pass is its own (a batched matmul is no faster there), so run k
    is bit-identical whether it is trained alone or beside others.

    With ``states``, a run whose training state was saved goes on from it (its weights, optimiser,
    schedule, random streams, curves and best weights), and every ``params.checkpoint_every_s`` the state
    of each unfinished run is saved: a run cut off and resumed ends exactly as the uninterrupted one."""
    stacked = data.device.type == "cuda" if stacked is None else stacked
    if data.device.type == "cpu":
        runtime.keep_freed_memory_for_training()
    runs = [_Run(data, params, seed) for seed in seeds]
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
    scaler = torch.amp.GradScaler(data.device.type) if params.amp == "fp16" else None
    if states is not None:
        for i, run in enumerate(runs):
            if (saved := states.load(i)) is not None:
                run.load_state(saved, data.device)
                if scaler is not None and (scaler_state := saved.get("scaler")):
                    scaler.load_state_dict(scaler_state)
    results: dict[int, RunResult] = {}
    x_tr, y_tr = data.x["train"], data.y["train"]
    n = x_tr.shape[0]
    active = list(range(len(runs)))
    last_saved = time.monotonic()
    while active:
        crash_point("epoch")
        epoch_started = time.perf_counter()
        for i in active:
            runs[i].model.train()
        orders = [torch.randperm(n, generator=runs[i].shuffle).to(data.device) for i in active]
        for start in range(0, n, params.batch_size):
            batches = [order[start : start + params.batch_size] for order in orders]
            if batches[0].numel() < 2:  # BatchNorm cannot train on a single sample
                continue
            for i in active:
                runs[i].opt.zero_grad(set_to_none=True)
            with _autocast(data.device, params.amp):
                if stacked:
                    losses = stacked_losses([runs[i] for i in active], x_tr, y_tr, batches, params.dropout)
                else:
                    losses = [F.cross_entropy(runs[i].forward(x_tr[idx]), y_tr[idx]) for i, idx in zip(active, batches)]
            total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
            (scaler.scale(total) if scaler is not None else total).backward()
            for i, loss, idx in zip(active, losses, batches):
                if scaler is not None:
                    scaler.step(runs[i].opt)  # skipped for a run whose gradients overflowed
                else:
                    runs[i].opt.step()
                runs[i].loss_sum += float(loss.detach()) * idx.numel()
                runs[i].seen += idx.numel()
            if scaler is not None:
                scaler.update()
        val = _predict_runs([runs[i].model for i in active], data.x["val"], stacked, params.amp)
        share = (time.perf_counter() - epoch_started) / len(active)
        for i in active:
            runs[i].time_s += share
        still = []
        for pos, i in enumerate(active):
            epoch = runs[i].epoch = runs[i].epoch + 1
            stop = runs[i].end_epoch(epoch, val[pos], data.y["val"], params.patience)
            if on_epoch is not None:
                on_epoch(i, epoch, runs[i].curve["val_acc"][-1])
            if stop or epoch >= params.max_epochs:
                results[i] = _finish(runs[i], data)
                if on_done is not None:
                    on_done(i, results[i])
            else:
                still.append(i)
        active = still
        if states is not None and active and time.monotonic() - last_saved >= params.checkpoint_every_s:
            for i in active:
                states.save(i, runs[i].state(scaler))
            last_saved = time.monotonic()
    return [results[i] for i in range(len(runs))]


def _finish(run: _Run, data: PreparedData) -> RunResult:
    started = time.perf_counter()
    run.model.load_state_dict(run.best_state)
    evaluated = _evaluate(run.model, data)
    run.time_s += time.perf_counter() - started
    return RunResult(**evaluated, learning_curve=run.curve, best_epoch=run.best_epoch,
                     epochs_run=len(run.curve["val_acc"]), train_time_s=run.time_s,
                     feature_dim=data.feature_dim, device=str(data.device))


def _autocast(device: torch.device, amp: str) -> Any:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def _predict_runs(models: list[MLP], x: Split_, stacked: bool, amp: str) -> list[torch.Tensor]:
    """Eval-mode logits of every model on ``x`` (large batches; stacked on CUDA)."""
    for m in models:
        m.eval()
    if not stacked:  # each chunk of x read (and standardised) once for every model
        chunks: list[list[torch.Tensor]] = [[] for _ in models]
        for i in range(0, x.shape[0], EVAL_BATCH):
            rows = x[i : i + EVAL_BATCH]
            for out, m in zip(chunks, models):
                out.append(m(rows))
        return [torch.cat(out) for out in chunks]
    with _autocast(x.device, amp):
        outs = [stacked_logits(models, x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)]
    logits = torch.cat(outs, dim=1)
    return [logits[r] for r in range(len(models))]


def _evaluate(model: nn.Module, data: PreparedData) -> Evaluation:
    def splits() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for split in ("train", "val", "test"):
            proba = torch.softmax(_predict(model, data.x[split]).double(), dim=1).cpu().numpy()
            yield split, data.y[split].cpu().numpy(), proba
    return evaluate(splits(), data.num_classes)


def save_state(path: Path, doc: SavedState) -> None:
    """A run's training state (:meth:`_Run.state` plus its identity), written atomically."""
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_state(path: Path, device: torch.device) -> SavedState | None:
    """A state :func:`save_state` wrote, or None when it is missing or unreadable. Tensors and plain
    values only (``weights_only``): nothing in it is executed."""
    try:
        doc = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a damaged state is only lost time: the run starts over
        return None
    return cast(SavedState, doc) if isinstance(doc, dict) else None  # cell.py checks what it is for
