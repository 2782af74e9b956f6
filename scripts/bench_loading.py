"""Load throughput (LoRAs/s) and peak RSS of ablate's readers vs reading the same bytes raw.

Writes N synthetic rank-1 LoRAs at the real SD1.5 shapes (128 matrices, 99,648 floats, ~390 KiB
each) as a flat folder of safetensors files (kohya keys) and as a Hugging Face `datasets` folder,
then, each in a fresh process with a warm page cache:
  - baseline: read every byte of the same files (thread pool, no parsing);
  - ablate:   the real source's load() into (N, out, in) float32 arrays.
Peak RSS growth (peak minus the RSS after imports) is compared with the size of the output arrays.

    python scripts/bench_loading.py [--sizes 2000 8000] [--workdir /tmp/ablate-bench]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ablation_cli.data.layers import sd15_layers  # noqa: E402
from scripts.benchlib import publish, run_child  # noqa: E402

CHILD = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
mode, path = sys.argv[1], Path(sys.argv[2])
from ablation_cli.data.sources import resolve
import numpy, safetensors.numpy, datasets  # imports are not part of the measurement
def status_mb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM): ru_maxrss survives exec
    fh.write("5")
base = status_mb("VmRSS:")
start = time.perf_counter()
if mode == "raw":
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".arrow")]
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(lambda p: len(p.read_bytes()), files))
    n = None
else:
    table = resolve(str(path), {}).load()
    total = sum(a.nbytes for a in table.weights.values())
    n = table.num_samples
elapsed = time.perf_counter() - start
peak = status_mb("VmHWM:")
print(json.dumps({"seconds": elapsed, "bytes": total, "n": n, "rss_growth_mb": peak - base}))
"""


def write_folder(root: Path, weights: dict[str, np.ndarray], labels: np.ndarray) -> None:
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    names = list(weights)
    keys = [f"lora_unet_{n.rsplit('.', 1)[0].replace('.', '_')}.lora_{n.rsplit('.', 1)[1]}.weight" for n in names]
    rows = []
    for i in range(len(labels)):
        save_file({k: weights[n][i] for k, n in zip(keys, names)}, str(root / f"lora-{i:06d}.safetensors"))
        rows.append(f"lora-{i:06d}.safetensors,c{labels[i]}")
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")


def write_hf(root: Path, weights: dict[str, np.ndarray], labels: np.ndarray) -> None:
    import pyarrow as pa
    from datasets import Dataset

    columns = {"category_label": pa.array(labels)}
    for name, stack in weights.items():
        _, r, c = stack.shape
        inner = pa.FixedSizeListArray.from_arrays(pa.array(stack.reshape(-1)), c)
        columns[f"unet.{name.rsplit('.', 1)[0]}.lora.{name.rsplit('.', 1)[1]}.weight"] = (
            pa.FixedSizeListArray.from_arrays(inner, r))
    Dataset(pa.table(columns)).save_to_disk(str(root))


def drop_caches() -> bool:
    """Empty the page cache (needs root), so that `cold` really reads from disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ablate-bench-loading"))
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        shutil.rmtree(args.workdir, ignore_errors=True)
        rng = np.random.default_rng(0)
        weights = {s.name: rng.standard_normal((n, *s.shape), dtype=np.float32) for s in sd15_layers()}
        labels = np.arange(n) % 10
        output_mb = sum(w.nbytes for w in weights.values()) / 2**20
        t = time.perf_counter()
        write_folder(args.workdir / "folder", weights, labels)
        write_hf(args.workdir / "hf", weights, labels)
        del weights
        print(f"n={n}: wrote both layouts in {time.perf_counter() - t:.0f}s", flush=True)
        for layout in ("folder", "hf"):
            path = args.workdir / layout
            for cache in ("cold", "warm"):
                if cache == "cold" and not drop_caches():
                    continue
                raw = run_child(CHILD, "raw", path)
                if cache == "cold":
                    drop_caches()
                loaded = run_child(CHILD, "load", path)
                assert loaded["n"] == n
                rows.append({
                    "n": n, "layout": layout, "cache": cache, "output_mb": output_mb,
                    "raw_per_s": n / raw["seconds"], "load_per_s": n / loaded["seconds"],
                    "ratio": loaded["seconds"] / raw["seconds"], "rss_mb": loaded["rss_growth_mb"],
                })
                print(rows[-1], flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    lines = ["Synthetic rank-1 LoRAs at the real SD1.5 shapes (128 matrices, 99,648 float32 each), a fresh "
             "process per measurement. `raw` reads every byte of the same files with 8 threads and parses "
             "nothing. `cold`: the page cache is emptied before each measurement (reads come from disk); "
             "`warm`: the files are already in the page cache (what remains is ablate's own CPU cost).", "",
             "| LoRAs | layout | cache | raw read (LoRAs/s) | ablate load (LoRAs/s) | load / raw time | "
             "peak RSS growth (MiB) | output arrays (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['layout']} | {r['cache']} | {r['raw_per_s']:.0f} | {r['load_per_s']:.0f} | "
                     f"{r['ratio']:.2f}x | {r['rss_mb']:.0f} | {r['output_mb']:.0f} |")
    publish("loading", "Loading LoRA datasets", lines, "python scripts/bench_loading.py")


if __name__ == "__main__":
    main()
