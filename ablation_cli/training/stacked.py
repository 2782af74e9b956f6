"""Several runs' MLPs as one batched model (CUDA): one matmul per layer for all the runs, each run with
its own BatchNorm statistics and its own dropout stream."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ablation_cli.training.mlp import MLP
from ablation_cli.training.standardise import Split_


class StackedRun(Protocol):
    """What the kernels need of a run: its network and its random streams (advanced in place)."""

    model: MLP
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None


def stacked_losses(runs: list[StackedRun], x: Split_, y: torch.Tensor, batches: list[torch.Tensor],
                   dropout: float) -> list[torch.Tensor]:
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
        if dropout > 0:
            h = h * torch.stack([_dropout_mask(r, h.shape[1:], dropout, h.device) for r in runs]).to(h.dtype)
    return [F.cross_entropy(h[r].float(), y[idx]) for r, idx in enumerate(batches)]


@torch.no_grad()
def stacked_logits(models: list[MLP], rows: torch.Tensor) -> torch.Tensor:
    """(R, B, classes) float32: eval-mode logits of every model on one batch of rows."""
    per_run = [_layers(m) for m in models]
    h = rows.unsqueeze(0).expand(len(models), -1, -1)
    for depth in range(len(per_run[0])):
        h = _stacked_linear([layers[depth][0] for layers in per_run], h)
        if per_run[0][depth][1] is None:
            break
        bns = [_bn(layers[depth][1]) for layers in per_run]
        running_mean = torch.stack([_buf(bn.running_mean) for bn in bns]).unsqueeze(1)
        running_var = torch.stack([_buf(bn.running_var) for bn in bns]).unsqueeze(1)
        h = _stacked_bn_relu(bns, h, running_mean, running_var)
    return h.float()


def _layers(model: MLP) -> list[tuple[nn.Linear, nn.BatchNorm1d | None]]:
    mods = list(model.net)
    blocks = [(mods[k], mods[k + 1]) for k in range(0, len(mods) - 1, 4)]
    return [*blocks, (mods[-1], None)]  # type: ignore[list-item]


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


def _dropout_mask(run: StackedRun, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
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
