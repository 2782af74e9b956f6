"""The sections of an experiment config (``[classifier]``, ``[training]``, ``[split]``, ``[reports]``,
``[executor.slurm]``, ``[axes]`` ...) as pydantic models; :mod:`ablation_cli.config` puts them together.
Each validates its own values; what needs the whole config is checked there."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerConfig(_Model):
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
    drop_top: int | None = Field(None, ge=1, description="derived from a finished layer sweep: drop the layers of "
                                 "its k best only_* configs on validation accuracy (with ranked_by)")
    ranked_by: str | None = Field(None, description="the ranking experiment's folder (or an output folder holding "
                                  "it), relative to the current directory")
    ranked_rep: str = Field("stats", description="the representation the ranking is read for")

    @model_validator(mode="after")
    def _derived(self) -> LayerConfig:
        if (self.drop_top is None) != (self.ranked_by is None):
            raise ValueError("drop_top and ranked_by go together: drop_top = 5, ranked_by = \"results/ranking\"")
        return self


class ClassifierConfig(_Model):
    hidden_dim: int = Field(512, ge=1)
    num_hidden_layers: int = Field(3, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class TrainingConfig(_Model):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(64, ge=2)
    max_epochs: int = Field(300, ge=1)
    patience: int = Field(15, ge=1)
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(10, ge=0)
    runs_in_parallel: int = Field(0, ge=0, description="runs of a cell trained together as one batched model; "
                                  "0: all of them on CUDA, one at a time on CPU (where batching gains nothing)")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision on CUDA")
    checkpoint_every_s: float = Field(300.0, ge=0.0, description="a run saves its training state (weights, "
                                      "optimiser, schedule, random streams) at most this often, so a run cut off "
                                      "(Slurm time limit, preemption, kill) goes on from it; 0: every epoch")


class SplitConfig(_Model):
    train: float = Field(0.7, gt=0.0, lt=1.0)
    val: float = Field(0.1, gt=0.0, lt=1.0)
    test: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 42
    stratify: bool = True
    # stratified: ablate's (train/val/test fractions, stratified by class unless stratify = false);
    # original: the original script's Hugging Face split, exactly (training/split.py), on stored rows
    method: Literal["stratified", "original"] = "stratified"
    resample: bool = Field(False, description="run k gets its own stratified split, seeded by its run seed, so the "
                           "spread over runs includes the sampling of the data (paired tests: corrected resampled t)")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        if self.method == "original" and self.resample:
            raise ValueError("the original script's split is one fixed split and cannot be resampled; "
                             "use method = 'stratified' with resample = true, or resample = false")
        if self.method == "original" and (self.train, self.val, self.test) != (0.7, 0.1, 0.2):
            raise ValueError("method 'original' is the original script's fixed split (test_size 0.3, then 0.67 of "
                             "that); leave train/val/test at 0.7/0.1/0.2")
        return self


class SlurmConfig(_Model):
    """``[executor.slurm]``: how `ablate run --executor slurm` asks Slurm for resources."""

    partition: str | None = Field(None, description="partition (default: the cluster's default)")
    gpus_per_task: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1, description="also the number of torch threads of a task")
    mem_gb: float | None = Field(None, gt=0, description="memory per task (default: the cluster's default)")
    time_min: int = Field(240, ge=1, description="time limit per task, minutes; a timed-out task is requeued")
    array_parallelism: int = Field(64, ge=1, description="array tasks running at once")
    max_requeues: int = Field(3, ge=0, description="requeues after preemption or timeout")
    features_cpus: int | None = Field(None, ge=1, description="CPUs of the feature job [default: cpus_per_task]")
    features_mem_gb: float | None = Field(None, gt=0)
    extra: dict[str, str | int | bool] = Field(default_factory=dict,
                                                 description="extra sbatch parameters, e.g. account, qos, constraint")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job (module load ...)")


class ExecutorConfig(_Model):
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class TrackingConfig(_Model):
    """``[tracking]``: where every run is also logged (a view of the checkpoints; never in a fingerprint)."""

    mlflow: str | None = Field(None, description="MLflow tracking URI: sqlite:///mlflow.db, a folder, http://host:port")


class ReportsConfig(_Model):
    """``[reports]``: what `ablate merge` compares and how (never in a fingerprint)."""

    compare: list[tuple[str, str]] | None = Field(
        None, description="pairs of layer configs compared per row, e.g. [[\"all_layers\", \"visual_only\"]] "
        "(default: every layer config against the first)")
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000, description="resamples of every bootstrap")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap draws (the same draws for every cell)")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="level of the tests: tied / worse / above chance")
    pivot: tuple[str, str] | None = Field(None, description="two axes (rows, columns) of a pivot table and heatmap "
                                          "of mean test accuracy, e.g. [\"representation\", \"training.lr\"]")


class EstimatorConfig(_Model):
    """``[estimators.<name>]``: a classifier by import path, e.g. sklearn.linear_model.LogisticRegression."""

    estimator: str = Field(pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$", description="package.module.Class")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the class")


class AxisConfig(_Model):
    """``[axes]``: one setting swept over ``values``; each value is a cell of its own (``__lr=3e-4`` in its id)."""

    values: list[Any] = Field(min_length=1)
    classifiers: list[str] | None = Field(None, description="the classifiers it applies to (default: every "
                                          "classifier whose training the setting changes)")


class LayerSweepConfig(_Model):
    """``[layer_sweep]``: one layer config per group of the dataset's layers, beside ``[layer_configs]``."""

    by: Literal["block", "transformer", "attention", "module", "factor"] = Field(
        description="block: the U-Net's blocks (SD1.5: 7); transformer: each transformer block (16); attention: "
        "attn1 / attn2 of each (32); module: each to_q / to_v ... (64); factor: each matrix (128)")
    mode: Literal["alone", "without"] = Field("alone", description="alone: the group's layers only; "
                                              "without: every layer but the group's")
