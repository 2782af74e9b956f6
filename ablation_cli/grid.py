"""Pure: expand an experiment config into ordered cells and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.layers import select_layers
from ablation_cli.data.table import DatasetInfo
from ablation_cli.errors import ConfigError
from ablation_cli.training.classifiers import resolve_classifier
from ablation_cli.training.protocol import PROTOCOL_VERSION


@dataclass(frozen=True)
class Fingerprint:
    """Everything that determines a cell's numbers, in three named parts."""

    config: Mapping[str, object]
    dataset: Mapping[str, object]
    code: Mapping[str, object]

    @property
    def parts(self) -> dict[str, dict[str, object]]:
        return {"config": dict(self.config), "dataset": dict(self.dataset), "code": dict(self.code)}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def record(self) -> dict[str, object]:
        """What every checkpoint of the cell carries (and experiment.json lists): digest and parts."""
        return {"fingerprint": self.digest, **self.parts}


@dataclass(frozen=True)
class Cell:
    layer_config: str
    representation: str
    layers: tuple[str, ...]
    fingerprint: Fingerprint
    classifier: str | None = None  # None: the default grid's MLP (ids without a classifier; resolve_classifier)

    @property
    def id(self) -> str:
        return cell_id(self.layer_config, self.representation, self.classifier)


def cell_id(layer_config: str, representation: str, classifier: str | None = None) -> str:
    base = f"{layer_config}_{representation}"
    return f"{base}_{classifier}" if classifier is not None else base


def _layers_digest(layers: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(layers).encode()).hexdigest()[:16]


# Every field of the config schema (ExperimentConfig and its sections, as dotted paths; ``*`` a key of a
# table, or every field of a section) is in a cell's fingerprint, except these, each with why its numbers
# do not depend on it. tests/test_fingerprints.py walks the schema: a new field must be fingerprinted
# (and given a changed value there) or declared here.
NOT_IN_FINGERPRINT: dict[str, str] = {
    "name": "the experiment's folder name",
    "dataset": "what it resolves to is the data part: the dataset's name, fingerprint and row options",
    "datasets_file": "where dataset names resolve; the dataset found is the data part",
    "num_runs": "runs are checkpointed one by one: more runs add to a cell, fewer read its first ones",
    "device": "where cells train: CPU and CUDA differ in the last bits, which a grid moving between machines "
              "accepts",
    "representations": "an axis: it chooses cells; each cell's representation is in its config part",
    "layer_configs": "an axis (the names): each cell's layer config name and layers are in its config part",
    "classifiers": "an axis: each cell's classifier is in its config part (and its id)",
    "estimators": "names classifiers; the estimator and params of the one a cell uses are in its config part",
    "plugins": "what to import; a plugin representation's version and source digest are in its code part",
    "training.runs_in_parallel": "scheduling: on CPU run k is bit-identical however many runs train beside it",
    "training.checkpoint_every_s": "how often a run saves its training state: a resumed run's numbers are those of "
                                   "the uninterrupted run",
    "executor.*": "where and how cells run (Slurm resources), not what they compute",
    "tracking.*": "MLflow is a view of the checkpoints",
    "reports.*": "what `ablate merge` computes from the checkpoints (comparisons, bootstrap), after the cells",
}


def cell_fingerprint(cfg: ExperimentConfig, dataset: DatasetInfo, layer_config: str, rep: str,
                     layers: Sequence[str], classifier: str | None = None) -> Fingerprint:
    representation = features.get(rep)
    config = {
        "layer_config": layer_config,
        "num_layers": len(layers),
        "layers_sha": _layers_digest(layers),
        "representation": rep,
        **resolve_classifier(cfg, classifier).fingerprint_part(),
        "split": f"{cfg.split.train:g}/{cfg.split.val:g}/{cfg.split.test:g}",
        "split_seed": cfg.split.seed,
        "stratify": cfg.split.stratify,
        "seed": cfg.seed,
    }
    if config.get("amp") == "off":
        del config["amp"]  # the default: fingerprints of earlier versions stay valid
    if cfg.split.method != "stratified":
        config["split_method"] = cfg.split.method  # likewise: only when not the default
    if cfg.split.resample:
        config["split_resample"] = True  # each run its own split; likewise only when on
    data = {"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint, "num_samples": dataset.num_samples,
            **dataset.options}  # options that change rows or labels, only when not at their defaults
    code: dict[str, object] = {"representation_version": representation.version, "protocol_version": PROTOCOL_VERSION}
    if representation.source_sha is not None:  # a plugin: its package's source (an edit makes its cells stale)
        code["representation_source_sha"] = representation.source_sha[:16]
    if representation.parts:  # a composite computes its parts: bumping one makes its cells stale too
        part_versions = {part.name: part.cache_version for part in representation.base}
        if part_versions != dict(representation.parts_at):  # as they were: the fingerprint of before
            code["part_versions"] = part_versions
    return Fingerprint(config=config, dataset=data, code=code)


def check_cell_ids(cfg: ExperimentConfig) -> None:
    """Two (layer config, representation[, classifier]) pairs must not spell the same cell id: they would
    share one checkpoint, each making the other's stale, and the grid would never complete."""
    made_by: dict[str, tuple[str, ...]] = {}
    for lc_name in cfg.layer_configs:
        for rep in cfg.representations:
            for clf in (cfg.classifiers if cfg.classifier_axis else [None]):
                new = cell_id(lc_name, rep, clf)
                pair = (lc_name, rep) if clf is None else (lc_name, rep, clf)
                if (old := made_by.get(new)) is not None:
                    what = "a layer config" if old[0] != lc_name else "a representation or classifier"
                    raise ConfigError(f"cell id '{new}' is made by both {' x '.join(old)} and {' x '.join(pair)}; "
                                      f"rename {what}")
                made_by[new] = pair


def expand(cfg: ExperimentConfig, dataset: DatasetInfo) -> list[Cell]:
    """Cells in stable order: layer config major, then representations, then classifiers, as configured."""
    check_cell_ids(cfg)
    cells = []
    for lc_name, lc in cfg.layer_configs.items():
        layers = tuple(select_layers(dataset.layers, lc.include, lc.exclude))
        if not layers:
            raise ConfigError(
                f"layer_configs.{lc_name}: include {lc.include} / exclude {lc.exclude} selects no layer "
                f"of dataset '{dataset.name}' (e.g. {dataset.layers[0] if dataset.layers else 'none'})"
            )
        for rep in cfg.representations:
            for clf in (cfg.classifiers if cfg.classifier_axis else [None]):
                cells.append(Cell(lc_name, rep, layers, cell_fingerprint(cfg, dataset, lc_name, rep, layers, clf), clf))
    return cells
