"""The classifier axis: one resolution from a config's name to what trains a cell's runs.

- ``mlp``: the MLP protocol (training/trainer.py); no classifier means mlp.
- ``linear``: a linear probe, the same protocol and trainer without hidden layers (no dropout).
- an estimator: a scikit-learn-style class by import path with parameters (``[estimators.<name>]``).
- a plugin: a factory ``(seed) -> estimator`` decorated with :func:`ablation_cli.api.classifier`.

:func:`resolve_classifier` returns a :class:`Classifier` that knows its part of a cell's fingerprint,
its hyperparameters and how to train runs; the grid, the cell and the config validator ask it. A new
built-in classifier is a subclass here and an entry of :data:`BUILT_IN`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ablation_cli.errors import ConfigError
from ablation_cli.training import estimators
from ablation_cli.training.plugins import ClassifierPlugin, plugin, plugins
from ablation_cli.training.results import RunDoneCallback

if TYPE_CHECKING:
    from ablation_cli.training.trainer import TrainParams

__all__ = [
    "BUILT_IN",
    "EXECUTION_ONLY",
    "MLP",
    "Classifier",
    "ClassifierPlugin",
    "ClassifierSettings",
    "Estimator",
    "Linear",
    "Plugin",
    "classifier_names",
    "plugin",
    "plugins",
    "resolve_classifier",
    "taken",
]

# How runs are scheduled, not what they compute: on CPU run k is bit-identical however many runs
# train beside it. Mixed precision changes the numbers, so it counts once it is on.
EXECUTION_ONLY = {"runs_in_parallel", "checkpoint_every_s"}


class _Dumps(Protocol):
    def model_dump(self, *, exclude: set[str] | None = None) -> Mapping[str, Any]: ...


class _EstimatorEntry(Protocol):
    @property
    def estimator(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...


class ClassifierSettings(Protocol):
    """What a classifier reads of the experiment config (config.ExperimentConfig)."""

    @property
    def classifier(self) -> _Dumps: ...

    @property
    def training(self) -> _Dumps: ...

    @property
    def estimators(self) -> Mapping[str, _EstimatorEntry]: ...


class Classifier(ABC):
    """One classifier of the grid: its cells' fingerprint part, hyperparameters and training."""

    torch: ClassVar[bool] = True  # trained by training/trainer.py, on the cell's device, resumable

    @abstractmethod
    def fingerprint_part(self) -> Mapping[str, object]:
        """Its keys of the fingerprint's config part."""

    @abstractmethod
    def hyperparameters(self) -> Mapping[str, object]:
        """Its keys of the cell's ``hyperparameters`` (the split and seed follow them)."""

    def check(self) -> None:
        """Fail now, as the config is validated, if it cannot train (nothing to check by default)."""
        return None

    @abstractmethod
    def train_runs(self, data: Any, seeds: list[int], *, on_epoch: Any = None, on_done: RunDoneCallback | None = None,
                   states: Any = None, torch_runs: Callable[..., Any] | None = None) -> None:
        """Train one run per seed, each result to ``on_done``; ``torch_runs`` replaces trainer.train_runs
        (a seam for tests)."""


@dataclass(frozen=True)
class _Torch(Classifier):
    cfg: ClassifierSettings

    def train_params(self) -> TrainParams:
        from ablation_cli.training import trainer  # torch loads where cells train

        return trainer.TrainParams(**self.cfg.classifier.model_dump(), **self.cfg.training.model_dump())

    def train_runs(self, data: Any, seeds: list[int], *, on_epoch: Any = None, on_done: RunDoneCallback | None = None,
                   states: Any = None, torch_runs: Callable[..., Any] | None = None) -> None:
        if torch_runs is None:
            from ablation_cli.training import trainer

            torch_runs = trainer.train_runs
        torch_runs(data, self.train_params(), seeds, on_epoch=on_epoch, on_done=on_done, states=states)


@dataclass(frozen=True)
class MLP(_Torch):
    """The MLP protocol; ``explicit`` False: the default grid's, whose cells name no classifier."""

    explicit: bool = True

    def fingerprint_part(self) -> Mapping[str, object]:
        named = {"classifier": "mlp"} if self.explicit else {}
        return {**named, **self.cfg.classifier.model_dump(), **self.cfg.training.model_dump(exclude=EXECUTION_ONLY)}

    def hyperparameters(self) -> Mapping[str, object]:  # when state is saved is not a setting
        return {**self.cfg.classifier.model_dump(), **self.cfg.training.model_dump(exclude={"checkpoint_every_s"})}


@dataclass(frozen=True)
class Linear(_Torch):
    """A linear probe: the MLP protocol without hidden layers (so no width, no dropout)."""

    def fingerprint_part(self) -> Mapping[str, object]:
        return {"classifier": "linear", **self.cfg.training.model_dump(exclude=EXECUTION_ONLY)}

    def hyperparameters(self) -> Mapping[str, object]:
        return {"classifier": "linear", **self.cfg.training.model_dump(exclude={"checkpoint_every_s"})}

    def train_params(self) -> TrainParams:
        import dataclasses

        return dataclasses.replace(super().train_params(), num_hidden_layers=0, dropout=0.0)


class _Fitted(Classifier):
    """Fitted in memory on the CPU (training/estimators.py): every run in one call, nothing to resume."""

    torch: ClassVar[bool] = False

    @property
    @abstractmethod
    def spec(self) -> estimators.EstimatorSpec: ...

    def train_runs(self, data: Any, seeds: list[int], *, on_epoch: Any = None, on_done: RunDoneCallback | None = None,
                   states: Any = None, torch_runs: Callable[..., Any] | None = None) -> None:
        estimators.train_runs(data, self.spec, seeds, on_epoch, on_done)


@dataclass(frozen=True)
class Estimator(_Fitted):
    """A scikit-learn-style class by import path, ``[estimators.<name>]``."""

    name: str
    estimator: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def spec(self) -> estimators.EstimatorSpec:
        return estimators.estimator_spec(self.name, self.estimator, self.params)

    def check(self) -> None:
        _ = self.spec  # imports, takes its params, predicts probabilities: else exit 2

    def fingerprint_part(self) -> Mapping[str, object]:
        return {"classifier": self.name, "estimator": self.estimator, "params": dict(sorted(self.params.items()))}

    def hyperparameters(self) -> Mapping[str, object]:
        return {"classifier": self.name, "estimator": self.estimator, "params": self.params}


@dataclass(frozen=True)
class Plugin(_Fitted):
    """A factory declared with @ablation_cli.api.classifier (training/plugins.py)."""

    plugin: ClassifierPlugin

    @property
    def spec(self) -> estimators.EstimatorSpec:
        return estimators.plugin_spec(self.plugin)

    def fingerprint_part(self) -> Mapping[str, object]:
        return {"classifier": self.plugin.name, "classifier_version": self.plugin.version,
                "classifier_source_sha": self.plugin.source_sha[:16]}

    def hyperparameters(self) -> Mapping[str, object]:
        return {"classifier": self.plugin.name}


# The built-in classifiers by name: a new one is a subclass above and an entry here.
BUILT_IN: dict[str, Callable[[ClassifierSettings], Classifier]] = {"mlp": MLP, "linear": Linear}


def resolve_classifier(cfg: ClassifierSettings, name: str | None) -> Classifier:
    """The classifier ``name`` of ``cfg``: built-in, estimator, then plugin; None is the default MLP."""
    if name is None:
        return MLP(cfg, explicit=False)
    if name in BUILT_IN:
        return BUILT_IN[name](cfg)
    if name in cfg.estimators:
        entry = cfg.estimators[name]
        return Estimator(name, entry.estimator, entry.params)
    if (found := plugin(name)) is not None:
        return Plugin(found)
    raise ConfigError(f"unknown classifier '{name}' (allowed: {', '.join(classifier_names(cfg.estimators))})")


def classifier_names(estimators: Mapping[str, object]) -> list[str]:
    """Every name a config with these ``estimators`` may list in ``classifiers``."""
    return [*BUILT_IN, *estimators, *(p.name for p in plugins())]


def taken(name: str) -> bool:
    """Whether an estimator may not use ``name``: a built-in or plugin classifier has it."""
    return name in BUILT_IN or plugin(name) is not None
