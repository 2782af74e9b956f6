"""Standardisation with train-split statistics: bit-identical to numpy's, a block of columns at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ablation_cli.training.columns import ColumnView
from ablation_cli.training.split import Split

BLOCK_BYTES = 64 << 20  # float64 temporaries of a block of columns: bounded, whatever the split's size


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
