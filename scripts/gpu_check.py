"""The GPU check, in one go: CUDA correctness, then training timings at the real 50k sizes.

Run on a machine with one CUDA GPU (under 8 minutes on an H200):

    python scripts/gpu_check.py            # prints one report, writes its section of docs/benchmarks.md

1. Correctness on CUDA
   - stacked runs (the runs of a cell trained as one batched model) equal per-run training;
   - bf16 and fp16 mixed precision within 0.02 test accuracy of fp32;
   - out-of-memory halving: a cell whose stacked runs do not fit a capped GPU
     (``torch.cuda.set_per_process_memory_fraction``) finishes by halving the runs trained together;
   - features on the GPU (torch, float64) equal numpy's within 1e-5, for every built-in representation.
2. Timings: training on synthetic features of the 50k sizes (45,400 LoRAs x each representation's
   dimension for both layer configs, 10 classes, 10 runs stacked, epochs capped), the per-epoch
   time, the projected full 2 x 9 x 10 grid, and the GPU memory peak.

``--smoke`` runs the same code on the CPU at toy sizes (CUDA-only checks are reported as skipped):
the test suite runs it so the script cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ablation_cli.runtime import apply_env  # noqa: E402

apply_env()
warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")  # toy splits
import torch  # noqa: E402

from ablation_cli.data.layers import sd15_layers, select_layers  # noqa: E402
from ablation_cli.features import registry  # noqa: E402
from ablation_cli.features.matrix import compute_many  # noqa: E402
from ablation_cli.training import trainer  # noqa: E402
from ablation_cli.training.split import Split  # noqa: E402
from scripts.benchlib import publish  # noqa: E402

N_50K, CLASSES, RUNS = 45_400, 10, 10
LAYER_CONFIGS = {"all_layers": ["*"], "visual_only": ["*.attn1.*"]}


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = 0

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        mark = "skipped" if ok is None else ("PASS" if ok else "FAIL")
        self.failed += ok is False
        self.lines.append(f"| {name} | {mark} | {detail} |")
        print(f"[{mark}] {name}: {detail}", flush=True)


def synthetic(n: int, dim: int, classes: int, seed: int, device: torch.device) -> trainer.PreparedData:
    """Separable-enough features: class means plus noise, split 70/10/20 (stratification is irrelevant)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    x = centers[labels] * 0.3 + rng.normal(0, 1, (n, dim)).astype(np.float32)
    order = rng.permutation(n)
    a, b = int(0.7 * n), int(0.8 * n)
    split = Split(np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:]))
    return trainer.prepare(x, labels, split, classes, device)


def params(**kw: Any) -> trainer.TrainParams:
    base: dict[str, Any] = {"hidden_dim": 512, "num_hidden_layers": 3, "dropout": 0.5, "batch_size": 64,
                            "max_epochs": 300, "patience": 15}
    return trainer.TrainParams(**{**base, **kw})


def mean_acc(results: list[dict[str, Any]]) -> float:
    return float(np.mean([r["metrics"]["test_acc"] for r in results]))


def check_stacked(rep: Report, device: torch.device, n: int, epochs: int) -> None:
    data = synthetic(n, 640, CLASSES, 0, device)
    p = params(max_epochs=epochs, patience=epochs)
    seeds = [42, 43, 44]
    together = trainer.train_runs(data, p, seeds, stacked=device.type == "cuda")
    alone = [trainer.train_runs(data, p, [s], stacked=False)[0] for s in seeds]
    worst = max(abs(a["metrics"]["test_acc"] - b["metrics"]["test_acc"]) for a, b in zip(together, alone))
    loss = max(abs(a["learning_curve"]["train_loss"][0] - b["learning_curve"]["train_loss"][0])
               for a, b in zip(together, alone))
    exact = device.type != "cuda"
    ok = worst == 0.0 and loss == 0.0 if exact else worst <= 0.02 and loss <= 1e-3
    rep.check("stacked runs = per-run training", ok,
              f"{len(seeds)} runs, {epochs} epochs on {device}: max |test acc diff| {worst:.4f}, "
              f"first-epoch train loss diff {loss:.2e}" + (" (bit-identical expected on CPU)" if exact else ""))


def check_amp(rep: Report, device: torch.device, n: int, epochs: int) -> None:
    if device.type != "cuda":
        rep.check("bf16 / fp16 within 0.02 of fp32", None, "needs CUDA")
        return
    data = synthetic(n, 640, CLASSES, 1, device)
    seeds = list(range(42, 42 + 5))
    fp32 = mean_acc(trainer.train_runs(data, params(max_epochs=epochs, patience=epochs), seeds))
    for amp in ("bf16", "fp16"):
        acc = mean_acc(trainer.train_runs(data, params(max_epochs=epochs, patience=epochs, amp=amp), seeds))
        rep.check(f"{amp} within 0.02 of fp32", abs(acc - fp32) <= 0.02,
                  f"mean test acc {acc:.4f} vs fp32 {fp32:.4f} (5 runs, {epochs} epochs)")


def check_oom_halving(rep: Report, device: torch.device) -> None:
    """A real cell through the real cell loop, on a GPU capped so that 10 stacked runs do not fit."""
    if device.type != "cuda":
        rep.check("OOM halving", None, "needs CUDA")
        return
    from ablation_cli.config import ExperimentConfig
    from ablation_cli.orchestrator import Orchestrator
    from ablation_cli.session import Session

    total = torch.cuda.get_device_properties(device).total_memory
    # flat_vec of 1,500 LoRAs: 99,648 inputs x 1,024 hidden; 10 runs' weights + Adam ~ 16 GB, one run ~ 1.6 GB
    torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / total), device)
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("ablation_cli").addHandler(Grab())
    logging.getLogger("ablation_cli").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "datasets.toml").write_text('[oomdemo]\nkind = "demo"\nnum_samples = 1500\nnum_classes = 10\n')
        cfg = ExperimentConfig.model_validate({
            "name": "oom", "dataset": "oomdemo", "num_runs": RUNS, "device": str(device),
            "representations": ["flat_vec"], "layer_configs": {"all_layers": {"include": ["*"]}},
            "classifier": {"hidden_dim": 1024}, "training": {"max_epochs": 2, "patience": 2}})
        (root / "exp.toml").write_text("")
        session = Session.open(cfg, root / "exp.toml", {}, root / "out", root / "cache")
        started = time.perf_counter()
        outcome = Orchestrator(cfg, session.workspace, session.store, session.executor()).run()
        elapsed = time.perf_counter() - started
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    halvings = [m for m in records if "CUDA out of memory with" in m]
    rep.check("OOM halving", bool(halvings) and outcome.done == ["all_layers_flat_vec"],
              f"capped at 6 GiB: {'; '.join(halvings) or 'no halving logged'}; cell "
              f"{'finished' if outcome.done else 'did not finish'} in {elapsed:.0f}s")


def check_features(rep: Report, device: torch.device, n: int) -> None:
    if device.type != "cuda":
        rep.check("GPU features = numpy within 1e-5", None, "needs CUDA")
        return
    rng = np.random.default_rng(3)
    computes = {name: registry.get(name).compute for name in registry.available()
                if registry.get(name).unit == "matrix" and registry.get(name).cacheable}
    worst, where = 0.0, ""
    for shape in sorted({spec.shape for spec in sd15_layers()}):
        x = (rng.standard_normal((n, *shape)) * 0.01).astype(np.float32)
        cpu, gpu = compute_many(x, computes), compute_many(x, computes, device)
        for name in computes:
            scale = np.maximum(np.abs(cpu[name]), 1.0)
            err = float(np.max(np.abs(gpu[name] - cpu[name]) / scale))
            if err > worst:
                worst, where = err, f"{name} at {shape}"
    rep.check("GPU features = numpy within 1e-5", worst <= 1e-5,
              f"{len(computes)} representations x {len({s.shape for s in sd15_layers()})} SD1.5 shapes, "
              f"{n} LoRAs: max relative error {worst:.1e}" + (f" ({where})" if where else ""))


def dims() -> dict[str, dict[str, int]]:
    """Feature dimension of every default representation for both layer configs at SD1.5 shapes."""
    specs = {s.name: s.shape for s in sd15_layers()}
    out: dict[str, dict[str, int]] = {}
    for lc, include in LAYER_CONFIGS.items():
        layers = select_layers(specs, include)
        for name in registry.default_grid():
            rep = registry.get(name)
            units = layers if rep.unit == "matrix" else sorted({la.rsplit(".", 1)[0] for la in layers})
            total = 0
            for part in rep.base:
                total += sum(part.unit_dim(u, specs) for u in units)
            out.setdefault(name, {})[lc] = total
    return out


def timings(device: torch.device, n: int, runs: int, epochs: int,
            reps: list[str] | None = None) -> tuple[list[str], float, float]:
    """Per-epoch training time of each of the 18 cells (or those of ``reps``) at ``n`` LoRAs, ``runs``
    stacked runs."""
    rows, per_epoch_total = [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for name, by_lc in dims().items():
        if reps is not None and name not in reps:
            continue
        for lc, dim in by_lc.items():
            data = synthetic(n, dim, CLASSES, 7, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            results = trainer.train_runs(data, params(max_epochs=epochs, patience=epochs),
                                         list(range(42, 42 + runs)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_epoch = (time.perf_counter() - started) / epochs
            per_epoch_total += per_epoch
            rows.append(f"| {lc} | {name} | {dim:,} | {per_epoch:.2f} s | {mean_acc(results):.3f} |")
            print(f"  {lc:<12} {name:<15} dim {dim:>6}: {per_epoch:.2f} s/epoch ({runs} runs)", flush=True)
            del data
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return rows, per_epoch_total, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (what the tests run)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per cell")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.smoke:
        device, n, runs, check_n, epochs = torch.device("cpu"), 300, 2, 200, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU dry run")
        device, n, runs, check_n, epochs = torch.device("cuda"), N_50K, RUNS, 20_000, args.epochs
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"GPU check on {name} (torch {torch.__version__})", flush=True)
    rep = Report()
    check_stacked(rep, device, check_n, 4 if args.smoke else 10)
    check_amp(rep, device, check_n, 10)
    check_features(rep, device, 256)
    check_oom_halving(rep, device)
    rows, per_epoch, peak = timings(device, n, runs, 1 if args.smoke else epochs,
                                    ["simple_stats"] if args.smoke else None)
    typical, worst = 60, 300  # epochs per run: a typical early stop, and the cap
    lines = [
        f"{name}, torch {torch.__version__}, {'smoke run on CPU at toy sizes' if args.smoke else 'full check'}; "
        f"whole script {time.perf_counter() - started:.0f} s.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *rep.lines,
        "",
        f"Training on synthetic features: {n:,} LoRAs (70/10/20 split), {CLASSES} classes, {runs} runs stacked "
        f"per cell, MLP 3 x 512, batch 64, {1 if args.smoke else epochs} timed epoch(s) per cell.",
        "",
        "| layer config | representation | features | per epoch (all runs) | test acc |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Per epoch, {'the whole 2 x 9 grid' if not args.smoke else 'these cells'}: {per_epoch:.1f} s. "
        f"Projected full grid ({runs} runs per cell): "
        f"{per_epoch * typical / 60:.0f} min at {typical} epochs per run (a typical early stop), "
        f"{per_epoch * worst / 60:.0f} min at the {worst}-epoch cap. GPU memory peak: "
        + (f"{peak:.2f} GiB." if peak == peak else "n/a (CPU)."),
    ]
    print("\n".join(lines))
    if not args.no_write:
        publish("gpu", "GPU check (scripts/gpu_check.py)", lines,
                "python scripts/gpu_check.py" + (" --smoke" if args.smoke else ""))
    print(json.dumps({"failed": rep.failed}))
    raise SystemExit(1 if rep.failed else 0)


if __name__ == "__main__":
    main()
