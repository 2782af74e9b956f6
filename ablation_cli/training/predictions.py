"""A run's test predictions, stored compactly in its checkpoint: the statistics of `ablate merge`
(bootstrap over test rows, paired comparisons, chance) are computed from them.

Each array is packed as ``"<dtype>:<base64 of zlib of the little-endian bytes>"``; a sorted array
(the test rows) is stored as its differences (``"d<dtype>:..."``), which are small and compress
well. A 50k dataset's 9,000 test rows cost a few kB per run.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_DTYPES = ("u1", "u2", "u4", "u8")


def pack(values: np.ndarray) -> str:
    """Non-negative integers as a short string (see the module docstring)."""
    arr = np.asarray(values, dtype=np.int64).ravel()
    if arr.size and arr.min() < 0:
        raise ValueError("pack: negative values")
    delta = arr.size > 1 and bool(np.all(arr[1:] >= arr[:-1]))
    data = np.diff(arr, prepend=0) if delta else arr
    top = int(data.max()) if data.size else 0
    dtype = next(d for d in _DTYPES if top <= np.iinfo(np.dtype(d)).max)
    blob = base64.b64encode(zlib.compress(data.astype(f"<{dtype}").tobytes(), 6)).decode("ascii")
    return f"{'d' if delta else ''}{dtype}:{blob}"


def unpack(text: str) -> np.ndarray:
    head, _, blob = text.partition(":")
    delta = head.startswith("d")
    dtype = head.removeprefix("d")
    if dtype not in _DTYPES:
        raise ValueError(f"unpack: unknown dtype '{head}'")
    arr = np.frombuffer(zlib.decompress(base64.b64decode(blob)), dtype=f"<{dtype}").astype(np.int64)
    return np.cumsum(arr) if delta else arr


@dataclass(frozen=True)
class RunPredictions:
    """One run's test set: the rows (positions among the dataset's loaded LoRAs), their true labels
    and the predicted labels, in the same order."""

    rows: np.ndarray
    true: np.ndarray
    pred: np.ndarray

    def to_json(self) -> dict[str, str]:
        return {"test_rows": pack(self.rows), "test_true": pack(self.true), "test_pred": pack(self.pred)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunPredictions:
        rows, true, pred = (unpack(doc[k]) for k in ("test_rows", "test_true", "test_pred"))
        if not len(rows) == len(true) == len(pred):
            raise ValueError("predictions: test_rows, test_true and test_pred differ in length")
        return cls(rows, true, pred)

    @property
    def correct(self) -> np.ndarray:
        return self.true == self.pred
