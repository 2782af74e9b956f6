"""Shared fixtures: a tiny experiment (small demo, short training) runnable in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as `ablate` itself sets (cli.REPRODUCIBLE_ENV), before torch
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ablation_cli.config import ExperimentConfig, LayerConfig

REPO = Path(__file__).resolve().parent.parent
TINY_DEMO = {"num_samples": 120, "num_classes": 3, "seed": 7}
TIMING_KEYS = {"checksum", "created_at", "updated_at", "duration_s", "train_time_s", "pid", "host", "provenance",
               "folder"}


def tiny_config(**overrides: Any) -> ExperimentConfig:
    data: dict[str, Any] = {
        "name": "tiny",
        "dataset": "tinydemo",
        "num_runs": 2,
        "device": "cpu",
        "representations": ["simple_stats", "stats"],
        "layer_configs": {"all_layers": LayerConfig(include=["*"]), "visual_only": LayerConfig(include=["*.attn1.*"])},
        "classifier": {"hidden_dim": 16, "num_hidden_layers": 2, "dropout": 0.2},
        "training": {"max_epochs": 8, "patience": 4, "batch_size": 32, "plateau_patience": 2},
    }
    data.update(overrides)
    return ExperimentConfig.model_validate(data)


def write_project(folder: Path, **toml_overrides: str) -> Path:
    """exp.toml + datasets.toml for CLI tests; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "top": 'name = "tiny"\ndataset = "tinydemo"\nnum_runs = 2\ndevice = "cpu"\n'
        'representations = ["simple_stats", "stats"]\n',
        "classifier": "[classifier]\nhidden_dim = 16\nnum_hidden_layers = 2\ndropout = 0.2\n",
        "training": "[training]\nmax_epochs = 8\npatience = 4\nbatch_size = 32\nplateau_patience = 2\n",
    }
    body.update(toml_overrides)
    layer = '[layer_configs.all_layers]\ninclude = ["*"]\n[layer_configs.visual_only]\ninclude = ["*.attn1.*"]\n'
    (folder / "exp.toml").write_text(body["top"] + layer + body["classifier"] + body["training"])
    lines = ["[tinydemo]", 'kind = "demo"', *(f"{k} = {v}" for k, v in TINY_DEMO.items())]
    (folder / "datasets.toml").write_text("\n".join(lines) + "\n")
    return folder / "exp.toml"


def ablate(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (no terminal: plain output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ablation_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kwargs)


def strip_timing(obj: Any) -> Any:
    """Drop timing, timestamp and host fields so two runs' results compare exactly."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_project(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
