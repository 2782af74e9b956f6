"""Experiment configuration: the whole config (its sections are in config_sections), TOML loading,
CLI overrides.

Validation happens once, here, at the boundary. A bad value becomes a
one-line ConfigError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from ablation_cli import features, plugin_loader
from ablation_cli.config_sections import (
    AxisConfig,
    ClassifierConfig,
    EstimatorConfig,
    ExecutorConfig,
    LayerConfig,
    LayerSweepConfig,
    ReportsConfig,
    SplitConfig,
    TrackingConfig,
    TrainingConfig,
    _Model,
)
from ablation_cli.data.sources import DatasetOptions, load_registry, resolve
from ablation_cli.errors import ConfigError
from ablation_cli.records import DEFAULT_CLASSIFIER, GRID_AXES
from ablation_cli.training.classifiers import classifier_names, resolve_classifier, taken

if TYPE_CHECKING:
    from ablation_cli.data.table import DatasetSource

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG_NAME = "visual_ablation.toml"


# Settings an axis can sweep: what a cell trains with. Not the split (one per experiment: its cells share
# it), nor what does not change a cell's numbers (grid.NOT_IN_FINGERPRINT).
AXIS_SECTIONS = ("classifier", "training")
NOT_AN_AXIS = ("training.runs_in_parallel", "training.checkpoint_every_s")


def axis_keys() -> list[str]:
    """Every setting ``[axes]`` and ``--sweep`` accept, as dotted keys."""
    keys = ["seed"]
    for section in AXIS_SECTIONS:
        model = ExperimentConfig.model_fields[section].annotation
        keys += [f"{section}.{name}" for name in model.model_fields]  # type: ignore[union-attr]
    return [k for k in keys if k not in NOT_AN_AXIS]


def _default_layer_configs() -> dict[str, LayerConfig]:
    return {
        "all_layers": LayerConfig(include=["*"]),
        "visual_only": LayerConfig(include=["*.attn1.*"]),
    }


class ExperimentConfig(_Model):
    name: str = Field("visual_ablation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: str = "demo"
    num_runs: int = Field(10, ge=1, le=1000)
    seed: int = Field(42, description="base seed: run k (1-based) uses seed + k - 1")
    device: str = "auto"
    representations: list[str] = Field(default_factory=features.default_grid, min_length=1)
    layer_configs: dict[str, LayerConfig] = Field(default_factory=_default_layer_configs, min_length=1)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    datasets_file: str = Field("datasets.toml", description="dataset registry, relative to this config file "
                               "(default: beside it, else ./configs/datasets.toml, else the built-in list)")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    plugins: list[str] = Field(default_factory=list, description="modules or .py files (relative to this config "
                               "file) defining representations with @ablation_cli.api.representation")
    estimators: dict[str, EstimatorConfig] = Field(default_factory=dict)  # before classifiers: it checks them
    classifiers: list[str] = Field(default_factory=lambda: [DEFAULT_CLASSIFIER], min_length=1,
                                   description="mlp, linear, a name of [estimators.<name>], or a classifier plugin")
    axes: dict[str, AxisConfig] = Field(default_factory=dict, description="settings swept as axes of the grid, "
                                        "e.g. \"training.lr\" = [1e-3, 3e-4]")
    layer_sweep: LayerSweepConfig | None = None

    @field_validator("axes", mode="before")
    @classmethod
    def _axis_lists(cls, axes: Any) -> Any:
        """``"training.lr" = [1e-3, 3e-4]`` is short for ``{values = [1e-3, 3e-4]}``."""
        if isinstance(axes, Mapping):
            return {k: {"values": v} if isinstance(v, list) else v for k, v in axes.items()}
        return axes

    @field_validator("axes")
    @classmethod
    def _known_axes(cls, axes: dict[str, AxisConfig], info: ValidationInfo) -> dict[str, AxisConfig]:
        allowed = axis_keys()
        checked: dict[str, AxisConfig] = {}
        for key, axis in axes.items():
            if key not in allowed:
                why = (" (the split is one per experiment)" if key.startswith("split.") else
                       " (it does not change a cell's numbers)" if key in NOT_AN_AXIS else "")
                raise ValueError(f"'{key}' cannot be an axis{why}; allowed: {', '.join(allowed)}")
            values = [_axis_value(info.data, key, v) for v in axis.values]
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"'{key}': values must not repeat: {axis.values}")
            for name in axis.classifiers or []:
                if name not in (info.data.get("classifiers") or [DEFAULT_CLASSIFIER]):
                    raise ValueError(f"'{key}': classifier '{name}' is not in the grid "
                                     f"(classifiers: {', '.join(info.data.get('classifiers') or [])})")
            checked[key] = axis.model_copy(update={"values": values})  # as the setting takes them: 1 -> 1.0
        return checked

    def with_settings(self, settings: Mapping[str, Any]) -> ExperimentConfig:
        """This config with dotted ``settings`` (a cell's axis values) in place of its own; each was
        validated with the ``[axes]`` it comes from."""
        cfg = self
        for key, value in settings.items():
            section, _, name = key.rpartition(".")
            if not section:
                cfg = cfg.model_copy(update={name: value})
            else:
                part = getattr(cfg, section)
                cfg = cfg.model_copy(update={section: part.model_copy(update={name: value})})
        return cfg

    @field_validator("representations")
    @classmethod
    def _known_representations(cls, reps: list[str]) -> list[str]:
        valid = features.available()
        for rep in reps:
            if not features.known(rep):
                broken = "".join(f"; plugin {line}" for line in features.broken_entry_points())
                raise ValueError(f"unknown representation '{rep}' (allowed: {', '.join(valid)}){broken}")
        if len(set(reps)) != len(reps):
            raise ValueError("representations must not repeat")
        return reps

    @field_validator("classifiers")
    @classmethod
    def _known_classifiers(cls, names: list[str], info: ValidationInfo) -> list[str]:
        estimators: dict[str, EstimatorConfig] = info.data.get("estimators") or {}
        if len(set(names)) != len(names):
            raise ValueError("classifiers must not repeat")
        for name in estimators:
            if taken(name):
                raise ValueError(f"estimators.{name}: the name is taken by a built-in or plugin classifier")
        allowed = classifier_names(estimators)
        so_far = cls.model_construct(**info.data)  # the fields validated so far: estimators among them
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"classifier name '{name}' must be letters, digits, '_' or '-'")
            if name not in allowed:
                raise ValueError(f"unknown classifier '{name}' (allowed: {', '.join(allowed)}; an estimator needs "
                                 f"an [estimators.{name}] table with its import path)")
            resolve_classifier(so_far, name).check()  # an estimator that does not import: exit 2
        return names

    @property
    def classifier_axis(self) -> bool:
        """Whether cells have a classifier in their ids (anything but the default, the MLP alone)."""
        return self.classifiers != [DEFAULT_CLASSIFIER]

    @model_validator(mode="after")
    def _known_comparisons(self) -> ExperimentConfig:
        for pair in self.reports.compare or []:
            unknown = [lc for lc in pair if lc not in self.layer_configs  # a layer sweep's: checked on expansion
                       and not (self.layer_sweep is not None and lc.startswith(("only_", "without_")))]
            if unknown:
                raise ValueError(f"reports.compare: {unknown[0]!r} is not a layer config "
                                 f"(allowed: {', '.join(self.layer_configs)})")
            if pair[0] == pair[1]:
                raise ValueError(f"reports.compare: {pair[0]!r} compared with itself")
        if self.reports.pivot is not None:
            allowed = [*GRID_AXES, *self.axes]
            if unknown := [a for a in self.reports.pivot if a not in allowed]:
                raise ValueError(f"reports.pivot: {unknown[0]!r} is not an axis (allowed: {', '.join(allowed)})")
            if self.reports.pivot[0] == self.reports.pivot[1]:
                raise ValueError(f"reports.pivot: rows and columns are both {self.reports.pivot[0]!r}")
        return self

    @property
    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The layer-config pairs that reports compare: as configured, else every one against the first."""
        if self.reports.compare is not None:
            return [tuple(p) for p in self.reports.compare]  # type: ignore[misc]
        return default_comparison_pairs(list(self.layer_configs))

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N")
        return device

    @field_validator("layer_configs")
    @classmethod
    def _safe_names(cls, configs: dict[str, LayerConfig]) -> dict[str, LayerConfig]:
        for name in configs:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"layer config name '{name}' must be letters, digits, '_' or '-'")
        return configs


def _axis_value(fields: Mapping[str, Any], key: str, value: Any) -> Any:
    """``value`` as the setting ``key`` takes it (1 for a float: 1.0), or ValueError naming both."""
    section, _, name = key.rpartition(".")
    try:
        if not section:
            return ExperimentConfig.__pydantic_validator__.validate_assignment(
                ExperimentConfig.model_construct(), name, value).__dict__[name]
        part = fields.get(section)
        if part is None:
            raise ValueError(f"'{key}': the [{section}] section is invalid")
        return type(part).model_validate({**part.model_dump(), name: value}).__dict__[name]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"'{key}' = {value!r}: {first['msg'].removeprefix('Value error, ')}") from None


LEGACY_PAIR = ("all_layers", "visual_only")


def default_comparison_pairs(layer_configs: list[str]) -> list[tuple[str, str]]:
    """Every layer config against the first; all_layers minus visual_only first, in that direction,
    wherever both exist (the drop earlier versions reported, whatever the order of the configs)."""
    if not layer_configs:
        return []
    pairs = [(layer_configs[0], other) for other in layer_configs[1:]]
    if set(LEGACY_PAIR) <= set(layer_configs):
        pairs = [LEGACY_PAIR, *(p for p in pairs if set(p) != set(LEGACY_PAIR))]
    return pairs


def _format_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {field}{shown}: {msg}{more}"


def default_config_path() -> Path:
    """./configs/visual_ablation.toml if present, else the repository's copy (if any)."""
    local = Path("configs") / DEFAULT_CONFIG_NAME
    if local.exists():
        return local
    return REPO_CONFIGS / DEFAULT_CONFIG_NAME


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def load_config(path: Path | None,
                overrides: Mapping[str, Any] | None = None) -> tuple[ExperimentConfig, Path | None]:
    """Load the TOML at ``path`` (or the default), apply dotted ``overrides``, validate.

    Returns the config and the file it came from (None when built-in defaults were used).
    """
    source_path = path if path is not None else default_config_path()
    if path is None and not source_path.exists():
        return config_from_data({}, overrides, "config"), None
    data = read_toml(source_path)
    return config_from_data(data, overrides, str(source_path), source_path.parent), source_path


def load_plugins(data: Mapping[str, Any], base: Path | None) -> Mapping[str, Any]:
    """The step before validation: register the installed plugins and those ``data`` names, whose file
    paths become absolute, so that a worker or a Slurm task rebuilding this config finds them."""
    plugin_loader.load_entry_points()
    if isinstance(data.get("plugins"), list):
        data = {**data, "plugins": plugin_loader.load([str(p) for p in data["plugins"]], base)}
    return data


def config_from_data(data: Mapping[str, Any], overrides: Mapping[str, Any] | None, label: str,
                     base: Path | None = None) -> ExperimentConfig:
    """Validate a config's data (a TOML file's, or experiment.json's recorded one) with dotted ``overrides``
    applied; relative plugin paths resolve against ``base``."""
    copied = copy.deepcopy(dict(data))  # the caller's data stays as it was
    for dotted, value in (overrides or {}).items():
        if dotted == "axes" and value is not None:  # --sweep: adds to the config's [axes]
            axes = copied.get("axes")
            copied["axes"] = {**(axes if isinstance(axes, dict) else {}), **value}
        elif value is not None:
            _set_dotted(copied, dotted, value)
    try:
        return ExperimentConfig.model_validate(load_plugins(copied, base))
    except ValidationError as exc:
        if overrides and any(v is not None for v in overrides.values()):
            label += " + command-line flags"
        raise ConfigError(_format_validation_error(exc, label)) from None


DEFAULT_DATASETS_FILE = "datasets.toml"


def datasets_registry_path(cfg: ExperimentConfig, config_path: Path | None) -> Path | None:
    """The datasets.toml where dataset names resolve, the first that exists of: ``datasets_file`` beside
    the config file given (or as given, when absolute); ./configs/datasets.toml; the repository's
    configs/datasets.toml. None: the built-in list. A ``datasets_file`` the config names, missing: exit 2."""
    file = Path(cfg.datasets_file).expanduser()
    if config_path is not None and config_path.resolve().parent == REPO_CONFIGS.resolve():
        config_path = None  # the built-in default config: ./configs/datasets.toml comes first
    named = file if file.is_absolute() else (config_path.parent / file if config_path is not None else None)
    if named is not None and named.exists():
        return named
    if cfg.datasets_file != DEFAULT_DATASETS_FILE:
        raise ConfigError(f"datasets_file = {cfg.datasets_file!r}: {named or file} does not exist")
    for candidate in (Path("configs") / DEFAULT_DATASETS_FILE, REPO_CONFIGS / DEFAULT_DATASETS_FILE):
        if candidate.exists():
            return candidate
    return None


def dataset_path(cfg: ExperimentConfig, config_path: Path | None) -> Path | None:
    """The config's dataset as a path, or None when it is a name in the datasets registry."""
    if cfg.dataset in load_registry(datasets_registry_path(cfg, config_path)):
        return None
    return Path(cfg.dataset).expanduser()


def dataset_source(cfg: ExperimentConfig, config_path: Path | None, options: DatasetOptions, cache_dir: Path,
                   dataset: str | None = None) -> DatasetSource:
    """The source of ``dataset`` (default: the config's): a name in the datasets.toml beside the
    config, or a path."""
    registry_path = datasets_registry_path(cfg, config_path)
    return resolve(dataset or cfg.dataset, load_registry(registry_path), options,
                   base=registry_path.parent if registry_path else None, cache_dir=cache_dir)
