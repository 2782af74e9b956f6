"""Pure: expand an experiment config into ordered cells and their fingerprints.

The grid is one product of named axes: layer config, representation, classifier, then each ``[axes]``
setting (``training.lr``, ``classifier.dropout``, ...), in that order. A swept setting adds
``__<name>=<value>`` to a cell's id; a grid without ``[axes]`` keeps the ids and fingerprints it always had.
An axis applies to a cell only where it changes what the cell trains (dropout means nothing to a logistic
regression), or to the classifiers it names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ablation_cli import features
from ablation_cli.config import ExperimentConfig
from ablation_cli.data.layers import layer_groups, select_layers
from ablation_cli.data.table import DatasetInfo
from ablation_cli.errors import ConfigError
from ablation_cli.ranking import read_ranking
from ablation_cli.records import axis_value_text
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
    settings: tuple[tuple[str, Any], ...] = ()  # the ``[axes]`` values of this cell: (dotted key, value)
    suffix: str = ""  # what they add to its id: ``__lr=3e-4``
    # a layer config derived from a ranking (drop_top): what it dropped and from where (experiment.json)
    derivation: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def id(self) -> str:
        return cell_id(self.layer_config, self.representation, self.classifier) + self.suffix

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The experiment's config as this cell trains with it: its axis values in place."""
        return cfg.with_settings(dict(self.settings)) if self.settings else cfg


@dataclass(frozen=True)
class Axis:
    """One ``[axes]`` setting: its dotted key, its name in cell ids, its values."""

    key: str
    label: str
    values: tuple[Any, ...]
    classifiers: tuple[str, ...] | None = None

    def tag(self, value: Any) -> str:
        return f"__{self.label}={axis_value_text(value)}"


def sweep_axes(cfg: ExperimentConfig) -> list[Axis]:
    """The config's ``[axes]``, each named by its last key part (``lr``), or in full where two share it."""
    last = [key.rpartition(".")[2] for key in cfg.axes]
    return [Axis(key, key.rpartition(".")[2] if last.count(key.rpartition(".")[2]) == 1 else key,
                 tuple(axis.values), tuple(axis.classifiers) if axis.classifiers is not None else None)
            for key, axis in cfg.axes.items()]


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
    "axes": "axes: they choose cells; each cell's values are in its config part (the classifier's and training's)",
    "axes.*": "likewise",
    "layer_configs.*.drop_top": "a derived config's dropped layers and its ranking's digest are in its config part",
    "layer_configs.*.ranked_by": "likewise",
    "layer_configs.*.ranked_rep": "likewise",
    "layer_sweep": "generates layer configs: each cell's layer config name and layers are in its config part",
    "layer_sweep.*": "likewise",
}


def cell_fingerprint(cfg: ExperimentConfig, dataset: DatasetInfo, layer_config: str, rep: str,
                     layers: Sequence[str], classifier: str | None = None,
                     derivation: Mapping[str, Any] | None = None) -> Fingerprint:
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
    if derivation is not None:  # a derived layer config: a rerun of its ranking makes it stale
        config["dropped"] = list(derivation["dropped"])
        config["ranking"] = derivation["ranking"]
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


def layer_config_layers(cfg: ExperimentConfig, dataset: DatasetInfo,
                        derived: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[str, ...]]:
    """Each layer config's layers: the configured ones (less what a ``drop_top`` config drops, ``derived``),
    then those ``[layer_sweep]`` generates from the dataset's layers (``only_down0``, ``without_mid``, ...).
    A config that selects no layer: exit 2."""
    configs: dict[str, tuple[str, ...]] = {}
    for name, lc in cfg.layer_configs.items():
        configs[name] = tuple(select_layers(dataset.layers, lc.include, lc.exclude))
        if name in (derived or {}):
            dropped = set((derived or {})[name]["dropped"])
            configs[name] = tuple(x for x in configs[name] if x not in dropped)
        if not configs[name]:
            raise ConfigError(
                f"layer_configs.{name}: include {lc.include} / exclude {lc.exclude} selects no layer "
                f"of dataset '{dataset.name}' (e.g. {dataset.layers[0] if dataset.layers else 'none'})"
            )
    if (sweep := cfg.layer_sweep) is not None:
        try:
            groups = layer_groups(dataset.layers, sweep.by)
        except ValueError as exc:
            raise ConfigError(f"layer_sweep: {exc}") from None
        every = sorted(dataset.layers)
        for group, layers in groups.items():
            name = f"{'only' if sweep.mode == 'alone' else 'without'}_{group}"
            chosen = tuple(layers) if sweep.mode == "alone" else tuple(x for x in every if x not in set(layers))
            if not chosen:
                raise ConfigError(f"layer_sweep: {name} holds no layer (group {group} is every layer of "
                                  f"dataset '{dataset.name}')")
            if name in configs:
                raise ConfigError(f"layer_sweep: {name} is also a name in [layer_configs]; rename that one")
            configs[name] = chosen
    return configs


def derivation(drop_top: int, ranked_by: str, ranked_rep: str) -> dict[str, Any]:
    """What a ``drop_top`` layer config drops: the layers of the ranking's top ``drop_top`` configs."""
    ranking = read_ranking(ranked_by, ranked_rep)
    top = ranking.top(drop_top)
    return {"drop_top": drop_top, "ranked_by": ranking.folder, "ranked_rep": ranked_rep,
            "dropped": sorted({layer for r in top for layer in r.layers}),
            "top": [{"layer_config": r.layer_config, "val_acc": r.val_acc} for r in top], "ranking": ranking.digest}


def check_cell_ids(cfg: ExperimentConfig, layer_configs: Sequence[str] | None = None) -> None:
    """Two (layer config, representation[, classifier]) pairs must not spell the same cell id: they would
    share one checkpoint, each making the other's stale, and the grid would never complete."""
    made_by: dict[str, tuple[str, ...]] = {}
    for lc_name in (layer_configs if layer_configs is not None else cfg.layer_configs):
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
    """Cells in stable order: layer config major, then representations, classifiers and each ``[axes]``
    setting, as configured."""
    derived = {name: derivation(lc.drop_top, lc.ranked_by, lc.ranked_rep) for name, lc in cfg.layer_configs.items()
               if lc.drop_top is not None and lc.ranked_by is not None}
    configs = layer_config_layers(cfg, dataset, derived)
    check_cell_ids(cfg, list(configs))
    for pair in cfg.reports.compare or []:
        if unknown := [lc for lc in pair if lc not in configs]:
            raise ConfigError(f"reports.compare: {unknown[0]!r} is not a layer config of this grid "
                              f"(allowed: {', '.join(configs)})")
    axes = sweep_axes(cfg)
    cells: list[Cell] = []
    for lc_name, layers in configs.items():
        drop = derived.get(lc_name)
        for rep in cfg.representations:
            for clf in (cfg.classifiers if cfg.classifier_axis else [None]):
                base = cell_fingerprint(cfg, dataset, lc_name, rep, layers, clf, drop)
                if not axes:
                    cells.append(Cell(lc_name, rep, layers, base, clf, derivation=drop))
                    continue
                applied = [a for a in axes if _applies(a, cfg, dataset, lc_name, rep, layers, clf)]
                for values in itertools.product(*(a.values for a in applied)):
                    settings = tuple((a.key, v) for a, v in zip(applied, values))
                    fingerprint = cell_fingerprint(cfg.with_settings(dict(settings)), dataset, lc_name, rep, layers,
                                                   clf, drop)
                    suffix = "".join(a.tag(v) for a, v in zip(applied, values))
                    cells.append(Cell(lc_name, rep, layers, fingerprint, clf, settings, suffix, drop))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if (other := seen.setdefault(cell.id, cell)) is not cell:
            raise ConfigError(f"axes: cell id '{cell.id}' is made by both {dict(other.settings)} and "
                              f"{dict(cell.settings)}; give the values distinct spellings")
    return cells


def _applies(axis: Axis, cfg: ExperimentConfig, dataset: DatasetInfo, lc_name: str, rep: str,
             layers: Sequence[str], clf: str | None) -> bool:
    """Whether ``axis`` is an axis of this cell: a classifier it names, or (by default) one whose training
    its values change (the cell's fingerprint differs between them)."""
    if axis.classifiers is not None:
        return (clf or cfg.classifiers[0]) in axis.classifiers
    prints = {cell_fingerprint(cfg.with_settings({axis.key: v}), dataset, lc_name, rep, layers, clf).digest
              for v in axis.values}
    return len(prints) > 1
