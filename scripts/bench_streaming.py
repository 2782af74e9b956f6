"""Peak memory of `ablate features` and `ablate run` as the dataset grows: streamed, it follows the features.

Generates Hugging Face `datasets` folders of N SD1.5-shape rank-1 LoRAs in the nested-list Arrow schema
the researchers' datasets use (one ``list<list<float32>>`` column per tensor, ~0.56 MB per LoRA on disk),
written in bulk with pyarrow, record batch by record batch. Then, each in a fresh process with a fresh
feature cache, measures wall time and peak RSS (the child's ``ru_maxrss``, from ``wait4``) of

  - ``ablate features`` (all_layers, two representations), and
  - ``ablate run`` (a grid of 2 cells: all_layers x the same two representations, 1 run of at most
    MAX_EPOCHS epochs),

for this checkout and, as the baseline in the same run, for an earlier ablate (``--baseline-commit``,
checked out in a git worktree; by default the ablate before streaming, which loaded the whole dataset
before the feature pass). Growth is measured between the smallest and the largest N and compared with the growth of the
feature outputs alone (N x columns x 4 bytes); 50k and 100k are projected from the measured slope.

    python scripts/bench_streaming.py [--sizes 2000 10000 20000] [--baseline-sizes 2000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ablation_cli.data.layers import sd15_layers  # noqa: E402
from scripts.benchlib import publish  # noqa: E402

BASELINE_COMMIT = "18967e4"  # the last ablate that loaded the whole dataset before computing features
REPS = ("stats", "spectral")
COLUMNS_PER_LAYER = {"stats": 7, "spectral": 32}
MAX_EPOCHS = 20  # `ablate run` trains a little: the measurement is memory, not the protocol
BATCH_ROWS = 1000  # rows per Arrow record batch (the `datasets` writer's default)


def write_hf(root: Path, n: int, seed: int = 0) -> None:
    """A `save_to_disk` folder of n LoRAs, written batch by batch (memory: one batch)."""
    import pyarrow as pa
    from datasets import Dataset, Features, Sequence, Value

    layers = sd15_layers()
    columns = {f"unet.{s.name.rsplit('.', 1)[0]}.lora.{s.name.rsplit('.', 1)[1]}.weight": s for s in layers}
    features = Features({"category_label": Value("int64"), **{c: Sequence(Sequence(Value("float32")))
                                                              for c in columns}})
    rng = np.random.default_rng(seed)
    one = {"category_label": [0], **{c: [rng.standard_normal(s.shape, dtype=np.float32).tolist()]
                                     for c, s in columns.items()}}
    Dataset.from_dict(one, features=features).save_to_disk(str(root))  # the metadata files `datasets` reads
    (arrow,) = root.glob("data-*.arrow")
    with pa.ipc.open_stream(pa.memory_map(str(arrow))) as reader:
        schema = reader.schema
    tmp = arrow.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, n, BATCH_ROWS):
            rows = min(BATCH_ROWS, n - lo)
            arrays = [pa.array(np.arange(lo, lo + rows) % 10, pa.int64())]
            for s in columns.values():
                out_dim, in_dim = s.shape
                values = pa.array(rng.standard_normal(rows * out_dim * in_dim, dtype=np.float32))
                inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * out_dim + 1, dtype=np.int32) * in_dim),
                                                 values)
                arrays.append(pa.ListArray.from_arrays(pa.array(np.arange(0, rows + 1, dtype=np.int32) * out_dim),
                                                       inner))
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    os.replace(tmp, arrow)
    state = json.loads((root / "state.json").read_text())
    state["_fingerprint"] = f"bench-streaming-{n}-{seed}"
    (root / "state.json").write_text(json.dumps(state))


def measure(source: Path | None, args: list[str], cwd: Path) -> dict[str, float]:
    """Wall time and peak RSS (MiB) of one `ablate` command in a fresh process (``source``: an older checkout)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ablation_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ablate {' '.join(args)} failed:\n{err[-3000:]}")
    return {"seconds": elapsed, "peak_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 20000])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[2000, 10000])
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ablate-bench-streaming")
    parser.add_argument("--rows-from", type=Path, help="publish the rows printed by an earlier run (its log)")
    args = parser.parse_args()
    if args.rows_from is not None:
        import ast

        rows = [ast.literal_eval(line) for line in args.rows_from.read_text().splitlines() if line.startswith("{")]
        publish("streaming", "Memory and speed as the dataset grows (scripts/bench_streaming.py)",
                report(rows, args.sizes, 128 * sum(COLUMNS_PER_LAYER.values()), args.baseline_commit),
                "python scripts/bench_streaming.py "
                f"--sizes {' '.join(map(str, args.sizes))} --baseline-sizes {' '.join(map(str, args.baseline_sizes))} "
            f"--baseline-commit {args.baseline_commit}")
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    old = args.workdir / "baseline"
    if args.baseline_sizes:
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline_commit], cwd=REPO, check=True,
                       capture_output=True)
    columns = 128 * sum(COLUMNS_PER_LAYER.values())
    rows = []
    try:
        for n in args.sizes:
            data = args.workdir / f"hf{n}"
            started = time.perf_counter()
            write_hf(data, n)
            size_gb = sum(p.stat().st_size for p in data.iterdir()) / 1e9
            print(f"n={n}: wrote {size_gb:.1f} GB in {time.perf_counter() - started:.0f}s", flush=True)
            for who, source in (("ablate", None), ("baseline", old)):
                if source is not None and n not in args.baseline_sizes:
                    continue
                tag = f"{n}-{'new' if source is None else 'old'}"
                for command in ("features", "run"):
                    cache = args.workdir / f"cache-{tag}-{command}"  # fresh: every feature computed
                    common = ["--dataset", str(data), "--reps", ",".join(REPS), "--cache-dir", str(cache)]
                    if command == "features":
                        argv = ["features", *common, "--out", str(args.workdir / f"out-{tag}")]
                    else:
                        argv = ["run", *common, "--layer-configs", "all_layers", "--num-runs", "1",
                                "--max-epochs", str(MAX_EPOCHS), "-o", str(args.workdir / f"results-{tag}")]
                    m = measure(source, argv, args.workdir)
                    rows.append({"n": n, "who": who, "command": command, **m,
                                 "outputs_mib": n * columns * 4 / 2**20, "disk_gb": size_gb})
                    print(rows[-1], flush=True)
                    shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(data)
    finally:
        if args.baseline_sizes:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
        shutil.rmtree(args.workdir, ignore_errors=True)
    publish("streaming", "Memory and speed as the dataset grows (scripts/bench_streaming.py)",
            report(rows, args.sizes, columns, args.baseline_commit), "python scripts/bench_streaming.py " +
            f"--sizes {' '.join(map(str, args.sizes))} --baseline-sizes {' '.join(map(str, args.baseline_sizes))} "
            f"--baseline-commit {args.baseline_commit}")


def report(rows: list[dict[str, float]], sizes: list[int], columns: int, baseline: str) -> list[str]:
    lines = [f"Hugging Face `datasets` folders of SD1.5-shape rank-1 LoRAs (nested-list Arrow schema, one "
             f"`list<list<float32>>` column per tensor), {', '.join(REPS)} on all_layers ({columns} feature "
             "columns), a fresh process and a fresh feature cache per command, page cache warm. Peak RSS is "
             "the process's maximum resident set (`ru_maxrss`). `baseline`: the same command on "
             f"the ablate of commit {baseline}.", "",
             "| LoRAs | on disk | command | ablate | wall time | per LoRA | peak RSS (MiB) | feature outputs (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:.0f} | {r['disk_gb']:.1f} GB | `ablate {r['command']}` | {r['who']} | "
                     f"{r['seconds']:.1f} s | {1000 * r['seconds'] / r['n']:.2f} ms | {r['peak_mib']:.0f} | "
                     f"{r['outputs_mib']:.0f} |")
    lo, hi = min(sizes), max(sizes)
    lines.append("")
    for command in ("features", "run"):
        mine = {r["n"]: r for r in rows if r["who"] == "ablate" and r["command"] == command}
        if lo == hi or lo not in mine or hi not in mine:
            continue
        growth = mine[hi]["peak_mib"] - mine[lo]["peak_mib"]
        outputs = mine[hi]["outputs_mib"] - mine[lo]["outputs_mib"]
        slope = growth / (hi - lo)  # MiB per LoRA
        project = {m: mine[hi]["peak_mib"] + slope * (m - hi) for m in (50_000, 100_000)}
        lines.append(f"- `ablate {command}`: peak RSS grows {growth:.0f} MiB from {lo} to {hi} LoRAs, "
                     f"{growth / outputs:.2f}x the growth of the feature outputs alone ({outputs:.0f} MiB; "
                     f"target: within 1.3x). Projected peak: {project[50_000] / 1024:.1f} GiB at 50k, "
                     f"{project[100_000] / 1024:.1f} GiB at 100k LoRAs.")
        if command == "run":
            lines.append("  Training holds no copy of a cell's features: on the CPU its batches are gathered from the "
                         "cached arrays and standardised as they are read.")
        base = {r["n"]: r for r in rows if r["who"] != "ablate" and r["command"] == command}
        for n in sorted(base):
            if n in mine:
                lines.append(f"  At {n} LoRAs: {mine[n]['seconds'] / base[n]['seconds']:.2f}x the wall time and "
                             f"{mine[n]['peak_mib'] / base[n]['peak_mib']:.2f}x the peak RSS of the baseline.")
    return lines


if __name__ == "__main__":
    main()
