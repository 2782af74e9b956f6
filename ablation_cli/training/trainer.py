"""The MLP protocol of DOMAIN.md: one run = one seeded training with best-epoch restore.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ablation_cli import __version__, runtime
from ablation_cli.durable import atomic_write, crash_point
from ablation_cli.errors import DataError
from ablation_cli.training.columns import ColumnView
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
    runs_in_parallel: int = 0  # 0: all of a cell's runs together on CUDA, one at a time on CPU
    amp: str = "off"  # off, bf16, fp16 (CUDA)
    checkpoint_every_s: float = 300.0  # how often the training state of unfinished runs is handed to save


class RunStates:
    """Where a chunk's runs keep their training state between epochs (executors/cell.py writes it next to
    the run checkpoints): ``load(i)`` the state run i saved, or None; ``save(i, state)`` after an epoch."""

    def load(self, i: int) -> dict[str, Any] | None:
        return None

    def save(self, i: int, state: dict[str, Any]) -> None:
        pass


class StandardisedRows:
    """A split of the features, standardised as it is read: ``x[idx]`` (a tensor of row positions, or a
    slice) is ``((features[rows[idx]] - mean) / std)`` as float32, the very values a standardised copy
    would hold, computed for those rows only. Training on the CPU reads its batches from it, so it holds
    no copy of the cell's features: memory follows the features, whatever their width or number of rows."""

    def __init__(self, view: ColumnView, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.view, self.rows = view, rows
        self.shape = torch.Size((len(rows), view.width))
        self.device = torch.device("cpu")
        self._mean, self._std = torch.from_numpy(mean), torch.from_numpy(std)
        # a read-only memory map (a spilled cache entry) is read with numpy: torch wants writable memory
        self._tensors = [torch.from_numpy(arr) if arr.flags.writeable and arr.dtype == np.float32 else None
                         for arr, _, _ in view.parts]
        self._src = [None if view.every_column(i) else torch.from_numpy(src)
                     for i, (_, src, _) in enumerate(view.parts)]
        self._order = None if view.order is None else torch.from_numpy(view.order)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        rows = self.rows[idx] if isinstance(idx, slice) else self.rows[idx.cpu().numpy()]
        step = max(1, BLOCK_BYTES // (8 * max(self.view.width, 1)))  # bounded float64 temporaries
        if len(rows) <= step:
            return self._standardise(rows)
        return torch.cat([self._standardise(rows[lo : lo + step]) for lo in range(0, len(rows), step)])

    def _standardise(self, rows: np.ndarray) -> torch.Tensor:
        """The rows gathered from each part with torch (both cores), laid side by side, put in the view's
        column order, standardised in float64 as the copy was made (IEEE subtraction and division: the
        same bits), then float32."""
        index = torch.from_numpy(rows)
        side = []
        for (arr, _, _), tensor, src in zip(self.view.parts, self._tensors, self._src):
            part = tensor.index_select(0, index) if tensor is not None else torch.from_numpy(arr.take(rows, axis=0))
            side.append(part if src is None else part.index_select(1, src))
        x = side[0] if len(side) == 1 else torch.cat(side, dim=1)
        if self._order is not None:
            x = x.index_select(1, self._order)
        return x.double().sub_(self._mean).div_(self._std).float()


Split_ = torch.Tensor | StandardisedRows  # one split's standardised features


@dataclass(frozen=True)
class PreparedData:
    """Standardised features, one per split: a tensor on the device (CUDA), or read and standardised a
    batch at a time (CPU)."""

    x: dict[str, Split_]
    y: dict[str, torch.Tensor]
    num_classes: int
    device: torch.device

    @property
    def feature_dim(self) -> int:
        return int(self.x["train"].shape[1])


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


def prepare(features: np.ndarray | ColumnView, labels: np.ndarray, split: Split, num_classes: int,
            device: torch.device) -> PreparedData:
    """Standardise with train-split statistics only. On CUDA every split moves to the device once, as one
    tensor; on the CPU each split is standardised as its batches are read (:class:`StandardisedRows`)."""
    view = features if isinstance(features, ColumnView) else ColumnView.of(features)
    mean, std = _train_statistics(view, split.train)
    x: dict[str, Split_] = {}
    y = {}
    for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        if device.type == "cpu":
            x[name] = StandardisedRows(view, np.asarray(idx), mean, std)
        else:
            x[name] = torch.from_numpy(_standardised(view, idx, mean, std)).to(device)
        y[name] = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
    return PreparedData(x, y, num_classes, device)


BLOCK_BYTES = 64 << 20  # float64 temporaries of a block of columns: bounded, whatever the split's size


def _column_blocks(rows: int, columns: int) -> list[slice]:
    """Blocks of at least two columns (numpy sums a single column pairwise, a block row by row: only
    blocks of two or more sum each column in the order numpy's ``mean(axis=0)`` of the whole split does),
    about ``BLOCK_BYTES`` of float64 each."""
    width = max(2, BLOCK_BYTES // (8 * max(rows, 1)))
    blocks, lo = [], 0
    while lo < columns:
        hi = min(lo + width, columns)
        if columns - hi == 1:  # never leave a single column for the last block
            hi = columns
        blocks.append(slice(lo, hi))
        lo = hi
    return blocks


def _train_statistics(features: ColumnView, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` of the ``rows`` of ``features`` in float64, bit-identical to
    ``features[rows].astype(float64).mean(0)`` and ``.std(0)`` (std 0 -> 1), computed a block of columns
    at a time: no float64 copy of the split, only of one block (numpy's std centres a copy, squares it and
    sums over rows in order, which is done here per block; each column's sums run over the rows in the
    same order, so the values are the same)."""
    n, columns = len(rows), features.width
    mean = np.empty(columns, dtype=np.float64)
    var = np.empty(columns, dtype=np.float64)
    for cols in _column_blocks(n, columns):
        block = features.take(rows, cols.start, cols.stop).astype(np.float64)
        mean[cols] = np.add.reduce(block, axis=0) / n
        block -= mean[cols]
        np.multiply(block, block, out=block)
        var[cols] = np.add.reduce(block, axis=0) / n
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean, std


def _standardised(features: ColumnView, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``((features[rows] - mean) / std).astype(float32)``, the same values, a block of columns at a time:
    the float32 result is the only full-size array."""
    out = np.empty((len(rows), features.width), dtype=np.float32)
    for cols in _column_blocks(len(rows), features.width):
        block = features.take(rows, cols.start, cols.stop) - mean[cols]  # float64
        block /= std[cols]
        out[:, cols] = block
    return out


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
def _predict(model: nn.Module, x: Split_) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)])


EpochCallback = Callable[[int, float], None]  # (epoch, val_acc)
RunEpochCallback = Callable[[int, int, float], None]  # (run position, epoch, val_acc)
RunDoneCallback = Callable[[int, dict[str, Any]], None]  # (run position, result)


def train_run(data: PreparedData, params: TrainParams, seed: int,
              on_epoch: EpochCallback | None = None) -> dict[str, Any]:
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
        self.curve: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": [], "lr": []}
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

    def state(self, scaler: Any = None) -> dict[str, Any]:
        """Everything the next epoch depends on, between two epochs (tensors and plain values only)."""
        return {"seed": self.seed, "epoch": self.epoch, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "rng": self.rng,
                "cuda_rng": self.cuda_rng, "shuffle": self.shuffle.get_state(), "curve": self.curve,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "best_state": self.best_state, "time_s": self.time_s,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def load_state(self, saved: dict[str, Any], device: torch.device) -> None:
        """Go on from :meth:`state` (of a run of the same seed, cell and settings)."""
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.rng = saved["rng"].cpu()
        if self.cuda_rng is not None and saved.get("cuda_rng") is not None:
            self.cuda_rng = saved["cuda_rng"].cpu()
        self.shuffle.set_state(saved["shuffle"].cpu())
        self.curve = {k: list(v) for k, v in saved["curve"].items()}
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
               stacked: bool | None = None, states: RunStates | None = None) -> list[dict[str, Any]]:
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
                if scaler is not None and saved.get("scaler"):
                    scaler.load_state_dict(saved["scaler"])
    results: dict[int, dict[str, Any]] = {}
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
                    losses = _stacked_losses([runs[i] for i in active], x_tr, y_tr, batches, params)
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


def _finish(run: _Run, data: PreparedData) -> dict[str, Any]:
    started = time.perf_counter()
    run.model.load_state_dict(run.best_state)
    evaluated = _evaluate(run.model, data)
    run.time_s += time.perf_counter() - started
    return evaluated | {
        "learning_curve": run.curve,
        "best_epoch": run.best_epoch,
        "epochs_run": len(run.curve["val_acc"]),
        "train_time_s": run.time_s,
        "feature_dim": data.feature_dim,
        "device": str(data.device),
    }


def _autocast(device: torch.device, amp: str) -> Any:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _layers(model: MLP) -> list[tuple[nn.Linear, nn.BatchNorm1d | None]]:
    mods = list(model.net)
    blocks = [(mods[k], mods[k + 1]) for k in range(0, len(mods) - 1, 4)]
    return [*blocks, (mods[-1], None)]  # type: ignore[list-item]


def _stacked_losses(runs: list[_Run], x: Split_, y: torch.Tensor, batches: list[torch.Tensor],
                    params: TrainParams) -> list[torch.Tensor]:
    """The runs' training forward passes as batched matmuls over stacked weights (one kernel per layer
    for all runs), BatchNorm per run (its running statistics updated as nn.BatchNorm1d does), dropout
    masks from each run's own stream."""
    h = torch.stack([x[idx] for idx in batches])  # (R, B, in)
    per_run = [_layers(r.model) for r in runs]
    for depth in range(len(per_run[0])):
        h = _stacked_linear([layers[depth][0] for layers in per_run], h)
        if per_run[0][depth][1] is None:
            break
        bns = [_bn(layers[depth][1]) for layers in per_run]
        mean = h.mean(dim=1, keepdim=True)
        var = h.var(dim=1, unbiased=False, keepdim=True)
        with torch.no_grad():
            unbiased = var * (h.shape[1] / max(h.shape[1] - 1, 1))
            for r, bn in enumerate(bns):
                m = bn.momentum if bn.momentum is not None else 0.1
                _buf(bn.running_mean).mul_(1 - m).add_(mean[r, 0].float(), alpha=m)
                _buf(bn.running_var).mul_(1 - m).add_(unbiased[r, 0].float(), alpha=m)
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
        h = _stacked_bn_relu(bns, h, mean, var)
        if params.dropout > 0:
            h = h * torch.stack([_dropout_mask(r, h.shape[1:], params.dropout, h.device) for r in runs]).to(h.dtype)
    return [F.cross_entropy(h[r].float(), y[idx]) for r, idx in enumerate(batches)]


def _stacked_linear(linears: list[nn.Linear], h: torch.Tensor) -> torch.Tensor:
    """(R, B, in) -> (R, B, out): every run's Linear in one batched matmul."""
    return torch.baddbmm(torch.stack([q.bias for q in linears]).unsqueeze(1), h,
                         torch.stack([q.weight for q in linears]).transpose(1, 2))


def _stacked_bn_relu(bns: list[nn.BatchNorm1d], h: torch.Tensor, mean: torch.Tensor,
                     var: torch.Tensor) -> torch.Tensor:
    """Each run's BatchNorm affine (with the given (R, 1, C) statistics), then ReLU."""
    gamma = torch.stack([bn.weight for bn in bns]).unsqueeze(1)
    beta = torch.stack([bn.bias for bn in bns]).unsqueeze(1)
    return torch.relu((h - mean) / torch.sqrt(var + bns[0].eps) * gamma + beta)


def _bn(module: nn.BatchNorm1d | None) -> nn.BatchNorm1d:
    assert module is not None
    return module


def _buf(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None
    return t


def _dropout_mask(run: _Run, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A dropout mask (kept entries scaled by 1 / (1 - p)) from the run's own stream."""
    if device.type == "cuda":
        assert run.cuda_rng is not None
        saved = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(run.cuda_rng, device)
        mask = torch.empty(shape, device=device).bernoulli_(1 - p)
        run.cuda_rng = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(saved, device)
    else:
        g = torch.Generator()
        g.set_state(run.rng)
        mask = torch.empty(shape).bernoulli_(1 - p, generator=g)
        run.rng = g.get_state()
    return mask.div_(1 - p)


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
    outs = []
    per_run = [_layers(m) for m in models]
    with _autocast(x.device, amp):
        for i in range(0, x.shape[0], EVAL_BATCH):
            h = x[i : i + EVAL_BATCH].unsqueeze(0).expand(len(models), -1, -1)
            for depth in range(len(per_run[0])):
                h = _stacked_linear([layers[depth][0] for layers in per_run], h)
                if per_run[0][depth][1] is None:
                    break
                bns = [_bn(layers[depth][1]) for layers in per_run]
                running_mean = torch.stack([_buf(bn.running_mean) for bn in bns]).unsqueeze(1)
                running_var = torch.stack([_buf(bn.running_var) for bn in bns]).unsqueeze(1)
                h = _stacked_bn_relu(bns, h, running_mean, running_var)
            outs.append(h.float())
    logits = torch.cat(outs, dim=1)
    return [logits[r] for r in range(len(models))]


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
        if split == "test":
            test_pred = proba.argmax(axis=1).tolist()
    return {
        "metrics": metrics,
        "test_pred": test_pred,  # the predicted class of each test row, in the split's order
        "confusion_matrices": {s: details[s]["confusion_matrix"] for s in ("val", "test")},
        "per_class": {s: details[s]["per_class"] for s in ("val", "test")},
    }


def save_state(path: Any, doc: dict[str, Any]) -> None:
    """A run's training state (:meth:`_Run.state` plus its identity), written atomically."""
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_state(path: Any, device: torch.device) -> dict[str, Any] | None:
    """A state :func:`save_state` wrote, or None when it is missing or unreadable. Tensors and plain
    values only (``weights_only``): nothing in it is executed."""
    try:
        doc = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a damaged state is only lost time: the run starts over
        return None
    return doc if isinstance(doc, dict) else None
