"""Options shared by several commands, and the small parsing helpers behind them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ablation_cli.errors import ConfigError

if TYPE_CHECKING:
    from ablation_cli.config import ExperimentConfig

OutputDir = Annotated[Path, typer.Option("--output-dir", "-o", help="Folder holding experiment folders.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", metavar="NAME|PATH", help="A name from "
                      "datasets.toml, or a path: a folder of LoRA files or a Hugging Face save_to_disk folder.")]
ExperimentOpt = Annotated[str | None, typer.Option("--experiment", "-e", help="Experiment folder to act on, by "
                          "name, when the output folder holds several (the error lists them).")]
PickDataset = Annotated[str | None, typer.Option("--dataset", "-d", metavar="NAME|PATH", help="Act on the experiment "
                        "of this dataset (a name from datasets.toml or a path) when the output folder holds several.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML "
                      "\\[default: configs/visual_ablation.toml].")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Cache folder, shared across experiments and "
                                       "runs: computed features (features/) and the demo dataset's files.")]
NoCache = Annotated[bool, typer.Option("--no-cache-features", help="Neither read nor write the feature cache.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug lines and full tracebacks.")]
MlflowOpt = Annotated[str | None, typer.Option("--mlflow", metavar="URI", help="Also log every run to MLflow at this "
                      "tracking URI (sqlite:///mlflow.db, a folder, http://host:port) \\[default: [tracking] mlflow "
                      "of the config].")]
Format = Annotated[str | None, typer.Option("--format", help="Folder layout: diffusers, peft, flat or hf "
                                            "\\[default: detected].")]
Labels = Annotated[Path | None, typer.Option(help="Labels file (CSV file,label or JSON) for a folder dataset "
                                             "\\[default: labels.csv/labels.json at its root, or metadata.json].")]
LabelField = Annotated[str | None, typer.Option(help="metadata.json field holding the label "
                                                "\\[default: category_label].")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
SLURM = "Slurm"  # the help panel of the Slurm flags


def key_value(item: str, flag: str, example: str, shape: str = "KEY=VALUE", empty_ok: bool = False) -> tuple[str, str]:
    """A ``KEY=VALUE`` flag's two parts, stripped; ConfigError (exit 2) naming the flag and an example."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not (empty_ok or value.strip()):
        raise ConfigError(f"{flag} {item}: expected {shape}, e.g. {flag} {example}")
    return key.strip(), value.strip()


def names(value: str | None) -> list[str] | None:
    """A comma-separated flag value as its names; None when the flag was not given."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def only_layer_configs(cfg: ExperimentConfig, chosen: list[str], flag: str) -> ExperimentConfig:
    """``cfg`` restricted to the layer configs ``chosen``, each checked against the config."""
    unknown = [n for n in chosen if n not in cfg.layer_configs]
    if unknown:
        raise ConfigError(f"{flag}: unknown layer config '{unknown[0]}' (allowed: {', '.join(cfg.layer_configs)})")
    return cfg.model_copy(update={"layer_configs": {n: cfg.layer_configs[n] for n in chosen}})
