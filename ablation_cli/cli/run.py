"""``ablate run``: the grid's flags become config overrides; a session runs it here or submits it to Slurm."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ablation_cli import logs
from ablation_cli.cli.options import (
    SLURM,
    CacheDir,
    ConfigOpt,
    DatasetOpt,
    Format,
    LabelField,
    Labels,
    MlflowOpt,
    NoCache,
    OutputDir,
    Verbose,
    key_value,
    names,
    only_layer_configs,
)
from ablation_cli.errors import AblateError, ConfigError, PluginError
from ablation_cli.reports import terminal

if TYPE_CHECKING:
    from ablation_cli.data.sources import DatasetOptions

# `ablate run` flags that set one config key each (None: keep the config's value)
_CONFIG_FLAGS = {
    "dataset": "dataset", "num_runs": "num_runs", "device": "device", "seed": "seed",
    "dropout": "classifier.dropout", "hidden_dim": "classifier.hidden_dim", "weight_decay": "training.weight_decay",
    "batch_size": "training.batch_size", "lr": "training.lr", "max_epochs": "training.max_epochs",
    "patience": "training.patience", "plateau_factor": "training.plateau_factor",
    "plateau_patience": "training.plateau_patience", "runs_in_parallel": "training.runs_in_parallel",
    "amp": "training.amp", "split_method": "split.method", "partition": "executor.slurm.partition",
    "gpus_per_task": "executor.slurm.gpus_per_task",
    "cpus_per_task": "executor.slurm.cpus_per_task", "mem_gb": "executor.slurm.mem_gb",
    "time_min": "executor.slurm.time_min", "array_parallelism": "executor.slurm.array_parallelism",
    "mlflow": "tracking.mlflow",
}


def run(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDir = Path("results"),
    num_runs: Annotated[int | None, typer.Option(help="Trainings per cell (seeds differ).")] = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations to run.")] = None,
    layer_configs: Annotated[str | None, typer.Option(help="Comma-separated layer configs to run.")] = None,
    classifiers: Annotated[str | None, typer.Option(help="Comma-separated classifiers: mlp, linear, the config's "
                           "\\[estimators.NAME] tables, plugin classifiers "
                           "\\[default: the config's, else mlp].")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Classifier dropout.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Adam weight decay.")] = None,
    hidden_dim: Annotated[int | None, typer.Option(help="MLP hidden width.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Epoch limit per run.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience (epochs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed: run k uses seed + k - 1.")] = None,
    plateau_factor: Annotated[float | None, typer.Option(help="ReduceLROnPlateau factor.")] = None,
    plateau_patience: Annotated[int | None, typer.Option(help="ReduceLROnPlateau patience (epochs).")] = None,
    runs_in_parallel: Annotated[int | None, typer.Option(help="Runs of a cell trained together as one batched "
                                "model \\[default 0: all on CUDA, one at a time on CPU].")] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision on CUDA: off, bf16 or fp16.")] = None,
    split_method: Annotated[str | None, typer.Option(help="stratified (ablate's 70/10/20) or original (the "
                            "original script's Hugging Face split, exactly).")] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed cell.")] = False,
    data_format: Format = None,
    labels: Labels = None,
    label_field: LabelField = None,
    on_mismatch: Annotated[str | None, typer.Option(help="LoRAs whose layer set differs: error or skip.")] = None,
    drop_nonfinite: Annotated[bool, typer.Option("--drop-nonfinite", help="Drop LoRAs with NaN/Inf weights "
                              "instead of stopping.")] = False,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads per process \\[default: torch's; "
                       "with --workers: cores / N]. CPU results are bit-identical for a given thread count.")] = None,
    executor: Annotated[str, typer.Option(help="local: this machine; slurm: a feature job plus a job array "
                        "with one task per pending cell (submitit).")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="Local executor: run cells in N processes, each on its own "
                       "GPU (cuda:i) or its share of the CPU cores.")] = 1,
    wait: Annotated[bool, typer.Option("--wait", help="Slurm: follow the jobs to the end, then merge "
                                       "\\[default: submit and return].")] = False,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.", rich_help_panel=SLURM)] = None,
    gpus_per_task: Annotated[int | None, typer.Option(help="Slurm GPUs per cell task.", rich_help_panel=SLURM)] = None,
    cpus_per_task: Annotated[int | None, typer.Option(help="Slurm CPUs per cell task (= its torch threads).",
                                                      rich_help_panel=SLURM)] = None,
    mem_gb: Annotated[float | None, typer.Option(help="Slurm memory per cell task, GB.", rich_help_panel=SLURM)] = None,
    time_min: Annotated[int | None, typer.Option(help="Slurm time limit per task, minutes (a timed-out task "
                                                 "is requeued and resumes).", rich_help_panel=SLURM)] = None,
    array_parallelism: Annotated[int | None, typer.Option(help="Slurm array tasks running at once.",
                                                          rich_help_panel=SLURM)] = None,
    sbatch: Annotated[list[str] | None, typer.Option(help="Extra sbatch parameter KEY=VALUE (repeatable), e.g. "
                                                     "--sbatch account=lab --sbatch qos=high.",
                                                     rich_help_panel=SLURM)] = None,
    mlflow: MlflowOpt = None,
    resume: Annotated[Path | None, typer.Option("--resume", metavar="DIR", help="Resume the experiment in DIR (an "
                      "experiment folder, or an output folder holding one) with the settings its experiment.json "
                      "records: config, dataset and dataset options. Flags given beside it override.")] = None,
    sweep: Annotated[list[str] | None, typer.Option(metavar="KEY=V1,V2", help="Sweep a setting as an axis of the "
                     "grid (repeatable), e.g. --sweep training.lr=1e-3,3e-4: one cell per value, '__lr=3e-4' in its "
                     "id. Adds to the config's \\[axes].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid (layer configs and their layer "
                       "counts, axes, cells, runs) and stop: nothing is trained or written.")] = False,
    restart_stale: Annotated[bool, typer.Option("--restart-stale", help="Retrain finished cells made under other "
                             "settings; their checkpoints move to checkpoints/.superseded/ (`ablate restore` brings "
                             "them back) \\[default: stop with exit 2 and list what changed].")] = False,
    verbose: Verbose = False,
) -> None:
    """Walk the grid: skip what valid checkpoints hold, train the rest, checkpoint every run and cell.

    Resume after any crash or kill with the same command, or with `ablate run --resume DIR`. When
    finished cells were made under other settings (a forgotten flag), stop before touching anything and
    list the changed fields. Exit 0 when every cell is done (or, with --executor slurm, when the jobs are
    submitted), 1 if a cell failed, 2 on bad input or changed settings, 3 if another run holds the
    folder, 4 if the machine refused (a full disk, a read-only folder), 130/143 on Ctrl-C/SIGTERM.
    """
    flags = dict(locals())
    console = terminal.setup(verbose)
    from ablation_cli.config import load_config
    from ablation_cli.session import Session

    overrides: dict[str, Any] = {key: flags[flag] for flag, key in _CONFIG_FLAGS.items()}
    overrides["representations"] = names(reps)
    overrides["classifiers"] = names(classifiers)
    for item in sbatch or []:
        key, value = key_value(item, "--sbatch", "account=lab", empty_ok=True)
        overrides[f"executor.slurm.extra.{key}"] = value
    if sweep:
        overrides["axes"] = dict(_sweep(item) for item in sweep)
    if executor not in ("local", "slurm"):
        raise ConfigError(f"--executor {executor}: allowed: local, slurm")
    if executor == "slurm" and workers > 1:
        raise ConfigError("--workers is for the local executor; with Slurm, each cell is its own task")
    options: DatasetOptions = {"layout": data_format, "labels": labels, "label_field": label_field,
               "on_mismatch": on_mismatch, "drop_nonfinite": drop_nonfinite or None}
    root = None
    if resume is not None:
        if config is not None:
            raise ConfigError("--resume DIR replays the config recorded in DIR; drop --config")
        from ablation_cli.session import recorded_settings

        recorded = recorded_settings(resume, overrides, options)
        cfg, cfg_path, options, root = recorded.cfg, recorded.config_path, recorded.options, recorded.root
        output_dir = root.parent
    else:
        try:
            cfg, cfg_path = load_config(config, overrides)
        except PluginError:
            _open_existing_run_log(config, overrides, output_dir)  # the plugin's traceback goes there too
            raise
    if layer_configs:
        cfg = only_layer_configs(cfg, names(layer_configs) or [], "--layer-configs")
    from ablation_cli.grid import check_cell_ids

    check_cell_ids(cfg)  # before the experiment folder, its lock or its log exist
    if dry_run:
        from ablation_cli.config import dataset_source
        from ablation_cli.grid import expand
        from ablation_cli.reports.plan import format_plan
        from ablation_cli.status import cell_status
        from ablation_cli.store import ExperimentStore

        source = dataset_source(cfg, cfg_path, options, cache_dir)
        info = source.describe()
        store = ExperimentStore(root) if root is not None else ExperimentStore.existing_for(output_dir, cfg.name,
                                                                                            cfg.dataset)
        existing, sizes = None, []
        if store is not None and store.exists():
            record = store.experiment()
            existing = {spec.id: cell_status(store, spec, record.num_runs) for spec in record.cells}
            sizes = [p.stat().st_size for p in store.runs_root.glob("*/run_*.json")]
        from ablation_cli.features.cache import FeatureCache
        from ablation_cli.workspace import Workspace

        cache = FeatureCache.under(cache_dir) if not no_cache_features else None
        features = Workspace(source, cfg.split, cache, cfg.device).cache_bytes_to_write(cfg.representations)
        typer.echo(format_plan(cfg, info.name, expand(cfg, info), existing, str(store.root) if store else None,
                               sum(sizes) / len(sizes) if sizes else None, features if cache else None))
        return
    if cfg.tracking.mlflow:
        from ablation_cli.tracking import absolute_uri, require_mlflow

        require_mlflow()  # before anything is written
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"mlflow": absolute_uri(cfg.tracking.mlflow)})})
    session = Session.open(cfg, cfg_path, options, output_dir, cache_dir, not no_cache_features, threads,
                           restart_stale, root)
    if executor == "slurm":
        code = session.submit(wait)
    else:
        code = session.run(session.executor(workers), terminal.reporter(console), fail_fast)
    if code:
        raise typer.Exit(code)


def _sweep(item: str) -> tuple[str, list[str]]:
    """``--sweep KEY=V1,V2``: the setting and its values (as text: the config's schema converts them)."""
    key, values = key_value(item, "--sweep", "training.lr=1e-3,3e-4", "KEY=V1,V2")
    listed = [v.strip() for v in values.split(",") if v.strip()]
    if not listed:
        raise ConfigError(f"--sweep {item}: expected KEY=V1,V2, e.g. --sweep training.lr=1e-3,3e-4")
    return key, listed


def _open_existing_run_log(config: Path | None, overrides: dict[str, Any], output_dir: Path) -> None:
    """A plugin that fails as the config loads: open the run.log of the experiment this run would resume,
    so its traceback lands there. Only an existing folder: a failed start creates none."""
    from ablation_cli.config import ExperimentConfig, default_config_path, read_toml
    from ablation_cli.store import ExperimentStore

    try:
        raw = read_toml(config or default_config_path())
    except AblateError:
        return
    defaults = ExperimentConfig.model_fields
    name = str(raw.get("name", defaults["name"].default))
    dataset = str(overrides.get("dataset") or raw.get("dataset", defaults["dataset"].default))
    store = ExperimentStore.existing_for(output_dir, name, dataset)
    if store is not None:
        logs.add_file_log(store.log_file)
