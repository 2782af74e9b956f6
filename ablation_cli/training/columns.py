"""A cell's feature columns as a view of the computed arrays: gathered for the rows asked for, never copied whole."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class ColumnView:
    """Feature columns gathered from computed arrays without a copy: for each source array, which of its
    columns (``src``) go to which output columns (``dst``)."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (array (N, *), src, dst)
    width: int

    @classmethod
    def of(cls, arr: np.ndarray) -> ColumnView:
        every = np.arange(arr.shape[1], dtype=np.intp)
        return cls([(arr, every, every)], arr.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.parts[0][0].shape[0]), self.width

    @cached_property
    def whole(self) -> np.ndarray | None:
        """The one source array itself when the view is all of its columns, in order."""
        return self.parts[0][0] if len(self.parts) == 1 and self._complete[0] and self.order is None else None

    def array(self) -> np.ndarray:
        """Every row, as one float32 array (the source array itself where the view is all of it)."""
        if self.whole is not None:
            return np.ascontiguousarray(self.whole, dtype=np.float32)
        return self.take(slice(None))

    @cached_property
    def order(self) -> np.ndarray | None:
        """The output's columns as positions in the parts' columns laid side by side (None: the same order)."""
        order = np.argsort(np.concatenate([dst for _, _, dst in self.parts]), kind="stable")
        return None if np.array_equal(order, np.arange(self.width)) else order

    @cached_property
    def _complete(self) -> tuple[bool, ...]:
        """Per part: whether it contributes all its columns, in order."""
        return tuple(src.size == arr.shape[1] and bool((src == np.arange(arr.shape[1])).all())
                     for arr, src, _ in self.parts)

    def every_column(self, part: int) -> bool:
        """Whether part ``part`` contributes all its columns, in order."""
        return self._complete[part]

    def take(self, rows: np.ndarray | slice, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """float32 ``(rows, hi - lo)``: the given rows of output columns ``lo:hi``, a new array."""
        hi = self.width if hi is None else hi
        if self.whole is not None:
            return np.array(self.whole[rows, lo:hi], dtype=np.float32)
        if lo == 0 and hi == self.width:  # a batch: each part's rows (then columns), side by side, reordered
            side = [_rows(arr, rows) if self.every_column(i) else _rows(arr, rows).take(src, axis=1)
                    for i, (arr, src, _) in enumerate(self.parts)]
            joined = side[0] if len(side) == 1 else np.concatenate(side, axis=1)
            return joined if self.order is None else joined.take(self.order, axis=1)
        n = len(range(self.shape[0])[rows]) if isinstance(rows, slice) else len(rows)
        out = np.empty((n, hi - lo), dtype=np.float32)
        for arr, src, dst in self.parts:  # a block of columns: only those columns of each part, then the rows
            keep = (dst >= lo) & (dst < hi)
            if keep.any():
                out[:, dst[keep] - lo] = _rows(arr[:, src[keep]], rows)
        return out


def _rows(arr: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    return arr[rows] if isinstance(rows, slice) else arr.take(rows, axis=0)

