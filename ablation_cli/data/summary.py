"""``ablate inspect``: what a dataset holds and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ablation_cli.data.layers import count_group
from ablation_cli.data.table import STREAM_BYTES, DatasetSource
from ablation_cli.errors import DataError


def summarize(source: DatasetSource) -> dict[str, Any]:
    """Describe (cheap) and load (full check); a load failure becomes a problem, not an exception."""
    info = source.describe()
    summary: dict[str, Any] = {
        "name": info.name,
        "layout": info.details.get("layout", info.kind),
        "key_style": info.details.get("key_style", "canonical"),
        "fingerprint": info.fingerprint,
        "num_loras": info.num_samples,
        "classes": {},
        "num_layers": len(info.layers),
        "num_attn1": count_group(info.layers, "attn1"),
        "num_attn2": count_group(info.layers, "attn2"),
        "layers": list(info.layers),
        "shapes": {},
        "ranks": [],
        "dtype": info.details.get("dtype", "float32"),
        "problems": [],
    }
    try:
        stream = source.stream(STREAM_BYTES)  # every row checked, one chunk in memory at a time
        for _ in stream:
            pass
        table = stream.table()
    except DataError as exc:
        summary["problems"].append(str(exc))
        return summary
    counts = Counter(table.labels.tolist())
    summary["num_loras"] = table.num_samples
    summary["classes"] = {name: counts.get(i, 0) for i, name in enumerate(table.label_names)}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for layer, stack in table.weights.items():
        group = f"{'attn1' if '.attn1.' in layer else 'attn2'}.{layer.rsplit('.', 1)[1]}"
        shapes.setdefault(group, set()).add(tuple(stack.shape[1:]))
    summary["shapes"] = {g: [list(s) for s in sorted(v)] for g, v in sorted(shapes.items())}
    summary["ranks"] = sorted({int(s.shape[1]) for name, s in table.weights.items() if name.endswith(".down")})
    small = [name for name, n in summary["classes"].items() if n < 3]
    if small:
        summary["problems"].append(f"class(es) with fewer than 3 LoRAs (too small for a stratified split): "
                                   f"{', '.join(small)}")
    if table.alphas:
        alphas = np.concatenate([a for a in table.alphas.values()])
        summary["alpha"] = sorted({float(a) for a in alphas[np.isfinite(alphas)]})[:10]
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"dataset      {s['name']}  (fingerprint {s['fingerprint']})",
        f"layout       {s['layout']}, keys: {s['key_style']}, dtype {s['dtype']}",
        f"LoRAs        {s['num_loras']}",
        f"classes      {len(s['classes'])}: " + ", ".join(f"{k} ({v})" for k, v in s["classes"].items()),
        f"layers       {s['num_layers']} ({s['num_attn1']} attn1, {s['num_attn2']} attn2)",
        f"ranks        {', '.join(map(str, s['ranks'])) or '-'}",
    ]
    for group, shapes in s["shapes"].items():
        lines.append(f"  {group:<11} " + ", ".join("x".join(map(str, sh)) for sh in shapes))
    if "alpha" in s:
        lines.append(f"alpha        {', '.join(f'{a:g}' for a in s['alpha'])}")
    lines.append("problems     " + ("none" if not s["problems"] else ""))
    lines.extend(f"  - {p}" for p in s["problems"])
    return "\n".join(lines)
