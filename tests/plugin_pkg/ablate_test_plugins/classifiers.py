"""A classifier ablate does not ship: nearest class centroid, probabilities from a softmax of -distance^2."""

import numpy as np

from ablation_cli.api import classifier


class NearestCentroid:
    def fit(self, x: np.ndarray, y: np.ndarray) -> "NearestCentroid":
        self.classes_ = np.unique(y)
        self.centroids_ = np.stack([x[y == c].mean(axis=0) for c in self.classes_])
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(axis=2) / x.shape[1]
        z = np.exp(-(d2 - d2.min(axis=1, keepdims=True)))
        return z / z.sum(axis=1, keepdims=True)


@classifier("centroid", version=1, seeded=False)
def centroid(seed: int) -> NearestCentroid:
    """Nearest class centroid (no randomness: fitted once per cell)."""
    return NearestCentroid()
