"""The ``ablate`` command line: parse, call, render, and map errors to exit codes.

The only module that imports Typer. Each command imports what it needs inside its body, so that
``ablate status`` never loads pydantic, numpy or torch; ``exit_codes`` turns an expected failure
(AblateError) into one red line and its documented exit code.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from ablation_cli import __version__, logs
from ablation_cli.errors import AblateError, ConfigError, PluginError, environment_failure
from ablation_cli.reports import terminal

if TYPE_CHECKING:
    from ablation_cli.config import ExperimentConfig

app = typer.Typer(
    name="ablate",
    help="Crash-proof, resumable ablation grids (layer config x representation) for LoRA weight-space "
    "classifiers. Every finished run and cell is checkpointed atomically; rerun the same command to resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

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
SLURM = "Slurm"

P = ParamSpec("P")
R = TypeVar("R")


def exit_codes(command: Callable[P, R]) -> Callable[P, R]:
    """An expected failure becomes one red line (also in run.log, when one is open) and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except OSError as exc:  # a full disk, a read-only folder: one line too, not a traceback
            failure = environment_failure(exc)
            if failure is None:
                raise
            typer.secho(f"error: {failure}", fg=typer.colors.RED, err=True)
            raise typer.Exit(failure.exit_code) from None
        except AblateError as exc:
            logs.error_to_file(exc)
            if details := getattr(exc, "details", None):  # a plugin's own traceback: run.log, and -v
                logs.error_to_file(details.rstrip())
                logs.log.debug("%s", details.rstrip())
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _layer_configs(cfg: ExperimentConfig, names: list[str], flag: str) -> ExperimentConfig:
    """``cfg`` restricted to the layer configs ``names``, each checked against the config."""
    unknown = [n for n in names if n not in cfg.layer_configs]
    if unknown:
        raise ConfigError(f"{flag}: unknown layer config '{unknown[0]}' (allowed: {', '.join(cfg.layer_configs)})")
    return cfg.model_copy(update={"layer_configs": {n: cfg.layer_configs[n] for n in names}})


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


@app.command()
@exit_codes
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
    overrides["representations"] = _names(reps)
    overrides["classifiers"] = _names(classifiers)
    for item in sbatch or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sbatch {item}: expected KEY=VALUE, e.g. --sbatch account=lab")
        overrides[f"executor.slurm.extra.{key.strip()}"] = value.strip()
    if executor not in ("local", "slurm"):
        raise ConfigError(f"--executor {executor}: allowed: local, slurm")
    if executor == "slurm" and workers > 1:
        raise ConfigError("--workers is for the local executor; with Slurm, each cell is its own task")
    options = {"layout": data_format, "labels": labels, "label_field": label_field,
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
        cfg = _layer_configs(cfg, _names(layer_configs) or [], "--layer-configs")
    from ablation_cli.grid import check_cell_ids

    check_cell_ids(cfg)  # before the experiment folder, its lock or its log exist
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


@app.command()
@exit_codes
def status(
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (keys in docs/outputs.md).")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Progress table: state of every cell, test accuracy of finished ones, time spent, ETA. Reads files only."""
    from ablation_cli.executors.slurm_queue import status_with_queue
    from ablation_cli.reports.terminal import show_status, watch_status
    from ablation_cli.store import ExperimentStore
    from ablation_cli.tracking import configured_uri, untracked_runs

    store = ExperimentStore.find(output_dir, dataset, experiment)

    def model() -> dict[str, Any]:
        doc = status_with_queue(store)
        if uri := configured_uri(store):
            doc["tracking"] = {"mlflow": uri, "untracked_runs": untracked_runs(store, uri)}
        return doc

    if as_json:
        typer.echo(json.dumps(model(), indent=1))
    elif watch:
        watch_status(model, interval)
    else:
        show_status(model())


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


@app.command()
@exit_codes
def reset(
    rep: Annotated[str | None, typer.Option("--rep", help="Representation whose cells to reset.")] = None,
    layer_config: Annotated[str | None, typer.Option("--layer-config", help="Only this layer config.")] = None,
    classifier: Annotated[str | None, typer.Option("--classifier", help="Classifier whose cells to reset "
                                                   "(with --rep: only that representation's).")] = None,
    all_cells: Annotated[bool, typer.Option("--all", help="Reset every cell.")] = False,
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cell and run checkpoints so the next `ablate run` recomputes them (the feature cache stays)."""
    from ablation_cli.store import ExperimentStore

    store = ExperimentStore.find(output_dir, dataset, experiment)
    targets = store.reset_targets(rep, layer_config, all_cells, classifier)
    files = {cid: store.cell_files(cid) for cid in targets}
    total = sum(len(f) for f in files.values())
    for cid in targets:
        typer.echo(f"  {cid}: {len(files[cid])} file(s)")
    if total == 0:
        typer.echo("Nothing to delete.")
        return
    if dry_run:
        typer.echo(f"Dry run: would delete {total} file(s) in {len(targets)} cell(s).")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to delete without confirmation", hint="pass --yes")
        typer.confirm(f"Delete {total} file(s) in {len(targets)} cell(s)?", abort=True)
    with store.lock(purpose="reset"), store.claim_all(targets):  # never a cell a Slurm task trains now
        deleted = sum(store.delete_cell(cid) for cid in targets)
    typer.echo(f"Deleted {deleted} file(s); the next `ablate run` recomputes {len(targets)} cell(s).")
    from ablation_cli.tracking import supersede_reset

    if note := supersede_reset(store, targets):
        typer.echo(note, err=note.startswith("warning"))


@app.command()
@exit_codes
def restore(
    cells: Annotated[list[str] | None, typer.Option("--cell", help="Cell id to bring back (repeatable).")] = None,
    all_cells: Annotated[bool, typer.Option("--all", help="Every cell with superseded checkpoints.")] = False,
    list_only: Annotated[bool, typer.Option("--list", help="Only list what can be restored.")] = False,
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
) -> None:
    """Bring superseded checkpoints back (those `run --restart-stale` moved to checkpoints/.superseded/).

    Per cell, the newest superseded version returns: its cell checkpoint and the runs made under the same
    settings. A cell with checkpoints now is refused (reset it first). Restored cells count as done
    again only under the settings they were made with (e.g. `ablate run --resume DIR` after the
    experiment's settings were changed back).
    """
    from ablation_cli import superseded
    from ablation_cli.store import ExperimentStore

    store = ExperimentStore.find(output_dir, dataset, experiment)
    doc = store.read_experiment()
    current = {c["id"]: c for c in doc["cells"]}
    if cells and all_cells:
        raise ConfigError("give --cell ID (repeatable) or --all, not both")
    unknown = [c for c in cells or [] if c not in current]
    if unknown:
        raise ConfigError(f"--cell: unknown cell '{unknown[0]}' (this experiment has: {', '.join(current)})")
    found = superseded.restorable(store, list(cells or current))
    for item in found:
        typer.echo("  " + superseded.describe(item, current[item.cell_id]))
    missing = [c for c in cells or [] if c not in {i.cell_id for i in found}]
    if missing:
        raise ConfigError(f"nothing superseded to restore for {', '.join(missing)} (in {store.superseded_dir})")
    if not found:
        typer.echo("Nothing superseded to restore.")
        return
    if list_only or not (cells or all_cells):
        typer.echo(f"{len(found)} cell(s) can be restored: ablate restore --cell ID (or --all)"
                   f"{'' if list_only else ' (nothing was changed)'}")
        return
    with store.lock(purpose="restore"), store.claim_all([i.cell_id for i in found]):
        if busy := [i.cell_id for i in found if store.cell_files(i.cell_id)]:
            reset_hint = " or ".join(f"ablate reset --rep {current[c]['representation']} --layer-config "
                                     f"{current[c]['layer_config']} --yes" for c in busy[:2])
            raise ConfigError(f"{', '.join(busy)} {'has' if len(busy) == 1 else 'have'} checkpoints now; refusing to "
                              "overwrite them; nothing was restored", hint=f"reset first: {reset_hint}")
        moved = sum(superseded.restore(store, item) for item in found)
    typer.echo(f"Restored {moved} file(s) of {len(found)} cell(s) into {store.checkpoints}.")


@app.command()
@exit_codes
def merge(
    output_dir: OutputDir = Path("results"),
    experiment: ExperimentOpt = None,
    dataset: PickDataset = None,
    partial: Annotated[bool, typer.Option("--partial", help="Merge the finished cells; list the rest.")] = False,
) -> None:
    """Write the results from the verified cell checkpoints into the experiment folder.

    Outputs: results.json (the researcher's layout, config, provenance, statistics and findings),
    results.md (tables and findings), results.csv, results.tex, and plots/ (PNG and PDF:
    accuracy_by_representation, drop_FROM_to_TO per pair of layer configs, learning_curves_best,
    confusion_best, per_class_f1_drop) when matplotlib is installed. Exit 2 if a cell is unfinished
    or stale (use --partial).
    """
    from ablation_cli.reports.merge import format_merge_summary, write_merge
    from ablation_cli.store import ExperimentStore

    store = ExperimentStore.find(output_dir, dataset, experiment)
    results, paths = write_merge(store, partial=partial)
    typer.echo(format_merge_summary(results, paths, store.root))


@app.command()
@exit_codes
def compare(
    folders: Annotated[list[Path], typer.Argument(help="Two or more output folders, experiment folders or "
                                                       "results.json files (e.g. results_10k results_50k).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write comparison.md/.csv and the plot.")] = Path(
        "comparison"),
    experiment: Annotated[str | None, typer.Option("--experiment", "-e", help="In each output folder holding "
                          "several experiments, the one of this folder or experiment name (or pass experiment "
                          "folders).")] = None,
) -> None:
    """Compare experiments across datasets: one table and one plot of each cell's test accuracy by dataset size."""
    from ablation_cli.reports import compare as cmp

    if len(folders) < 2:
        raise ConfigError("compare needs at least two experiments (e.g. results_10k results_50k)")
    loaded = [cmp.load_results(f, experiment) for f in folders]
    written = cmp.write_comparison(loaded, out)
    typer.echo(written[0].read_text())
    if len(written) > 2:
        typer.echo(f"Wrote {out}/comparison.md, comparison.csv, {', '.join(p.name for p in written[2:])}")
    else:
        typer.echo(f"Wrote {out}/comparison.md and comparison.csv; no plot: matplotlib is not installed "
                   "(pip install 'ablate[plots]').")
    for warning in cmp.compare_warnings(loaded):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@app.command("import")
@exit_codes
def import_original(
    source: Annotated[Path, typer.Argument(help="The original script's output folder, the one holding "
                                                "checkpoints/ (e.g. results_50k/visual_ablation_50k).")],
    output_dir: OutputDir = Path("results"),
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name \\[default: from its "
                                                "results.json, or the folder name].")] = None,
    experiment: Annotated[str, typer.Option(help="Experiment name of the new folder.")] = "visual_ablation",
) -> None:
    """Make an ablate experiment of the original script's finished cells (the source is only read).

    Status shows them as imported; merge writes tables and plots from them; compare sets them beside
    an ablate run. Exit 0, 1 if a file was skipped (each named), 2 if none could be read.
    """
    from ablation_cli.importer import import_original as run_import
    from ablation_cli.reports.merge import format_merge_summary

    report = run_import(source, output_dir, dataset, experiment)
    for line in report.skipped:
        typer.secho(f"skipped {line}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"Imported {len(report.imported)} cell(s) from {source} into {report.store.root}"
               + (f"; skipped {len(report.skipped)} file(s)" if report.skipped else ""))
    typer.echo(format_merge_summary(report.results, report.paths, report.store.root))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command()
@exit_codes
def inspect(
    dataset: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A name from datasets.toml, or a path: a "
                                                "folder of LoRA files or a Hugging Face save_to_disk folder.")],
    as_json: AsJson = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML whose datasets.toml "
                                                "to use.")] = None,
    data_format: Format = None,
    labels: Labels = None,
    label_field: LabelField = None,
    cache_dir: CacheDir = Path(".feature_cache"),
) -> None:
    """Show what a dataset holds (layout, key style, LoRAs, classes, layers, shapes, ranks) and its problems.

    Exit 0 when it is ready to run, 2 when a problem would stop `ablate run`.
    """
    logs.setup_console(False)
    from ablation_cli.config import dataset_source, load_config
    from ablation_cli.data.summary import format_summary, summarize

    cfg, cfg_path = load_config(config)
    options = {"layout": data_format, "labels": labels, "label_field": label_field}
    summary = summarize(dataset_source(cfg, cfg_path, options, cache_dir, dataset=dataset))
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if summary["problems"]:
        raise typer.Exit(2)


@app.command()
@exit_codes
def reps(config: ConfigOpt = None) -> None:
    """List the available representations, their versions and feature counts per matrix (or module):
    the built-in ones, then plugins (installed packages' entry points, the config's `plugins`) with
    where each comes from; then the classifiers."""
    from ablation_cli import features
    from ablation_cli.config import load_config

    load_config(config)  # registers the plugins it names (and the installed ones)
    for name in features.available():
        r = features.get(name)
        dim = f"{r.dim_per_layer:>3}" if r.dim_per_layer is not None else ("varies" if r.plugin else "out*in")
        extra = "" if r.default or r.plugin else "  [not in the default grid]"
        typer.echo(f"{name:<16} v{r.version}  {dim:>6} per {r.unit:<6}  {r.description}{extra}")
        if r.plugin:
            typer.echo(f"{'':<16} plugin from {r.origin}, source sha256 {(r.source_sha or '')[:12]}")
    from ablation_cli.training import classifiers

    typer.echo("\nclassifiers: mlp, linear, [estimators.<name>] tables of the config" +
               "".join(f", {p.name}" for p in classifiers.plugins()))
    for p in classifiers.plugins():
        typer.echo(f"{p.name:<16} v{p.version}  {p.description}{'' if p.seeded else '  [no randomness]'}")
        typer.echo(f"{'':<16} plugin from {p.origin}, source sha256 {p.source_sha[:12]}")
    for line in features.broken_entry_points():
        typer.secho(f"plugin {line}: failed to import", fg=typer.colors.YELLOW, err=True)


@app.command("features")
@exit_codes
def export_features(
    out: Annotated[Path, typer.Option("--out", help="Folder to write REP.npy, labels.npy and index.json to.")],
    dataset: DatasetOpt = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations \\[default: the config's].")]
    = None,
    layer_config: Annotated[str, typer.Option(help="Layer config selecting the columns.")] = "all_layers",
    config: ConfigOpt = None,
    data_format: Format = None,
    labels: Labels = None,
    label_field: LabelField = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files of an earlier export in --out.")] = False,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    verbose: Verbose = False,
) -> None:
    """Export features for your own analysis: one float32 row per LoRA, in dataset order.

    Writes OUT/REP.npy, OUT/labels.npy and OUT/index.json (sample_ids, layers, label_mapping, columns).
    Uses and fills the feature cache.
    """
    terminal.setup(verbose)
    from ablation_cli.config import dataset_source, load_config
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.export import export

    cfg, cfg_path = load_config(config, {"dataset": dataset, "representations": _names(reps)})
    _layer_configs(cfg, [layer_config], "--layer-config")
    options = {"layout": data_format, "labels": labels, "label_field": label_field}
    source = dataset_source(cfg, cfg_path, options, cache_dir)
    cache = None if no_cache_features else FeatureCache.under(cache_dir)
    written = export(source, cfg, layer_config, out, cache, force=force)
    typer.echo(f"Wrote {', '.join(p.name for p in written)} to {out}")


cache_app = typer.Typer(help="List, verify or prune the feature cache (--cache-dir, default .feature_cache).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
@exit_codes
def cache_ls(cache_dir: CacheDir = Path(".feature_cache"), as_json: AsJson = False) -> None:
    """Every cached feature array: dataset, representation and version, shape, size, age."""
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.cache_view import format_cache_ls

    cache = FeatureCache.under(cache_dir)
    entries = cache.entries()
    typer.echo(json.dumps([e.to_json() for e in entries], indent=1) if as_json
               else format_cache_ls(entries, cache.root))


@cache_app.command("verify")
@exit_codes
def cache_verify(cache_dir: CacheDir = Path(".feature_cache")) -> None:
    """Check every byte of every cached feature array against its sha256 (a load checks only its size and
    a sample). A corrupt entry is deleted: the next run recomputes it. Exit 0 when all are whole, 1 if
    any was corrupt."""
    import time

    from ablation_cli.features.cache import FeatureCache

    cache = FeatureCache.under(cache_dir)
    entries = cache.entries()
    bad = 0
    for i, entry in enumerate(entries, 1):
        started = time.perf_counter()
        problem = cache.verify(entry)
        bad += problem is not None
        verdict = f"CORRUPT ({problem}): deleted, the next run recomputes it" if problem else "ok"
        typer.echo(f"[{i}/{len(entries)}] {entry.dataset} {entry.representation}-v{entry.version} "
                   f"({entry.bytes / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s): {verdict}")
    typer.echo(f"{len(entries) - bad} of {len(entries)} entries whole in {cache.root}" +
               (f"; {bad} corrupt, deleted" if bad else ""))
    if bad:
        raise typer.Exit(1)


@cache_app.command("prune")
@exit_codes
def cache_prune(
    cache_dir: CacheDir = Path(".feature_cache"),
    older_than: Annotated[float | None, typer.Option(help="Remove entries older than this many days.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Remove the entries of this dataset "
                                                "(name as `cache ls` shows it).")] = None,
    remove_all: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
) -> None:
    """Remove cache entries. Always: entries of old representation versions, and leftovers of
    interrupted writes. Also, as asked: --older-than DAYS, --dataset NAME, or --all.
    Entries in use by a running process are kept."""
    from ablation_cli.features.cache import FeatureCache
    from ablation_cli.reports.cache_view import format_prune_plan, format_pruned

    cache = FeatureCache.under(cache_dir)
    chosen = cache.select_for_prune(older_than, dataset, remove_all)
    leftovers = list(cache.leftovers())
    if dry_run:
        typer.echo(format_prune_plan(chosen, leftovers))
        return
    kept, freed = cache.prune(chosen, leftovers)
    typer.echo(format_pruned(chosen, kept, leftovers, freed))


track_app = typer.Typer(help="Experiment tracking in MLflow: a view of the checkpoints, browsable in `mlflow ui`.",
                        no_args_is_help=True)
app.add_typer(track_app, name="track")


@track_app.command("sync")
@exit_codes
def track_sync(output_dir: OutputDir = Path("results"), experiment: ExperimentOpt = None, dataset: PickDataset = None,
               mlflow: MlflowOpt = None) -> None:
    """Log to MLflow whatever it lacks of an experiment: its runs, cells and merge (imported cells too).

    Idempotent: a second sync adds nothing. Runs replaced on disk since (reset) are marked superseded.
    The URI defaults to the one the experiment ran with ([tracking] mlflow or --mlflow).
    """
    from ablation_cli.store import ExperimentStore
    from ablation_cli.tracking import Tracker, absolute_uri, configured_uri, sync_failure

    store = ExperimentStore.find(output_dir, dataset, experiment)
    uri = absolute_uri(mlflow) if mlflow else configured_uri(store)
    if not uri:
        raise ConfigError(f"{store.root} was run without tracking: no MLflow URI to sync to",
                          hint="pass one, e.g. --mlflow sqlite:///mlflow.db")
    with store.lock(purpose="track sync"):
        try:
            report = Tracker(uri, store).sync()
        except AblateError:
            raise
        except Exception as exc:
            raise sync_failure(uri, exc) from exc
    typer.echo(f"Synced {store.root} to MLflow at {uri}: {report.runs} run(s), {report.cells} cell(s), "
               f"{report.merges} merge(s) logged" + (f"; {report.superseded} marked superseded"
                                                     if report.superseded else ""))


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """ablate: run long ablation grids that survive crashes, and know where they stand."""


def main() -> None:
    from ablation_cli.runtime import apply_env, skip_the_last_collection

    apply_env()  # before torch is first imported, in this process and every child
    skip_the_last_collection()
    try:
        app()
    finally:
        # queued MLflow logging, while the interpreter still runs: at exit, mlflow's artifact upload
        # could not start its thread pool ("can't register atexit after shutdown")
        if (tracking := sys.modules.get("ablation_cli.tracking")) is not None:
            tracking.flush()
