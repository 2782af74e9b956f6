"""The folder reader's caches of parsed headers: hundreds of files, each with its own header (its own
``__metadata__``) and dtype, read back value for value however often the plan cache is cleared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ablation_cli.data import safetensors_reader
from ablation_cli.data.folders import FolderSource

MODULES = [f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn{a}.to_{t}"
           for b in (0, 1) for a in (1, 2) for t in ("q", "v")]  # canonical; kohya spells them with '_'
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FILES = 300  # several times the plan cache's 64 headers


def _write(root: Path, count: int) -> dict[str, tuple[dict[str, np.ndarray], dict[str, float]]]:
    """``count`` flat kohya files (rank 2, tiny matrices) in turn F32, F16, BF16, each with its own metadata;
    the float32 values each holds (what its dtype keeps of them), and its alphas, by sample id."""
    rng = np.random.default_rng(0)
    root.mkdir()
    expected = {}
    lines = ["file,label"]
    for i in range(count):
        dtype = DTYPES[i % len(DTYPES)]
        tensors, values, alphas = {}, {}, {}
        for m, module in enumerate(MODULES):
            for factor, shape in (("down", (2, 3 + m % 2)), ("up", (3 + m % 2, 2))):
                tensor = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
                tensors[f"lora_unet_{module.replace('.', '_')}.lora_{factor}.weight"] = tensor
                values[f"{module}.{factor}"] = tensor.float().numpy()
            alpha = torch.tensor(float(1 + i % 7), dtype=dtype)
            tensors[f"lora_unet_{module.replace('.', '_')}.alpha"] = alpha
            alphas[module] = float(alpha)
        sid = f"lora{i:04d}"
        save_file(tensors, str(root / f"{sid}.safetensors"),
                  metadata={"ss_output_name": sid, "ss_seed": str(1000 + i), "dtype": str(dtype)})
        lines.append(f"{sid}.safetensors,{['cat', 'dog'][i % 2]}")
        expected[sid] = (values, alphas)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return expected


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("reader") / "loras"
    return root, _write(root, FILES)


@pytest.mark.parametrize("chunk_bytes", [None, 4096], ids=["whole", "chunks"])
def test_every_file_of_hundreds_with_their_own_headers_and_dtypes_reads_back_exactly(written, chunk_bytes):
    root, expected = written
    safetensors_reader._PLANS.clear()
    source = FolderSource(root)
    stream = source.stream(chunk_bytes)
    chunks = list(stream)
    table = stream.table()
    assert table.num_samples == FILES and table.positions is None
    assert sorted(table.layers) == sorted(f"{m}.{f}" for m in MODULES for f in ("down", "up"))
    for layer in table.layers:
        got = np.concatenate([c.weights[layer] for c in chunks])
        want = np.stack([expected[sid][0][layer] for sid in table.sample_ids])
        mismatched = [table.sample_ids[i] for i in np.flatnonzero((got != want).reshape(FILES, -1).any(axis=1))]
        assert not mismatched, f"{layer}: {len(mismatched)} files read wrongly, e.g. {mismatched[:3]}"
    for module in MODULES:
        got_alpha = np.concatenate([c.alphas[module] for c in chunks])
        np.testing.assert_array_equal(got_alpha, [expected[sid][1][module] for sid in table.sample_ids])
