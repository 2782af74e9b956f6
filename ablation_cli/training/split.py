"""One fixed train / val / test split (stratified when possible), shared by all cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ablation_cli.errors import DataError


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
