"""The data streamed chunk of rows by chunk: the same rows, checks and features as read whole, and a bad
dataset stores nothing; flat_vec written through a memory map into its cache entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ablation_cli.config import SplitConfig
from ablation_cli.data.demo import DemoSource
from ablation_cli.data.folders import FolderSource
from ablation_cli.data.hf import HFDatasetSource
from ablation_cli.data.layers import sd15_layers
from ablation_cli.data.table import collect
from ablation_cli.errors import DataError
from ablation_cli.features import stream_pass
from ablation_cli.features.cache import FeatureCache
from ablation_cli.workspace import Workspace
from tests.lora_files import tensors_of, write_dataset

ROW_BYTES = 4 * sum(int(np.prod(s.shape)) for s in sd15_layers())  # one LoRA's weights (SD1.5 shapes, rank 1)


@pytest.fixture(scope="module")
def table():
    return DemoSource(name="small", num_samples=24, num_classes=3, seed=3).load()


def _poison(root: Path, table, i: int, what: str) -> None:
    """LoRA ``i`` (flat kohya layout) gets a NaN, or loses a layer."""
    tensors = tensors_of(table, i, "kohya")
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    if what == "nan":
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = np.nan
    else:
        tensors.pop(key)
    save_file(tensors, str(root / f"{table.sample_ids[i]}.safetensors"))


def _same(a, b) -> None:
    assert a.sample_ids == b.sample_ids and a.label_names == b.label_names
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.positions is None) == (b.positions is None)
    if a.positions is not None:
        np.testing.assert_array_equal(a.positions, b.positions)
    assert sorted(a.weights) == sorted(b.weights)
    for layer in a.weights:
        np.testing.assert_array_equal(a.weights[layer], b.weights[layer])
    assert sorted(a.alphas) == sorted(b.alphas)
    for module in a.alphas:
        np.testing.assert_array_equal(a.alphas[module], b.alphas[module])


def test_a_folder_in_chunks_of_five_rows_is_the_folder_read_whole(tmp_path, table):
    root = write_dataset(table, tmp_path / "d", "kohya")
    _poison(root, table, 6, "nan")  # dropped rows in two different chunks
    _poison(root, table, 17, "mismatch")
    source = FolderSource(root, drop_nonfinite=True, on_mismatch="skip")
    stream = source.stream(5 * ROW_BYTES)
    chunks = list(stream)
    assert len(chunks) == 5 and [c.num_rows for c in chunks] == [5, 4, 5, 4, 4]
    whole = source.load()
    assert whole.num_samples == 22 and whole.positions.tolist() == [i for i in range(24) if i not in (6, 17)]
    _same(collect(FolderSource(root, drop_nonfinite=True, on_mismatch="skip").stream(5 * ROW_BYTES)), whole)
    assert stream.table().stored_rows == 24


def test_a_hf_dataset_in_small_record_batches_is_the_dataset_read_whole(tmp_path, table):
    import pyarrow as pa
    from datasets import Dataset

    columns = {"category_label": pa.array(table.labels)}
    for layer in table.layers:
        stack = table.weights[layer]
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, stack.shape[0] * stack.shape[1] + 1,
                                                            dtype=np.int32) * stack.shape[2]),
                                         pa.array(stack.reshape(-1)))
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, stack.shape[0] + 1, dtype=np.int32) * stack.shape[1]),
                                         inner)
        module, factor = layer.rsplit(".", 1)
        columns[f"unet.{module}.lora.{factor}.weight"] = outer
    Dataset(pa.table(columns)).save_to_disk(str(tmp_path / "hf"), max_shard_size="100KB")  # several shards
    source = HFDatasetSource(tmp_path / "hf")
    chunks = list(source.stream(3 * ROW_BYTES))
    assert len(chunks) >= 8 and sum(c.num_rows for c in chunks) == 24
    whole = collect(source.stream(None))
    np.testing.assert_array_equal(whole.weights[table.layers[0]], table.weights[table.layers[0]])
    _same(collect(HFDatasetSource(tmp_path / "hf").stream(3 * ROW_BYTES)), whole)


def _workspace(root: Path, cache: FeatureCache | None, **options) -> Workspace:
    return Workspace(FolderSource(root, **options), SplitConfig(), cache)


def test_streamed_features_equal_features_of_the_whole_table(tmp_path, table, monkeypatch):
    root = write_dataset(table, tmp_path / "d", "kohya")
    layers = table.layers
    whole = _workspace(root, None)
    want = {rep: whole.features(rep, layers) for rep in ("stats", "spectral", "delta_spectral", "flat_vec")}
    monkeypatch.setattr(stream_pass, "STREAM_BYTES", 4 * ROW_BYTES)
    streamed = _workspace(root, FeatureCache(tmp_path / "cache"))
    streamed.prepare(list(want))  # one pass, in chunks of about 4 rows
    for rep, x in want.items():
        np.testing.assert_array_equal(streamed.features(rep, layers), x, err_msg=rep)
    np.testing.assert_array_equal(streamed.features("flat_vec", layers),
                                  np.concatenate([table.weights[la].reshape(24, -1) for la in layers], axis=1))


def test_a_bad_lora_in_the_last_chunk_stores_nothing(tmp_path, table, monkeypatch):
    root = write_dataset(table, tmp_path / "d", "kohya")
    _poison(root, table, 23, "nan")
    monkeypatch.setattr(stream_pass, "STREAM_BYTES", 4 * ROW_BYTES)
    monkeypatch.setattr(stream_pass, "SPILL_BYTES", 1)  # flat_vec staged in the cache as it is computed
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(DataError, match=r"1 LoRAs contain NaN or Inf weights: small-00023\.safetensors"):
        _workspace(root, cache).prepare(["stats", "flat_vec"])
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert left == []  # no entry, no index, no staged file


def test_flat_vec_is_written_through_a_memory_map_into_its_cache_entry(tmp_path, table, monkeypatch):
    root = write_dataset(table, tmp_path / "d", "kohya")
    monkeypatch.setattr(stream_pass, "SPILL_BYTES", 1)
    cache = FeatureCache(tmp_path / "cache")
    first = _workspace(root, cache)
    x = first.features("flat_vec", table.layers)
    np.testing.assert_array_equal(x, np.concatenate([table.weights[la].reshape(24, -1) for la in table.layers], 1))
    (entry,) = cache.entries()
    assert entry.representation == "flat_vec" and entry.shape == (24, x.shape[1])
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]
    again = _workspace(root, cache)
    y = again.features("flat_vec", table.layers)
    np.testing.assert_array_equal(y, x)
    assert isinstance(again._full["flat_vec"][0], np.memmap)  # read back memory-mapped, not loaded


def test_rows_dropped_after_a_spilled_output_are_trimmed_from_its_entry(tmp_path, table, monkeypatch):
    root = write_dataset(table, tmp_path / "d", "kohya")
    _poison(root, table, 5, "nan")
    monkeypatch.setattr(stream_pass, "SPILL_BYTES", 1)
    cache = FeatureCache(tmp_path / "cache")
    x = _workspace(root, cache, drop_nonfinite=True).features("flat_vec", table.layers)
    keep = [i for i in range(24) if i != 5]
    want = np.concatenate([table.weights[la][keep].reshape(23, -1) for la in table.layers], 1)
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(_workspace(root, cache, drop_nonfinite=True).features("flat_vec", table.layers), want)
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]
