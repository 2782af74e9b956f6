"""Everything a process needs to run cells of an experiment, in picklable form.

Worker processes and Slurm tasks rebuild the config, the dataset source, the store and the
feature cache from a JobSpec, so that they run cells through exactly the code path of a local run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation_cli.config import ExperimentConfig
from ablation_cli.data.table import DatasetSource
from ablation_cli.features.cache import FeatureCache
from ablation_cli.store import ExperimentStore


@dataclass(frozen=True)
class JobSpec:
    config: dict[str, Any]  # ExperimentConfig.model_dump(mode="json")
    config_path: str | None
    dataset_options: dict[str, Any]
    cache_dir: str  # also where the demo dataset's files live
    use_cache: bool
    root: str  # the experiment folder
    device: str
    threads: int | None = None  # torch threads; None: torch's default
    env: dict[str, str] = field(default_factory=dict)

    def cfg(self) -> ExperimentConfig:
        return ExperimentConfig.model_validate(self.config)

    def source(self) -> DatasetSource:
        from ablation_cli.data.sources import source_for

        cfg = self.cfg()
        return source_for(cfg.dataset, cfg, Path(self.config_path) if self.config_path else None,
                          self.dataset_options, Path(self.cache_dir))

    def store(self) -> ExperimentStore:
        return ExperimentStore(Path(self.root))

    def cache(self) -> FeatureCache | None:
        return FeatureCache(Path(self.cache_dir) / "features") if self.use_cache else None


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads. Results on CPU are bit-identical for a given thread count."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def setup_child_logging(prefix: str, log_file: Path | None) -> None:
    """Plain timestamped lines on stderr (and appended to run.log) for a worker or a Slurm task."""
    log = logging.getLogger("ablation_cli")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
    handler = logging.StreamHandler()
    handler.setFormatter(fmt)
    log.addHandler(handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
