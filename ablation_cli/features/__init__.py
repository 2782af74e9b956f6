"""Representations: per-matrix feature extractors, concatenated over layers.

Importing this package is cheap (numpy only); the registry is what config
validation and ``ablate reps`` use. Plugins (features/plugins.py) add to it.
"""

from ablation_cli.features.registry import Representation, available, default_grid, get, known
from ablation_cli.plugin_source import broken_entry_points

__all__ = ["Representation", "available", "broken_entry_points", "default_grid", "get", "known"]
