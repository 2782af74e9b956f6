"""Time to load one feature-cache entry the size of ``flat_vec`` at 20k LoRAs: the full sha256 check every
load used to make, against the size-and-sample check loads make now (``ablate cache verify`` keeps the
full one). Each load runs in a fresh process, as a Slurm task or a worker does, alternating the two.

Cold numbers need the page cache dropped before each load (``/proc/sys/vm/drop_caches``, root only);
without it the file is read from memory and the numbers are warm (the script says which).

    python scripts/bench_cache_load.py [--loras 20000] [--width 99648] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.benchlib import publish, run_child  # noqa: E402

LOAD = """
import json, sys, time
from pathlib import Path
import numpy as np
from ablation_cli.durable import read_sealed, sha256_file
from ablation_cli.features.cache import FeatureCache
root, mode = Path(sys.argv[1]), sys.argv[2]
cache = FeatureCache(root)
start = time.perf_counter()
if mode == "full":  # what a load did before: size, the sha256 of every byte, then the map
    meta = read_sealed(root / "k/flat_vec-v1.json")
    npy = root / "k/flat_vec-v1.npy"
    assert npy.stat().st_size == meta["bytes"] and sha256_file(npy) == meta["sha256"]
    arr = np.load(npy, mmap_mode="r", allow_pickle=False)
else:
    arr = cache.load("k", "flat_vec", 1)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "shape": list(arr.shape)}))
"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=99_648, help="features per LoRA (flat_vec: 99,648)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary entry is written")
    args = parser.parse_args()

    import numpy as np

    from ablation_cli.features.cache import FeatureCache

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "features"
        cache = FeatureCache(root)
        arr = cache.spill("k", "flat_vec", 1, (args.loras, args.width))
        for start in range(0, args.loras, 1000):  # random rows, written block by block through the map
            rows = min(1000, args.loras - start)
            arr[start:start + rows] = np.random.default_rng(start).standard_normal((rows, args.width),
                                                                                   dtype=np.float32)
        cache.store("k", "flat_vec", 1, arr, {"dataset": "bench"})
        del arr
        size = (root / "k/flat_vec-v1.npy").stat().st_size
        times: dict[str, list[float]] = {"full": [], "sample": []}
        cold = True
        for _ in range(args.repeat):
            for mode in ("full", "sample"):
                cold = drop_caches() and cold
                times[mode].append(run_child(LOAD, root, mode)["seconds"])
    full, sample = statistics.median(times["full"]), statistics.median(times["sample"])
    lines = [
        f"One entry of {args.loras:,} x {args.width:,} float32 ({size / 1e9:.2f} GB; `flat_vec` at "
        f"{args.loras:,} LoRAs), loaded in a fresh process, median of {args.repeat}, "
        f"{'cold (page cache dropped before each load)' if cold else 'warm (page cache not dropped: no root)'}; "
        f"{cpu_name()}, {Path('/proc/cpuinfo').read_text().count('processor')} cores:",
        "",
        "| check on load | seconds | runs |",
        "|---|---|---|",
        f"| before: size + sha256 of every byte | {full:.2f} | {', '.join(f'{t:.2f}' for t in times['full'])} |",
        f"| now: size + sha256 of 64 sampled 64 KiB blocks | {sample:.3f} | "
        f"{', '.join(f'{t:.3f}' for t in times['sample'])} |",
        "",
        f"Ratio: {full / sample:.0f}x faster per load. Each Slurm task and each worker loads the entries of its "
        "cells, so the saving is per task; `ablate cache verify` still reads every byte, on demand.",
    ]
    publish("cache_load", "Loading a feature-cache entry: sampled check vs full hash", lines,
            "python scripts/bench_cache_load.py")


if __name__ == "__main__":
    main()
