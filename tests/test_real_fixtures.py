"""LoRAs saved by the real libraries (scripts/make_fixtures.py: diffusers, peft, datasets) load identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ablation_cli.data.sources import resolve

FIXTURES = Path(__file__).parent / "fixtures" / "real"
LAYOUTS = {"diffusers": ("folder:diffusers", "diffusers_old"), "diffusers_new": ("folder:diffusers", "diffusers"),
           "kohya": ("folder:flat", "kohya"), "peft": ("folder:peft", "peft"), "hf_dataset": ("hf", "diffusers")}


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_real_library_files_load_to_identical_tables(layout, reference):
    source = resolve(str(FIXTURES / layout), {})
    info = source.describe()
    kind, style = LAYOUTS[layout]
    assert (info.kind, info.details["key_style"]) == (kind, style)
    expected_layers = sorted({k.split("/", 1)[1] for k in reference})
    assert list(info.layers) == expected_layers and len(expected_layers) == 128
    assert sum(".attn1." in name for name in info.layers) == 64
    table = source.load()
    assert table.label_names == ("airplane", "bird", "cat")
    assert np.bincount(table.labels).tolist() == [2, 2, 2]
    for i in range(6):
        for layer in table.layers:
            np.testing.assert_array_equal(table.weights[layer][i], reference[f"lora-{i:02d}/{layer}"])
    if layout == "kohya":
        assert {float(a[0]) for a in table.alphas.values()} == {1.0}
