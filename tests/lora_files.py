"""Write a LoraTable to disk in every layout and key spelling, with the real safetensors library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ablation_cli.data.table import LoraTable

STYLES = ("diffusers", "diffusers_old", "kohya", "peft")


def key_for(layer: str, style: str) -> str:
    module, factor = layer.rsplit(".", 1)
    if style == "diffusers":
        return f"unet.{module}.lora_{'A' if factor == 'down' else 'B'}.weight"
    if style == "diffusers_old":
        return f"unet.{module}.lora.{factor}.weight"
    if style == "peft":
        return f"base_model.model.{module}.lora_{'A' if factor == 'down' else 'B'}.weight"
    if style == "kohya":
        return f"lora_unet_{module.replace('.', '_')}.lora_{factor}.weight"
    raise ValueError(style)


def tensors_of(table: LoraTable, i: int, style: str) -> dict[str, np.ndarray]:
    out = {key_for(layer, style): np.ascontiguousarray(table.weights[layer][i]) for layer in table.layers}
    if style == "kohya":
        for layer in table.layers:
            module = layer.rsplit(".", 1)[0]
            out[f"lora_unet_{module.replace('.', '_')}.alpha"] = np.array(1.0, dtype=np.float32)
    return out


def write_dataset(table: LoraTable, root: Path, style: str) -> Path:
    """diffusers/diffusers_old: per-LoRA folders + metadata.json; peft: adapter folders + labels.json;
    kohya: a flat folder + labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    names = table.label_names
    labels = {}
    for i, sid in enumerate(table.sample_ids):
        label = names[table.labels[i]]
        tensors = tensors_of(table, i, style)
        if style in ("diffusers", "diffusers_old"):
            (root / sid).mkdir()
            save_file(tensors, str(root / sid / "pytorch_lora_weights.safetensors"))
            (root / sid / "metadata.json").write_text(json.dumps({"category_label": label, "rank": 1}))
        elif style == "peft":
            (root / sid).mkdir()
            save_file(tensors, str(root / sid / "adapter_model.safetensors"))
            labels[sid] = label
        else:
            save_file(tensors, str(root / f"{sid}.safetensors"))
            labels[f"{sid}.safetensors"] = label
    if style == "peft":
        (root / "labels.json").write_text(json.dumps(labels))
    if style == "kohya":
        (root / "labels.csv").write_text("file,label\n" + "".join(f"{f},{lab}\n" for f, lab in labels.items()))
    return root


def write_hf_dataset(table: LoraTable, root: Path, extra_labels: dict[str, list[str]] | None = None) -> Path:
    """``table`` as a Hugging Face ``save_to_disk`` folder with the real library: one column per LoRA
    tensor (list of lists), ``category_label`` and any ``extra_labels`` columns."""
    import pyarrow as pa
    from datasets import Dataset

    columns = {"category_label": pa.array(np.array(table.label_names)[table.labels].tolist()),
               **{name: pa.array(values) for name, values in (extra_labels or {}).items()}}
    for layer in table.layers:
        stack = table.weights[layer]
        n, rows, width = stack.shape
        inner = pa.ListArray.from_arrays(pa.array(np.arange(n * rows + 1, dtype=np.int32) * width),
                                         pa.array(stack.reshape(-1)))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * rows), inner)
        module, factor = layer.rsplit(".", 1)
        columns[f"unet.{module}.lora.{factor}.weight"] = outer
    Dataset(pa.table(columns)).save_to_disk(str(root))
    return root
