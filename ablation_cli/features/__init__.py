"""Representations: per-matrix feature extractors, concatenated over layers.

Importing this package is cheap (numpy only); the registry is what config
validation and ``ablate reps`` use.
"""

from ablation_cli.features.registry import Representation, available, default_grid, get

__all__ = ["Representation", "available", "default_grid", "get"]
