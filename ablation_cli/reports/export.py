"""``ablate features``: write a dataset's features as plain arrays for the user's own analysis."""

from __future__ import annotations

import logging
from pathlib import Path

from ablation_cli.config import ExperimentConfig
from ablation_cli.data.layers import select_layers
from ablation_cli.data.table import DatasetSource
from ablation_cli.durable import atomic_write_json
from ablation_cli.errors import ConfigError
from ablation_cli.features.cache import FeatureCache, write_npy
from ablation_cli.workspace import Workspace

log = logging.getLogger(__name__)


def export(source: DatasetSource, cfg: ExperimentConfig, layer_config: str, out: Path,
           cache: FeatureCache | None, force: bool = False) -> list[Path]:
    """Write ``<rep>.npy`` (float32, one row per LoRA in dataset order), ``labels.npy`` and ``index.json``.

    Files of an earlier export are never overwritten without ``force``; each file is written
    to a temp name and renamed, so an interrupted export leaves no partial array behind.
    """
    targets = [out / f"{rep}.npy" for rep in cfg.representations] + [out / "labels.npy", out / "index.json"]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds {', '.join(existing[:3])}"
                          f"{f' and {len(existing) - 3} more' if len(existing) > 3 else ''}; "
                          "nothing was written", hint="choose another --out, or pass --force to replace them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    workspace = Workspace(source, cfg.split, cache, cfg.device)
    workspace.prepare(cfg.representations)  # one pass over the data (checked) for whatever the cache lacks
    index = workspace.index
    lc = cfg.layer_configs[layer_config]
    layers = tuple(select_layers(index.layers, lc.include, lc.exclude))
    if not layers:
        raise ConfigError(f"layer config '{layer_config}' selects no layer of dataset '{workspace.info.name}'")
    columns = {}
    out.mkdir(parents=True, exist_ok=True)
    for rep in cfg.representations:
        x = workspace.features(rep, layers)
        columns[rep] = workspace.columns(rep, layers)
        assert x.shape[1] == len(columns[rep])
        write_npy(out / f"{rep}.npy", x)
        log.info("Wrote %s.npy: %d x %d", rep, *x.shape)
    write_npy(out / "labels.npy", index.labels)
    atomic_write_json(out / "index.json", {
        "dataset": workspace.info.name, "dataset_fingerprint": workspace.info.fingerprint,
        "layer_config": layer_config, "sample_ids": list(index.sample_ids), "layers": list(layers),
        "label_mapping": index.label_mapping, "columns": columns,
    })
    return targets



