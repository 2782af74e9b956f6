"""The ``ablate`` command line: parse, call, map errors to exit codes.

The only module that imports Typer. Heavy modules (torch, pydantic models, the
trainer) are imported inside the commands that need them, so ``ablate status``
stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from ablation_cli import __version__
from ablation_cli.errors import EXIT_FAILED_CELLS, EXIT_SIGINT, EXIT_SIGTERM, AblateError, ConfigError, Stopped

app = typer.Typer(
    name="ablate",
    help="Crash-proof, resumable ablation grids (layer config x representation) for LoRA weight-space "
    "classifiers. Every finished run and cell is checkpointed atomically; rerun the same command to resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("ablation_cli")
file_log = logging.getLogger("ablate.file")  # run.log only: errors the console already shows in red

OutputDir = Annotated[Path, typer.Option("--output-dir", "-o", help="Folder holding experiment folders.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name from datasets.toml.")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Cache folder, shared across experiments and "
                                       "runs: computed features (features/) and the demo dataset's files.")]
NoCache = Annotated[bool, typer.Option("--no-cache-features", help="Neither read nor write the feature cache.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug lines and full tracebacks.")]


def _fail(exc: AblateError) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(exc.exit_code)


def _setup_logging(verbose: bool) -> Any:
    """Console handler: rich on a terminal, plain timestamped lines otherwise (nohup, pipes)."""
    log.handlers.clear()
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    console = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False,
                                               rich_tracebacks=verbose, log_time_format="%H:%M:%S")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    file_log.handlers[:] = [logging.NullHandler()]
    file_log.propagate = False
    return console


def _add_file_log(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    file_log.addHandler(handler)


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    if signum == signal.SIGTERM:
        raise Stopped("SIGTERM", EXIT_SIGTERM)
    raise Stopped("SIGINT", EXIT_SIGINT)


def _split_names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML "
                      "[default: configs/visual_ablation.toml].")] = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDir = Path("results"),
    num_runs: Annotated[int | None, typer.Option(help="Trainings per cell (seeds differ).")] = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations to run.")] = None,
    layer_configs: Annotated[str | None, typer.Option(help="Comma-separated layer configs to run.")] = None,
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
                                "model [default 0: all on CUDA, one at a time on CPU].")] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision on CUDA: off, bf16 or fp16.")] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed cell.")] = False,
    data_format: Annotated[str | None, typer.Option("--format", help="Folder layout: diffusers, peft or flat "
                           "[default: detected].")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels file (CSV file,label or JSON) for a folder "
                      "dataset [default: labels.csv/labels.json at its root, or metadata.json].")] = None,
    label_field: Annotated[str | None, typer.Option(help="metadata.json field holding the label "
                           "[default: category_label].")] = None,
    on_mismatch: Annotated[str | None, typer.Option(help="LoRAs whose layer set differs: error or skip.")] = None,
    drop_nonfinite: Annotated[bool, typer.Option("--drop-nonfinite", help="Drop LoRAs with NaN/Inf weights "
                              "instead of stopping.")] = False,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads per process [default: torch's; "
                       "with --workers: cores / N]. CPU results are bit-identical for a given thread count.")] = None,
    executor: Annotated[str, typer.Option(help="local: this machine; slurm: a feature job plus a job array "
                        "with one task per pending cell (submitit).")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="Local executor: run cells in N processes, each on its own "
                       "GPU (cuda:i) or its share of the CPU cores.")] = 1,
    wait: Annotated[bool, typer.Option("--wait", help="Slurm: follow the jobs to the end, then merge "
                                       "[default: submit and return].")] = False,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.", rich_help_panel="Slurm")] = None,
    gpus_per_task: Annotated[int | None, typer.Option(help="Slurm GPUs per cell task.",
                                                      rich_help_panel="Slurm")] = None,
    cpus_per_task: Annotated[int | None, typer.Option(help="Slurm CPUs per cell task (= its torch threads).",
                                                      rich_help_panel="Slurm")] = None,
    mem_gb: Annotated[float | None, typer.Option(help="Slurm memory per cell task, GB.",
                                                 rich_help_panel="Slurm")] = None,
    time_min: Annotated[int | None, typer.Option(help="Slurm time limit per task, minutes (a timed-out task "
                                                 "is requeued and resumes).", rich_help_panel="Slurm")] = None,
    array_parallelism: Annotated[int | None, typer.Option(help="Slurm array tasks running at once.",
                                                          rich_help_panel="Slurm")] = None,
    sbatch: Annotated[list[str] | None, typer.Option(help="Extra sbatch parameter KEY=VALUE (repeatable), e.g. "
                                                     "--sbatch account=lab --sbatch qos=high.",
                                                     rich_help_panel="Slurm")] = None,
    verbose: Verbose = False,
) -> None:
    """Walk the grid: skip what valid checkpoints hold, train the rest, checkpoint every run and cell.

    Resume after any crash or kill with the same command. Exit 0 when every cell is done (or, with
    --executor slurm, when the jobs are submitted), 1 if a cell failed, 2 on bad input, 3 if another
    run holds the folder, 130/143 on Ctrl-C/SIGTERM.
    """
    console = _setup_logging(verbose)
    try:
        from ablation_cli.config import load_config

        overrides: dict[str, Any] = {
            "dataset": dataset, "num_runs": num_runs, "representations": _split_names(reps), "device": device,
            "classifier.dropout": dropout, "classifier.hidden_dim": hidden_dim,
            "training.weight_decay": weight_decay, "training.batch_size": batch_size, "training.lr": lr,
            "training.max_epochs": max_epochs, "training.patience": patience, "seed": seed,
            "training.plateau_factor": plateau_factor, "training.plateau_patience": plateau_patience,
            "training.runs_in_parallel": runs_in_parallel, "training.amp": amp,
            "executor.slurm.partition": partition, "executor.slurm.gpus_per_task": gpus_per_task,
            "executor.slurm.cpus_per_task": cpus_per_task, "executor.slurm.mem_gb": mem_gb,
            "executor.slurm.time_min": time_min, "executor.slurm.array_parallelism": array_parallelism,
        }
        for item in sbatch or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--sbatch {item}: expected KEY=VALUE, e.g. --sbatch account=lab")
            overrides[f"executor.slurm.extra.{key.strip()}"] = value.strip()
        if executor not in ("local", "slurm"):
            raise ConfigError(f"--executor {executor}: allowed: local, slurm")
        if executor == "slurm" and workers > 1:
            raise ConfigError("--workers is for the local executor; with Slurm, each cell is its own task")
        cfg, cfg_path = load_config(config, overrides)
        if layer_configs:
            cfg = _select_layer_configs(cfg, _split_names(layer_configs) or [])
        from ablation_cli.data.sources import dataset_slug

        options = {"layout": data_format, "labels": labels, "label_field": label_field,
                   "on_mismatch": on_mismatch, "drop_nonfinite": drop_nonfinite or None}
        source = _source(cfg.dataset, cfg, cfg_path, options, cache_dir)
        cache = None if no_cache_features else _feature_cache(cache_dir)
        root = output_dir / f"{cfg.name}_{dataset_slug(cfg.dataset)}"
        from ablation_cli.executors.spec import JobSpec

        spec = JobSpec(config=cfg.model_dump(mode="json"), config_path=str(cfg_path.resolve()) if cfg_path else None,
                       dataset_options=options, cache_dir=str(cache_dir.resolve()), use_cache=cache is not None,
                       root=str(root.resolve()), device=cfg.device, threads=threads, env=dict(REPRODUCIBLE_ENV))
        if threads:
            from ablation_cli.executors.spec import set_threads

            set_threads(threads)
        if executor == "slurm":
            _run_slurm(cfg, source, root, cache, spec, wait)
        else:
            _run(cfg, source, root, fail_fast, console, cache, spec, workers)
    except AblateError as exc:
        file_log.error("%s", exc)
        _fail(exc)


def _source(dataset: str, cfg: Any, cfg_path: Path | None, options: dict[str, Any], cache_dir: Path) -> Any:
    from ablation_cli.data.sources import source_for

    return source_for(dataset, cfg, cfg_path, options, cache_dir)


def _select_layer_configs(cfg: Any, names: list[str]) -> Any:
    unknown = [n for n in names if n not in cfg.layer_configs]
    if unknown:
        raise ConfigError(f"--layer-configs: unknown layer config '{unknown[0]}' "
                          f"(allowed: {', '.join(cfg.layer_configs)})")
    return cfg.model_copy(update={"layer_configs": {n: cfg.layer_configs[n] for n in names}})


def _feature_cache(cache_dir: Path) -> Any:
    from ablation_cli.features.cache import FeatureCache

    return FeatureCache(cache_dir / "features")


def _run_slurm(cfg: Any, source: Any, root: Path, cache: Any, spec: Any, wait: bool) -> None:
    from ablation_cli.executors import slurm
    from ablation_cli.orchestrator import Orchestrator
    from ablation_cli.report import write_merge
    from ablation_cli.status import build_status
    from ablation_cli.store import ExperimentStore, experiment_lock

    slurm.require_submitit()  # before anything is written
    store = ExperimentStore(root)
    with experiment_lock(root, purpose="slurm submission"):
        _add_file_log(store.log_file)
        record = Orchestrator(cfg, source, store, cache=cache, spec=spec).submit_slurm()
    if record is not None:
        feat = f"feature job {record['features_job']}, then " if record["features_job"] else ""
        log.info("Submitted %s%d cell task(s) as array job %s (logs: %s)", feat, len(record["cells"]),
                 record["array_job"], record["logs"])
        for cell, job in record["cells"].items():
            log.info("  %s: job %s", cell, job)
    if not wait:
        if record is not None:
            log.info("Watch with: ablate status --output-dir %s --watch   (or rerun with --wait)", root.parent)
        return
    if record is not None:
        slurm.wait(store, record)
    model = build_status(store)
    if model["done"] < model["total"]:
        bad = [c["id"] for c in model["cells"] if c["state"] != "done"]
        log.error("%d cell(s) did not finish: %s. Rerun the same command to submit them again.", len(bad),
                  ", ".join(bad))
        raise typer.Exit(EXIT_FAILED_CELLS)
    with experiment_lock(root, purpose="merge"):
        _, paths = write_merge(store)
    log.info("All cells complete. Results in %s: results.json/.md/.csv/.tex%s", root,
             f" and {sum(p.suffix == '.png' for p in paths)} plots" if paths else "")


def _run(cfg: Any, source: Any, root: Path, fail_fast: bool, console: Any, cache: Any, spec: Any = None,
         workers: int = 1) -> None:
    from ablation_cli.orchestrator import Orchestrator
    from ablation_cli.progress import PlainReporter, RichReporter
    from ablation_cli.report import write_merge
    from ablation_cli.store import ExperimentStore, experiment_lock

    store = ExperimentStore(root)
    with experiment_lock(root, purpose="run"):
        _add_file_log(store.log_file)
        signal.signal(signal.SIGTERM, _raise_stopped)
        signal.signal(signal.SIGINT, _raise_stopped)
        reporter = RichReporter(console) if console is not None else PlainReporter()
        started = time.perf_counter()
        try:
            outcome = Orchestrator(cfg, source, store, reporter, cache=cache, spec=spec,
                                   workers=workers).run(fail_fast=fail_fast)
        except Stopped as exc:
            log.warning("%s", exc)
            raise
        except AblateError:
            raise
        except Exception:
            log.exception("internal error (a bug in ablate; please report it with run.log)")
            raise
        elapsed = time.perf_counter() - started
        if outcome.failed:
            log.error("%d cell(s) failed: %s. Fix and rerun the same command: finished cells are kept.",
                      len(outcome.failed), ", ".join(outcome.failed))
            log.info("Merge what exists with: ablate merge --output-dir %s --partial", root.parent)
            raise typer.Exit(EXIT_FAILED_CELLS)
        if outcome.left_to_slurm:
            log.info("%d cell(s) are queued or running in Slurm; merge when they finish (ablate merge).",
                     len(outcome.left_to_slurm))
            return
        if not outcome.done and (root / "results.json").exists():
            log.info("Results are up to date in %s (`ablate merge` rewrites them).", root)
            return  # nothing new: a finished experiment answers at once, no re-plotting
        _, paths = write_merge(store)
        n_plots = sum(p.suffix == ".png" for p in paths)
        log.info("All cells complete (%.1fs this session). Results in %s: results.json/.md/.csv/.tex%s", elapsed,
                 root, f" and {n_plots} plots" if n_plots else "")


@app.command()
def status(
    output_dir: OutputDir = Path("results"),
    dataset: DatasetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (keys in the README).")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Progress table: state of every cell, test accuracy of finished ones, time spent, ETA. Reads files only."""
    from ablation_cli.status import build_status, find_experiment
    from ablation_cli.store import ExperimentStore

    try:
        store = ExperimentStore(find_experiment(output_dir, dataset))
        if as_json:
            typer.echo(json.dumps(build_status(store), indent=1))
            return
        if not watch:
            _print_status(build_status(store))
            return
        _watch_status(store, interval)
    except AblateError as exc:
        _fail(exc)


def _print_status(model: dict[str, Any]) -> None:
    from ablation_cli.report import format_status_plain, status_table

    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(status_table(model))
    else:
        typer.echo(format_status_plain(model))


def _watch_status(store: Any, interval: float) -> None:
    from ablation_cli.report import format_status_plain, status_table
    from ablation_cli.status import build_status

    try:
        if sys.stdout.isatty():
            from rich.live import Live

            with Live(status_table(build_status(store)), auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(status_table(build_status(store)), refresh=True)
        while True:
            typer.echo(format_status_plain(build_status(store)) + "\n", nl=False)
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@app.command()
def reset(
    rep: Annotated[str | None, typer.Option("--rep", help="Representation whose cells to reset.")] = None,
    layer_config: Annotated[str | None, typer.Option("--layer-config", help="Only this layer config.")] = None,
    all_cells: Annotated[bool, typer.Option("--all", help="Reset every cell.")] = False,
    output_dir: OutputDir = Path("results"),
    dataset: DatasetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cell and run checkpoints so the next `ablate run` recomputes them (the feature cache stays)."""
    from ablation_cli.status import find_experiment
    from ablation_cli.store import ExperimentStore, experiment_lock

    try:
        store = ExperimentStore(find_experiment(output_dir, dataset))
        targets = _reset_targets(store.read_experiment(), rep, layer_config, all_cells)
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
        with experiment_lock(store.root, purpose="reset"):
            deleted = sum(store.delete_cell(cid) for cid in targets)
        typer.echo(f"Deleted {deleted} file(s); the next `ablate run` recomputes {len(targets)} cell(s).")
    except AblateError as exc:
        _fail(exc)


def _reset_targets(record: dict[str, Any], rep: str | None, layer_config: str | None, all_cells: bool) -> list[str]:
    cells = record["cells"]
    if all_cells == (rep is not None):
        raise ConfigError("give exactly one of --rep NAME or --all")
    reps = list(dict.fromkeys(c["representation"] for c in cells))
    lcs = list(dict.fromkeys(c["layer_config"] for c in cells))
    if rep is not None and rep not in reps:
        raise ConfigError(f"--rep: unknown representation '{rep}' (this experiment has: {', '.join(reps)})")
    if layer_config is not None and layer_config not in lcs:
        raise ConfigError(f"--layer-config: unknown layer config '{layer_config}' "
                          f"(this experiment has: {', '.join(lcs)})")
    return [c["id"] for c in cells
            if (all_cells or c["representation"] == rep)
            and (layer_config is None or c["layer_config"] == layer_config)]


@app.command()
def merge(
    output_dir: OutputDir = Path("results"),
    dataset: DatasetOpt = None,
    partial: Annotated[bool, typer.Option("--partial", help="Merge the finished cells; list the rest.")] = False,
) -> None:
    """Write results.json (researcher layout + config + provenance) and results.md from the checkpoints."""
    from ablation_cli.report import write_merge
    from ablation_cli.status import find_experiment
    from ablation_cli.store import ExperimentStore

    try:
        store = ExperimentStore(find_experiment(output_dir, dataset))
        results, paths = write_merge(store, partial=partial)
    except AblateError as exc:
        _fail(exc)
    _report_merge(results, paths, store.root)


def _report_merge(results: dict[str, Any], paths: list[Path], root: Path) -> None:
    from ablation_cli.plots import have_matplotlib

    merged = sum(len(v) for k, v in results.items() if k.endswith("_results"))
    tables = [p.name for p in paths if p.parent == root]
    plots = [p for p in paths if p.parent != root]
    typer.echo(f"Merged {merged} cell(s) into {root}: {', '.join(tables)}")
    if plots:
        typer.echo(f"Plots: {len(plots)} files in {plots[0].parent}")
    elif not have_matplotlib():
        typer.echo("No plots: matplotlib is not installed (pip install 'ablate[plots]').")
    if results["missing"]:
        typer.echo(f"Missing (not merged): {', '.join(results['missing'])}")


@app.command()
def compare(
    folders: Annotated[list[Path], typer.Argument(help="Two or more output folders, experiment folders or "
                                                       "results.json files (e.g. results_10k results_50k).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write comparison.md/.csv and the plot.")] = Path(
        "comparison"),
) -> None:
    """Compare experiments across datasets: one table and one plot of each cell's test accuracy by dataset size."""
    from ablation_cli import compare as cmp
    from ablation_cli.plots import have_matplotlib
    from ablation_cli.store import atomic_write_text

    try:
        if len(folders) < 2:
            raise ConfigError("compare needs at least two experiments (e.g. results_10k results_50k)")
        loaded = [cmp.load_results(f) for f in folders]
    except AblateError as exc:
        _fail(exc)
    table = cmp.format_compare_md(loaded)
    atomic_write_text(out / "comparison.md", table)
    atomic_write_text(out / "comparison.csv", cmp.format_compare_csv(loaded))
    typer.echo(table)
    if have_matplotlib():
        paths = cmp.compare_plot(loaded, out)
        typer.echo(f"Wrote {out}/comparison.md, comparison.csv, {', '.join(p.name for p in paths)}")
    else:
        typer.echo(f"Wrote {out}/comparison.md and comparison.csv; no plot: matplotlib is not installed "
                   "(pip install 'ablate[plots]').")


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(help="A dataset name from datasets.toml, a folder of LoRAs or a "
                                                "`datasets` folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML whose datasets.toml "
                                                "to use.")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="diffusers, peft, flat or hf.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels file (CSV file,label or JSON).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Label field [default: category_label].")] = None,
    cache_dir: CacheDir = Path(".feature_cache"),
) -> None:
    """Show what a dataset holds (layout, key style, LoRAs, classes, layers, shapes, ranks) and its problems.

    Exit 0 when it is ready to run, 2 when a problem would stop `ablate run`.
    """
    _setup_logging(False)
    try:
        from ablation_cli.config import load_config
        from ablation_cli.data.summary import format_summary, summarize

        cfg, cfg_path = load_config(config)
        options = {"layout": data_format, "labels": labels, "label_field": label_field}
        summary = summarize(_source(dataset, cfg, cfg_path, options, cache_dir))
    except AblateError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    if summary["problems"]:
        raise typer.Exit(2)


@app.command()
def reps() -> None:
    """List the available representations, their versions and feature counts per matrix (or module)."""
    from ablation_cli import features

    for name in features.available():
        r = features.get(name)
        dim = f"{r.dim_per_layer:>3}" if r.dim_per_layer is not None else "out*in"
        extra = "" if r.default else "  [not in the default grid]"
        typer.echo(f"{name:<16} v{r.version}  {dim:>6} per {r.unit:<6}  {r.description}{extra}")


@app.command("features")
def export_features(
    out: Annotated[Path, typer.Option("--out", help="Folder to write <rep>.npy, labels.npy and index.json to.")],
    dataset: DatasetOpt = None,
    reps: Annotated[str | None, typer.Option(help="Comma-separated representations [default: the config's].")]
    = None,
    layer_config: Annotated[str, typer.Option(help="Layer config selecting the columns.")] = "all_layers",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML "
                      "[default: configs/visual_ablation.toml].")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="diffusers, peft, flat or hf.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels file (CSV file,label or JSON).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Label field [default: category_label].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files of an earlier export in --out.")] = False,
    cache_dir: CacheDir = Path(".feature_cache"),
    no_cache_features: NoCache = False,
    verbose: Verbose = False,
) -> None:
    """Export features for your own analysis: one float32 row per LoRA, in dataset order.

    Writes OUT/<rep>.npy, OUT/labels.npy and OUT/index.json (sample_ids, layers, label_mapping, columns).
    Uses and fills the feature cache.
    """
    _setup_logging(verbose)
    try:
        from ablation_cli.config import load_config
        from ablation_cli.export import export

        overrides: dict[str, Any] = {"dataset": dataset, "representations": _split_names(reps)}
        cfg, cfg_path = load_config(config, overrides)
        if layer_config not in cfg.layer_configs:
            raise ConfigError(f"--layer-config: unknown layer config '{layer_config}' "
                              f"(allowed: {', '.join(cfg.layer_configs)})")
        options = {"layout": data_format, "labels": labels, "label_field": label_field}
        source = _source(cfg.dataset, cfg, cfg_path, options, cache_dir)
        cache = None if no_cache_features else _feature_cache(cache_dir)
        written = export(source, cfg, layer_config, out, cache, force=force)
    except AblateError as exc:
        _fail(exc)
    typer.echo(f"Wrote {', '.join(p.name for p in written)} to {out}")


cache_app = typer.Typer(help="List or prune the feature cache (--cache-dir, default .feature_cache).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(
    cache_dir: CacheDir = Path(".feature_cache"),
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Every cached feature array: dataset, representation and version, shape, size, age."""
    from ablation_cli.features.cache import human_age, human_bytes

    entries = _feature_cache(cache_dir).entries()
    if as_json:
        typer.echo(json.dumps([{"dataset": e.dataset, "dataset_key": e.dataset_key,
                                "representation": e.representation, "version": e.version,
                                "shape": list(e.shape), "bytes": e.bytes, "age_s": round(e.age_s, 1),
                                "created_at": e.created_at, "path": str(e.npy)} for e in entries], indent=1))
        return
    if not entries:
        typer.echo(f"The feature cache {cache_dir / 'features'} is empty.")
        return
    typer.echo(f"{'DATASET':<20} {'REPRESENTATION':<16} {'VER':>3} {'SHAPE':>16} {'SIZE':>9} {'AGE':>5}  KEY")
    for e in entries:
        shape = "x".join(map(str, e.shape))
        typer.echo(f"{e.dataset[:20]:<20} {e.representation:<16} {e.version:>3} {shape:>16} "
                   f"{human_bytes(e.bytes):>9} {human_age(e.age_s):>5}  {e.dataset_key}")
    typer.echo(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))} in {cache_dir / 'features'}")


@cache_app.command("prune")
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
    from ablation_cli import features
    from ablation_cli.features.cache import human_bytes

    cache = _feature_cache(cache_dir)
    chosen = []
    for e in cache.entries():
        try:
            current = features.get(e.representation).version
        except KeyError:
            current = None
        if (remove_all or current != e.version or (dataset is not None and e.dataset == dataset)
                or (older_than is not None and e.age_s > older_than * 86400)):
            chosen.append(e)
    leftovers = list(cache.leftovers())
    freed, kept = 0, 0
    for e in chosen:
        if dry_run:
            typer.echo(f"would remove {e.dataset} {e.representation} v{e.version} ({human_bytes(e.bytes)})")
        elif cache.remove(e):
            freed += e.bytes
        else:
            kept += 1
            typer.echo(f"kept {e.npy.name} of {e.dataset}: a running process is using it")
    for path in leftovers:
        if dry_run:
            typer.echo(f"would remove leftover {path}")
        else:
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    verb = "Would remove" if dry_run else "Removed"
    typer.echo(f"{verb} {len(chosen) - kept} entries and {len(leftovers)} leftovers"
               + ("" if dry_run else f", {human_bytes(freed)} freed") + ".")


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


# MKL (torch's CPU BLAS) may pick kernels and thread splits at run time, so the same training
# can differ in the last bits between processes: a resumed run would not reproduce the numbers of
# an uninterrupted one. Strict conditional numerical reproducibility costs nothing measurable here.
# Set before torch is first imported; a user's own setting wins.
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE"}


def main() -> None:
    for key, value in REPRODUCIBLE_ENV.items():
        os.environ.setdefault(key, value)
    app()
