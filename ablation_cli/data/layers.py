"""Canonical layer names for SD1.5 UNet LoRAs.

A *layer* is one LoRA factor matrix. Its canonical name is the diffusers module
path without any prefix plus the factor: ``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.down`` (shape (r, in)) or ``...to_q.up``
(shape (out, r)). Layer configs select layers by glob patterns over these names,
so they select the same matrices whichever tool saved the file.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TEXT_EMBED_DIM = 768  # CLIP ViT-L/14 hidden size read by attn2.to_k / to_v

# (module prefix, channel width) for the 16 transformer blocks of the SD1.5 UNet.
_BLOCKS: tuple[tuple[str, int], ...] = (
    *((f"down_blocks.{i}.attentions.{j}", c) for i, c in enumerate((320, 640, 1280)) for j in range(2)),
    ("mid_block.attentions.0", 1280),
    *((f"up_blocks.{i}.attentions.{j}", c) for i, c in zip((1, 2, 3), (1280, 640, 320)) for j in range(3)),
)


@dataclass(frozen=True)
class LayerSpec:
    name: str  # canonical name
    shape: tuple[int, int]  # (out, in) of the factor matrix


def sd15_layers(rank: int = 1, targets: Sequence[str] = ("to_q", "to_v")) -> list[LayerSpec]:
    """All LoRA factor matrices of an SD1.5 UNet LoRA on ``targets``, sorted by canonical name."""
    specs: list[LayerSpec] = []
    for prefix, width in _BLOCKS:
        for attn in ("attn1", "attn2"):
            for target in targets:
                module = f"{prefix}.transformer_blocks.0.{attn}.{target}"
                reads_text = attn == "attn2" and target in ("to_k", "to_v")
                in_dim = TEXT_EMBED_DIM if reads_text else width
                specs.append(LayerSpec(f"{module}.down", (rank, in_dim)))
                specs.append(LayerSpec(f"{module}.up", (width, rank)))
    return sorted(specs, key=lambda s: s.name)


def select_layers(layers: Iterable[str], include: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Layers matching any include pattern and no exclude pattern, in sorted order."""
    chosen = [
        name
        for name in layers
        if any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    return sorted(chosen)


def count_group(layers: Iterable[str], attention: str) -> int:
    """Number of layers under ``attention`` (``attn1`` or ``attn2``)."""
    return sum(1 for name in layers if f".{attention}." in name)


# A canonical layer name, split into the levels a layer sweep groups by (data/keys.py writes these names).
_LEVELS = re.compile(r"^(?P<block>(?:down|up)_blocks\.\d+|mid_block)\.attentions\.(?P<a>\d+)"
                     r"\.transformer_blocks\.(?P<t>\d+)\.(?P<attn>attn[12])\.(?P<target>to_q|to_k|to_v|to_out\.0)"
                     r"\.(?P<factor>down|up)$")
GROUP_LEVELS = ("block", "transformer", "attention", "module", "factor")


def group_name(layer: str, by: str) -> str:
    """The short name of the group of ``layer`` at level ``by`` (one of :data:`GROUP_LEVELS`):
    ``down0``, ``mid``, ``up1_a2_t0``, ``up1_a2_t0_attn2``, ``up1_a2_t0_attn2_v``, ``up1_a2_t0_attn2_v_up``.
    ValueError for a name that is not a U-Net attention layer."""
    m = _LEVELS.match(layer)
    if m is None:
        raise ValueError(f"layer {layer} is not a U-Net attention layer (down_blocks.N / mid_block / up_blocks.N "
                         "... .attentions.J.transformer_blocks.T.attnK.to_X.down|up)")
    block = m["block"].replace("_blocks.", "").replace("_block", "")
    parts = [block, f"a{m['a']}_t{m['t']}", m["attn"], m["target"].removeprefix("to_").replace(".0", ""), m["factor"]]
    return "_".join(parts[: GROUP_LEVELS.index(by) + 1])


def layer_groups(layers: Iterable[str], by: str) -> dict[str, list[str]]:
    """The layers grouped at level ``by``, groups in U-Net order (down, mid, up), layers sorted."""
    groups: dict[str, list[str]] = {}
    for layer in sorted(layers):
        groups.setdefault(group_name(layer, by), []).append(layer)
    return groups
