"""LoRAs saved by the real libraries (scripts/make_fixtures.py: diffusers, peft, datasets) load identically."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ablation_cli.data.sources import resolve

COMMITTED = Path(__file__).parent / "fixtures" / "real"
LAYOUTS = {"diffusers": ("folder:diffusers", "diffusers_old"), "diffusers_new": ("folder:diffusers", "diffusers"),
           "kohya": ("folder:flat", "kohya"), "peft": ("folder:peft", "peft"), "hf_dataset": ("hf", "diffusers")}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """A copy of the committed fixtures: `datasets` writes its cache-*.arrow files beside the dataset it
    maps, and nothing a test does may change the committed tree."""
    return Path(shutil.copytree(COMMITTED, tmp_path_factory.mktemp("fixtures") / "real"))


@pytest.fixture(scope="module")
def reference(fixtures) -> dict[str, np.ndarray]:
    with np.load(fixtures / "reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_real_library_files_load_to_identical_tables(layout, reference, fixtures):
    source = resolve(str(fixtures / layout), {})
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


def test_inspect_json_reports_the_dataset_and_its_problems(tmp_path, fixtures):
    import json

    from tests.conftest import ablate_in_process as ablate

    result = ablate("inspect", str(fixtures / "kohya"), "--json", cwd=tmp_path)
    assert result.returncode == 2  # 2 LoRAs per class: too small for a stratified split
    summary = json.loads(result.stdout)
    assert summary["layout"] == "flat" and summary["key_style"] == "kohya" and summary["num_loras"] == 6
    assert summary["classes"] == {"airplane": 2, "bird": 2, "cat": 2}
    assert (summary["num_layers"], summary["num_attn1"], summary["num_attn2"]) == (128, 64, 64)
    assert summary["layers"][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.down"
    assert summary["ranks"] == [1] and summary["alpha"] == [1.0]
    assert summary["shapes"]["attn2.down"] == [[1, 8], [1, 12], [1, 16], [1, 32]]
    assert summary["problems"] == ["class(es) with fewer than 3 LoRAs (too small for a stratified split): "
                                   "airplane, bird, cat"]


def test_inspect_plain_and_ready(tmp_path):
    from ablation_cli.data.demo import DemoSource
    from tests.conftest import ablate_in_process as ablate
    from tests.lora_files import write_dataset

    table = DemoSource(name="ok", num_samples=30, num_classes=3, seed=1).load()
    root = write_dataset(table, tmp_path / "loras", "peft")
    result = ablate("inspect", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "layout       peft, keys: peft, dtype float32" in result.stdout
    assert "classes      3: airplane (10), bird (10), car (10)" in result.stdout
    assert "problems     none" in result.stdout
    missing = ablate("inspect", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "error: dataset folder not found" in missing.stderr


def test_hf_streaming_equals_column_reads_and_nan_rows_are_caught(tmp_path, reference, fixtures):
    import datasets

    from ablation_cli.data.hf import HFDatasetSource
    from ablation_cli.errors import DataError

    source = HFDatasetSource(fixtures / "hf_dataset")
    assert source._streamable()
    stream = source.stream(1)  # one row per chunk
    chunks = list(stream)
    assert [c.num_rows for c in chunks] == [1] * 6
    labels, finite, shapes = [], [], {}
    (by_column,) = source._by_column(labels, finite, shapes)
    table = stream.table()
    assert finite[0].all() and table.num_samples == len(labels) == 6
    assert sorted(set(labels)) == list(range(len(table.label_names)))  # int labels, named in sorted order
    for layer, stack in by_column.weights.items():
        np.testing.assert_array_equal(np.concatenate([c.weights[layer] for c in chunks]), stack)

    ds = datasets.load_from_disk(str(fixtures / "hf_dataset"))
    col = next(c for c in ds.column_names if c.endswith("attn2.to_v.lora_B.weight"))

    def poison(row, i):
        if i == 4:
            row[col] = [[float("nan"), *list(r[1:])] for r in row[col]]
        return row

    ds.map(poison, with_indices=True).save_to_disk(str(tmp_path / "nan"))
    with pytest.raises(DataError, match=r"1 LoRAs \(rows 4\) contain NaN or Inf weights"):
        HFDatasetSource(tmp_path / "nan").load()
    assert HFDatasetSource(tmp_path / "nan", drop_nonfinite=True).load().num_samples == 5


def test_hf_indices_mapping_is_respected(tmp_path, fixtures):
    """A selected, shuffled dataset (an indices mapping over its Arrow table) loads in its own row order."""
    datasets = pytest.importorskip("datasets")
    from ablation_cli.data.hf import HFDatasetSource

    base = datasets.load_from_disk(str(fixtures / "hf_dataset"))
    mapped = base.select([4, 1, 3, 5], keep_in_memory=True).shuffle(seed=1, keep_in_memory=True)
    assert mapped._indices is not None  # the case: rows are a mapping, not the table's order
    source = HFDatasetSource(fixtures / "hf_dataset", name="mapped")
    source.__dict__["dataset"] = mapped  # as `load_dataset` / `load_from_disk` would hand it over
    table = source.load()
    assert table.num_samples == 4
    for layer, col in list(source._columns.items())[:8]:
        for i in range(4):
            np.testing.assert_array_equal(table.weights[layer][i], np.asarray(mapped[i][col], dtype=np.float32))
    row_names = [mapped[i]["category_name"] if isinstance(mapped[i]["category_label"], int)
                 else mapped[i]["category_label"] for i in range(4)]
    assert [table.label_names[k] for k in table.labels] == row_names


def test_hf_dropped_rows_keep_their_stored_positions(tmp_path, fixtures):
    datasets = pytest.importorskip("datasets")
    from ablation_cli.data.hf import HFDatasetSource
    from ablation_cli.training.split import original_split

    base = datasets.load_from_disk(str(fixtures / "hf_dataset"))
    big = datasets.concatenate_datasets([base, base, base])  # 18 rows: more than the original's tiny-data rule
    col = next(c for c in big.column_names if c.endswith("attn2.to_v.lora_B.weight"))
    poisoned = {4, 13}

    def poison(row, i):
        if i in poisoned:
            row[col] = [[float("nan"), *list(r[1:])] for r in row[col]]
        return row

    big.map(poison, with_indices=True, keep_in_memory=True).save_to_disk(str(tmp_path / "big"))
    table = HFDatasetSource(tmp_path / "big", drop_nonfinite=True).load()
    positions, stored = table.stored()
    assert stored == 18 and positions.tolist() == [i for i in range(18) if i not in poisoned]
    split = original_split(positions, stored)
    full = original_split(np.arange(18), 18)
    assert len(split.train) + len(split.val) + len(split.test) == 16
    assert len(full.train) + len(full.val) + len(full.test) == 18
