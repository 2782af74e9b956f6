"""Lazily loaded dataset, split and per-(representation, layer) features for one process.

A layer config is a column selection of per-layer features, so ``visual_only``
reuses what ``all_layers`` computed: nothing is extracted twice in a process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetSource, LoraTable
from ablation_cli.errors import DataError
from ablation_cli.training.split import Split, make_split

log = logging.getLogger(__name__)


class Workspace:
    def __init__(self, source: DatasetSource, cfg: ExperimentConfig) -> None:
        self.source = source
        self.cfg = cfg
        self._blocks: dict[tuple[str, str], np.ndarray] = {}

    @cached_property
    def table(self) -> LoraTable:
        started = time.perf_counter()
        table = self.source.load()
        log.info("Loaded dataset %s: %d LoRAs, %d layers, %d classes (%.1fs)", table.info.name,
                 table.num_samples, len(table.layers), table.num_classes, time.perf_counter() - started)
        return table

    @cached_property
    def split(self) -> Split:
        s = self.cfg.split
        return make_split(self.table.labels, s.train, s.val, s.test, s.seed, s.stratify, self.table.label_names)

    def features(self, rep_name: str, layers: Sequence[str]) -> np.ndarray:
        """(N, len(layers) * dim) float32, layers in the given (sorted) order."""
        return np.concatenate([self._layer_block(rep_name, layer) for layer in layers], axis=1)

    def _layer_block(self, rep_name: str, layer: str) -> np.ndarray:
        key = (rep_name, layer)
        if key in self._blocks:
            return self._blocks[key]
        rep = features.get(rep_name)
        if rep.parts:  # a composite reuses its parts' blocks
            block = np.concatenate([self._layer_block(p, layer) for p in rep.parts], axis=1)
        else:
            block = rep.compute(self.table.weights[layer])
            if not np.isfinite(block).all():
                bad = int((~np.isfinite(block)).any(axis=1).sum())
                raise DataError(f"representation {rep_name}: non-finite features in layer {layer} for {bad} LoRA(s)")
        self._blocks[key] = block.astype(np.float32)
        return self._blocks[key]
