"""``ablate inspect``: what a dataset holds and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ablation_cli.data.layers import count_group
from ablation_cli.data.table import STREAM_BYTES, DatasetSource
from ablation_cli.errors import DataError


@dataclass
class DatasetSummary:
    """What ``ablate inspect`` reports of a dataset; :meth:`to_json` is its ``--json`` object."""

    name: str
    layout: str
    key_style: str
    fingerprint: str
    num_loras: int | None
    num_layers: int
    num_attn1: int
    num_attn2: int
    layers: list[str]
    dtype: str
    classes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    alpha: list[float] | None = None  # the distinct alphas (ten at most) of a dataset that stores them

    def to_json(self) -> dict[str, object]:
        keys = ("name", "layout", "key_style", "fingerprint", "num_loras", "classes", "num_layers", "num_attn1",
                "num_attn2", "layers", "shapes", "ranks", "dtype", "problems")
        out = {key: getattr(self, key) for key in keys}
        return out if self.alpha is None else {**out, "alpha": self.alpha}


def summarize(source: DatasetSource) -> dict[str, object]:
    """Describe (cheap) and load (full check); a load failure becomes a problem, not an exception."""
    return inspect(source).to_json()


def inspect(source: DatasetSource) -> DatasetSummary:
    """:func:`summarize`, as a typed summary."""
    info = source.describe()
    summary = DatasetSummary(
        info.name, info.details.get("layout", info.kind), info.details.get("key_style", "canonical"),
        info.fingerprint, info.num_samples, len(info.layers), count_group(info.layers, "attn1"),
        count_group(info.layers, "attn2"), list(info.layers), info.details.get("dtype", "float32"))
    try:
        stream = source.stream(STREAM_BYTES)  # every row checked, one chunk in memory at a time
        for _ in stream:
            pass
        table = stream.table()
    except DataError as exc:
        summary.problems.append(str(exc))
        return summary
    counts = Counter(table.labels.tolist())
    summary.num_loras = table.num_samples
    summary.classes = {name: counts.get(i, 0) for i, name in enumerate(table.label_names)}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for layer, stack in table.weights.items():
        group = f"{'attn1' if '.attn1.' in layer else 'attn2'}.{layer.rsplit('.', 1)[1]}"
        shapes.setdefault(group, set()).add(tuple(stack.shape[1:]))
    summary.shapes = {g: [list(s) for s in sorted(v)] for g, v in sorted(shapes.items())}
    summary.ranks = sorted({int(s.shape[1]) for name, s in table.weights.items() if name.endswith(".down")})
    small = [name for name, n in summary.classes.items() if n < 3]
    if small:
        summary.problems.append(f"class(es) with fewer than 3 LoRAs (too small for a stratified split): "
                                f"{', '.join(small)}")
    if table.alphas:
        alphas = np.concatenate([a for a in table.alphas.values()])
        summary.alpha = sorted({float(a) for a in alphas[np.isfinite(alphas)]})[:10]
    return summary


def format_summary(s: Mapping[str, Any]) -> str:
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
