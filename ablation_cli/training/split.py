"""One fixed train / val / test split, shared by all cells: ablate's stratified split, or the original script's."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ablation_cli.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(labels: np.ndarray, train: float, val: float, test: float, seed: int, stratify: bool,
               names: tuple[str, ...] | None = None) -> Split:
    from sklearn.model_selection import train_test_split  # slow to import: only where data is split

    n = labels.shape[0]
    index = np.arange(n)
    counts = np.bincount(labels)
    if stratify and counts.min() < 3:
        small = [names[c] if names else str(c) for c in np.flatnonzero(counts < 3)]
        raise DataError(
            f"class(es) {', '.join(small)} have fewer than 3 samples: too small for a stratified "
            f"{train:g}/{val:g}/{test:g} split",
            hint="add samples, drop the class, or set split.stratify = false",
        )
    n_test, n_val = round(n * test), round(n * val)  # exact counts: no float-ratio rounding surprises
    try:
        rest, test_idx = train_test_split(
            index, test_size=n_test, random_state=seed, stratify=labels if stratify else None
        )
        train_idx, val_idx = train_test_split(
            rest, test_size=n_val, random_state=seed, stratify=labels[rest] if stratify else None
        )
    except ValueError as exc:
        raise DataError(f"cannot split {n} samples {train:g}/{val:g}/{test:g}: {exc}") from None
    return Split(np.sort(train_idx), np.sort(val_idx), np.sort(test_idx))


ORIGINAL_SMALL = 10  # the original script used every row for train, val and test at or below this size


def original_split(positions: np.ndarray, stored_rows: int, seed: int = 42) -> Split:
    """The original script's split, exactly: Hugging Face ``datasets``' ``train_test_split(test_size=0.3,
    seed=42)``, then ``train_test_split(test_size=0.67, seed=42)`` of that 30 %, whose "train" part is the
    validation set and whose "test" part is the test set (not stratified). What ``datasets`` computes:

        n1 = ceil(0.3 * n); p1 = default_rng(seed).permutation(n); temp, train = p1[:n1], p1[n1:]
        n2 = ceil(0.67 * n1); p2 = default_rng(seed).permutation(n1); test, val = temp[p2[:n2]], temp[p2[n2:]]

    on the ``stored_rows`` rows of the dataset as stored. ``positions`` are the stored rows of the
    loaded rows: a LoRA dropped on loading is removed from whichever part it fell in (a warning gives
    the count per part), the others keep their places. Depends on numpy's ``default_rng``
    permutation stream (stable across numpy releases so far, not guaranteed by numpy).
    """
    n = stored_rows
    if n <= ORIGINAL_SMALL:
        every = np.arange(n)
        parts = {"train": every, "val": every, "test": every}
    else:
        n1 = math.ceil(0.3 * n)
        p1 = np.random.default_rng(seed).permutation(n)
        temp, train = p1[:n1], p1[n1:]
        n2 = math.ceil(0.67 * n1)
        p2 = np.random.default_rng(seed).permutation(n1)
        parts = {"train": train, "val": temp[p2[n2:]], "test": temp[p2[:n2]]}
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[positions] = np.arange(len(positions))
    rows = {name: row_of[idx] for name, idx in parts.items()}
    dropped = {name: int((r < 0).sum()) for name, r in rows.items()}
    if any(dropped.values()):
        log.warning("original split: dropped LoRAs removed from their parts (train %d, val %d, test %d); "
                    "the others keep their places", dropped["train"], dropped["val"], dropped["test"])
    kept = {name: np.sort(r[r >= 0]) for name, r in rows.items()}
    if not all(len(k) for k in kept.values()):
        raise DataError(f"original split: a part is empty after dropping LoRAs ({stored_rows} stored rows)")
    return Split(kept["train"], kept["val"], kept["test"])
