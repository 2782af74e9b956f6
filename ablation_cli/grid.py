"""Pure: expand an experiment config into ordered cells and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.layers import select_layers
from ablation_cli.data.table import DatasetInfo
from ablation_cli.errors import ConfigError
from ablation_cli.training.protocol import PROTOCOL_VERSION


@dataclass(frozen=True)
class Fingerprint:
    """Everything that determines a cell's numbers, in three named parts."""

    config: Mapping[str, Any]
    dataset: Mapping[str, Any]
    code: Mapping[str, Any]

    @property
    def parts(self) -> dict[str, dict[str, Any]]:
        return {"config": dict(self.config), "dataset": dict(self.dataset), "code": dict(self.code)}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def record(self) -> dict[str, Any]:
        """What every checkpoint of the cell carries (and experiment.json lists): digest and parts."""
        return {"fingerprint": self.digest, **self.parts}


@dataclass(frozen=True)
class Cell:
    layer_config: str
    representation: str
    layers: tuple[str, ...]
    fingerprint: Fingerprint

    @property
    def id(self) -> str:
        return f"{self.layer_config}_{self.representation}"


def _layers_digest(layers: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(layers).encode()).hexdigest()[:16]


# How runs are scheduled, not what they compute: on CPU run k is bit-identical however many runs
# train beside it. Mixed precision changes the numbers, so it counts once it is on.
EXECUTION_ONLY = {"runs_in_parallel"}


def cell_fingerprint(cfg: ExperimentConfig, dataset: DatasetInfo, layer_config: str, rep: str,
                     layers: Sequence[str]) -> Fingerprint:
    representation = features.get(rep)
    config = {
        "layer_config": layer_config,
        "num_layers": len(layers),
        "layers_sha": _layers_digest(layers),
        "representation": rep,
        **cfg.classifier.model_dump(),
        **{k: v for k, v in cfg.training.model_dump().items() if k not in EXECUTION_ONLY},
        "split": f"{cfg.split.train:g}/{cfg.split.val:g}/{cfg.split.test:g}",
        "split_seed": cfg.split.seed,
        "stratify": cfg.split.stratify,
        "seed": cfg.seed,
    }
    if config.get("amp") == "off":
        del config["amp"]  # the default: fingerprints of earlier versions stay valid
    if cfg.split.method != "stratified":
        config["split_method"] = cfg.split.method  # likewise: only when not the default
    data = {"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint, "num_samples": dataset.num_samples}
    code: dict[str, Any] = {"representation_version": representation.version, "protocol_version": PROTOCOL_VERSION}
    if representation.source_sha is not None:  # a plugin: its source file (an edit makes its cells stale)
        code["representation_source_sha"] = representation.source_sha[:16]
    return Fingerprint(config=config, dataset=data, code=code)


def expand(cfg: ExperimentConfig, dataset: DatasetInfo) -> list[Cell]:
    """Cells in stable order: layer config major, representations as configured."""
    cells = []
    for lc_name, lc in cfg.layer_configs.items():
        layers = tuple(select_layers(dataset.layers, lc.include, lc.exclude))
        if not layers:
            raise ConfigError(
                f"layer_configs.{lc_name}: include {lc.include} / exclude {lc.exclude} selects no layer "
                f"of dataset '{dataset.name}' (e.g. {dataset.layers[0] if dataset.layers else 'none'})"
            )
        for rep in cfg.representations:
            cells.append(Cell(lc_name, rep, layers, cell_fingerprint(cfg, dataset, lc_name, rep, layers)))
    return cells
