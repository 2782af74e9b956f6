"""Representations: per-matrix feature extractors, concatenated over layers.

Importing this package is cheap (numpy only); the registry is what config
validation and ``ablate reps`` use. Plugins (features/plugins.py) add to it.
"""

from ablation_cli.features.plugins import broken_entry_points, load_entry_points
from ablation_cli.features.plugins import load as load_plugins
from ablation_cli.features.registry import Representation, available, default_grid, get

__all__ = ["Representation", "available", "broken_entry_points", "default_grid", "get", "load_entry_points",
           "load_plugins"]
