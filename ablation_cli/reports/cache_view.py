"""`ablate cache ls` and `ablate cache prune` as text."""

from __future__ import annotations

from pathlib import Path

from ablation_cli.features.cache import CacheEntry, human_age, human_bytes


def format_cache_ls(entries: list[CacheEntry], root: Path) -> str:
    if not entries:
        return f"The feature cache {root} is empty."
    lines = [f"{'DATASET':<20} {'REPRESENTATION':<16} {'VER':>3} {'SHAPE':>16} {'SIZE':>9} {'AGE':>5}  KEY"]
    for e in entries:
        shape = "x".join(map(str, e.shape))
        lines.append(f"{e.dataset[:20]:<20} {e.representation:<16} {e.version:>3} {shape:>16} "
                     f"{human_bytes(e.bytes):>9} {human_age(e.age_s):>5}  {e.dataset_key}")
    lines.append(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))} in {root}")
    return "\n".join(lines)


def format_prune_plan(chosen: list[CacheEntry], leftovers: list[Path]) -> str:
    lines = [f"would remove {e.dataset} {e.representation} v{e.version} ({human_bytes(e.bytes)})" for e in chosen]
    lines += [f"would remove leftover {path}" for path in leftovers]
    lines.append(f"Would remove {len(chosen)} entries and {len(leftovers)} leftovers.")
    return "\n".join(lines)


def format_pruned(chosen: list[CacheEntry], kept: list[CacheEntry], leftovers: list[Path], freed: int) -> str:
    lines = [f"kept {e.npy.name} of {e.dataset}: a running process is using it" for e in kept]
    lines.append(f"Removed {len(chosen) - len(kept)} entries and {len(leftovers)} leftovers, "
                 f"{human_bytes(freed)} freed.")
    return "\n".join(lines)
