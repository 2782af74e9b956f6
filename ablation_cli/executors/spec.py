"""Everything a process needs to run cells of an experiment, in picklable form.

Worker processes and Slurm tasks rebuild the config, the dataset source, the store and the
feature cache from a JobSpec, so that they run cells through exactly the code path of a local run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation_cli.config import ExperimentConfig, dataset_source, load_plugins
from ablation_cli.data.sources import DatasetOptions
from ablation_cli.data.table import DatasetSource
from ablation_cli.features.cache import FeatureCache
from ablation_cli.store import ExperimentStore
from ablation_cli.workspace import Workspace


@dataclass(frozen=True)
class JobSpec:
    config: dict[str, Any]  # ExperimentConfig.model_dump(mode="json")
    config_path: str | None
    dataset_options: DatasetOptions
    cache_dir: str  # also where the demo dataset's files live
    use_cache: bool
    root: str  # the experiment folder
    device: str
    threads: int | None = None  # torch threads; None: torch's default
    env: dict[str, str] = field(default_factory=dict)

    def cfg(self) -> ExperimentConfig:
        return ExperimentConfig.model_validate(load_plugins(self.config, None))

    def source(self) -> DatasetSource:
        return dataset_source(self.cfg(), Path(self.config_path) if self.config_path else None,
                              self.dataset_options, Path(self.cache_dir))

    def store(self) -> ExperimentStore:
        return ExperimentStore(Path(self.root))

    def cache(self) -> FeatureCache | None:
        return FeatureCache.under(Path(self.cache_dir)) if self.use_cache else None

    def workspace(self, source: DatasetSource, device: str | None = None) -> Workspace:
        return Workspace(source, self.cfg().split, self.cache(), device or self.device)
