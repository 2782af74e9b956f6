"""Two representations ablate does not ship: one per matrix, one per module (both factors)."""

import numpy as np

from ablation_cli.api import representation


def _row_names(shape: tuple[int, ...]) -> list[str]:
    return [f"row{i}_l1" for i in range(shape[0])] + ["max_abs"]


@representation("row_l1", version=1, features=_row_names)
def row_l1(x: np.ndarray) -> np.ndarray:
    """L1 norm of every row, and the largest |entry|: (N, out, in) -> (N, out + 1)."""
    return np.concatenate([np.abs(x).sum(axis=2), np.abs(x).max(axis=(1, 2))[:, None]], axis=1)


@representation("dw_gram", version=1, unit="module", features=["fro", "up_over_down"])
def dw_gram(down: np.ndarray, up: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """||dW||_F of dW = up @ down * scale without forming dW (r x r Gram matrices), and ||up|| / ||down||."""
    gram = np.einsum("nor,nos->nrs", up, up) * np.einsum("nri,nsi->nrs", down, down)
    fro = np.sqrt(np.maximum(gram.sum(axis=(1, 2)), 0.0)) * np.abs(np.asarray(scale, dtype=np.float64))
    ratio = np.linalg.norm(up, axis=(1, 2)) / np.maximum(np.linalg.norm(down, axis=(1, 2)), 1e-12)
    return np.stack([np.broadcast_to(fro, ratio.shape), ratio], axis=1)
