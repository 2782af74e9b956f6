"""The feature cache: hits, misses on version and data changes, corruption, concurrency; export."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path

import numpy as np
import pytest

from ablation_cli.config import SplitConfig
from ablation_cli.data.demo import DemoSource
from ablation_cli.data.folders import FolderSource
from ablation_cli.features import registry
from ablation_cli.features.cache import FeatureCache
from ablation_cli.workspace import Workspace
from tests.conftest import TINY_DEMO, write_project
from tests.conftest import ablate_in_process as ablate
from tests.lora_files import write_dataset

LAYERS_ATTN1 = "*.attn1.*"


class CountingSource:
    """A real source that counts how often its weights are read."""

    def __init__(self, inner):
        self.inner = inner
        self.loads = 0

    def describe(self):
        return self.inner.describe()

    def stream(self, chunk_bytes):
        self.loads += 1
        return self.inner.stream(chunk_bytes)


def workspace(cache: FeatureCache | None, source=None) -> Workspace:
    return Workspace(source or DemoSource(name="tinydemo", **TINY_DEMO), SplitConfig(), cache)


def test_hit_reads_no_weights_and_gives_identical_features(tmp_path):
    cache = FeatureCache(tmp_path / "features")
    first = workspace(cache)
    layers = first.index.layers
    expected = {rep: first.features(rep, layers) for rep in ("simple_stats", "ensemble", "delta_spectral")}
    again = CountingSource(DemoSource(name="tinydemo", **TINY_DEMO))
    second = workspace(cache, again)
    for rep, x in expected.items():
        np.testing.assert_array_equal(second.features(rep, layers), x)
    np.testing.assert_array_equal(second.index.labels, first.index.labels)
    assert second.split.train.tolist() == first.split.train.tolist()
    assert again.loads == 0  # labels, split and features all came from the cache
    names = sorted(p.name for p in (tmp_path / "features").glob("*/*"))
    assert names == sorted(["index.json", *(f"{r}-v{registry.get(r).version}.{ext}" for r in
                                            ("simple_stats", "spectral", "matrix_norms", "distribution", "frequency",
                                             "info_theoretic", "delta_spectral") for ext in ("npy", "json", "lock"))])


def test_without_cache_matches_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default cache folder (.feature_cache) would appear
    cached = workspace(FeatureCache(tmp_path / "features"))
    expected = cached.features("stats", cached.index.layers)
    before = sorted(tmp_path.rglob("*"))
    assert any(p.suffix == ".npy" for p in before)  # the cached workspace wrote its entries here
    plain = workspace(None)
    np.testing.assert_array_equal(plain.features("stats", plain.index.layers), expected)
    assert sorted(tmp_path.rglob("*")) == before  # the workspace without a cache added no file anywhere


def test_visual_only_is_a_column_selection_of_all_layers(tmp_path):
    ws = workspace(FeatureCache(tmp_path / "features"))
    layers = ws.index.layers
    visual = [la for la in layers if ".attn1." in la]
    full = ws.features("spectral", layers)
    part = ws.features("spectral", visual)
    cols = [i for i, c in enumerate(ws.columns("spectral", layers)) if ".attn1." in c]
    np.testing.assert_array_equal(part, full[:, cols])
    assert ws.columns("spectral", visual) == [c for c in ws.columns("spectral", layers) if ".attn1." in c]
    # the ensemble is its parts, per layer
    ens = ws.columns("ensemble", visual[:1])
    assert ens[:32] == ws.columns("spectral", visual[:1]) and len(ens) == 67


def test_version_bump_is_a_miss(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "features")
    workspace(cache).features("stats", workspace(cache).index.layers)
    bumped = registry.Representation(**{**registry.get("stats").__dict__, "version": 2})
    monkeypatch.setitem(registry._REGISTRY, "stats", bumped)
    source = CountingSource(DemoSource(name="tinydemo", **TINY_DEMO))
    ws = workspace(cache, source)
    ws.features("stats", ws.info.layers)
    assert source.loads == 1  # recomputed from the data
    assert sorted(p.name for p in (tmp_path / "features").glob("*/stats-v*.npy")) == ["stats-v1.npy", "stats-v2.npy"]


def test_data_change_is_a_miss(tmp_path):
    folder = tmp_path / "loras"
    write_dataset(DemoSource(name="d", num_samples=24, num_classes=2, seed=3).load(), folder, "kohya")
    cache = FeatureCache(tmp_path / "features")
    ws = workspace(cache, FolderSource(folder))
    before = ws.features("simple_stats", ws.index.layers)
    victim = sorted(folder.glob("*.safetensors"))[0]
    from safetensors.numpy import load_file, save_file

    tensors = load_file(victim)
    key = next(k for k in sorted(tensors) if k.endswith(".weight"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, victim)
    source = CountingSource(FolderSource(folder))
    changed = workspace(cache, source)
    after = changed.features("simple_stats", changed.info.layers)
    assert source.loads == 1 and changed.key != ws.key
    assert not np.array_equal(before, after)
    assert len(list((tmp_path / "features").iterdir())) == 2  # one entry per dataset version


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, damage, caplog):
    cache = FeatureCache(tmp_path / "features")
    ws = workspace(cache)
    expected = ws.features("stats", ws.index.layers)
    npy = next((tmp_path / "features").glob("*/stats-v1.npy"))
    raw = bytearray(npy.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":
        npy.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        npy.with_suffix(".json").write_text("{not json")
    source = CountingSource(DemoSource(name="tinydemo", **TINY_DEMO))
    again = workspace(cache, source)
    np.testing.assert_array_equal(again.features("stats", again.info.layers), expected)
    assert source.loads == 1
    assert "is corrupt" in caplog.text
    assert FeatureCache(tmp_path / "features").load(again.key, "stats", 1) is not None  # healed


def _compute_in_child(root: str, folder: str, role: str) -> None:
    """``first`` computes the entry and holds its lock until ``second`` logs that it is waiting for it."""
    import logging

    logger = logging.getLogger("ablation_cli")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(Path(folder) / f"{role}.log"))
    cache = FeatureCache(Path(root))

    def compute() -> np.ndarray:
        with open(Path(folder) / "calls.log", "a") as fh:
            fh.write(f"computed by {role}\n")
        (Path(folder) / "inside").touch()
        second_log = Path(folder) / "second.log"
        deadline = time.monotonic() + 60
        while "waiting for it" not in (second_log.read_text() if second_log.exists() else ""):
            assert time.monotonic() < deadline, "the second process never waited for the lock"
            time.sleep(0.02)
        return np.arange(12, dtype=np.float32).reshape(3, 4)

    arr = cache.get_or_compute("k", "stats", 1, compute, {"dataset": "x"})
    assert arr.tolist() == np.arange(12).reshape(3, 4).tolist()


def test_two_processes_compute_an_entry_once_and_the_second_waits(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    root = str(tmp_path / "features")
    first = ctx.Process(target=_compute_in_child, args=(root, str(tmp_path), "first"))
    first.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "inside").exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "inside").exists(), "the first process never started computing"
    second = ctx.Process(target=_compute_in_child, args=(root, str(tmp_path), "second"))
    second.start()
    for p in (first, second):
        p.join(90)
    assert [first.exitcode, second.exitcode] == [0, 0]
    assert (tmp_path / "calls.log").read_text() == "computed by first\n"  # once, by the lock holder
    assert "another process is computing them; waiting for it" in (tmp_path / "second.log").read_text()


# -- through the CLI ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_cache_hit_across_output_folders_and_ls_prune(tmp_path):
    cfg = write_project(tmp_path)
    common = ["-c", str(cfg), "--num-runs", "1", "--layer-configs", "visual_only"]
    first = ablate("run", *common, "-o", "out_a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    entries = sorted((tmp_path / ".feature_cache" / "features").glob("*/*.npy"))
    assert [p.name for p in entries] == ["simple_stats-v1.npy", "stats-v1.npy"]
    stamps = [p.stat().st_mtime_ns for p in entries]
    second = ablate("run", *common, "-o", "out_b", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Features simple_stats, stats: from the cache" in second.stderr
    assert "Loaded dataset" not in second.stderr  # the weights were not read at all
    assert [p.stat().st_mtime_ns for p in entries] == stamps
    a = json.loads((tmp_path / "out_a/tiny_tinydemo/results.json").read_text())["visual_only_results"]
    b = json.loads((tmp_path / "out_b/tiny_tinydemo/results.json").read_text())["visual_only_results"]
    assert [c["test_acc_mean"] for c in a] == [c["test_acc_mean"] for c in b]

    ls = ablate("cache", "ls", "--json", cwd=tmp_path)
    listed = json.loads(ls.stdout)
    assert [(e["dataset"], e["representation"], e["version"]) for e in listed] == [
        ("tinydemo", "simple_stats", 1), ("tinydemo", "stats", 1)]
    assert listed[0]["shape"] == [120, 640]
    text = ablate("cache", "ls", cwd=tmp_path).stdout
    assert "tinydemo" in text and "2 entries" in text

    kept = ablate("cache", "prune", cwd=tmp_path)  # nothing stale: nothing removed
    assert kept.returncode == 0 and "Removed 0 entries" in kept.stdout
    gone = ablate("cache", "prune", "--dataset", "tinydemo", cwd=tmp_path)
    assert "Removed 2 entries" in gone.stdout
    assert not list((tmp_path / ".feature_cache" / "features").glob("*/*.npy"))

    nocache = ablate("run", *common, "-o", "out_c", "--no-cache-features", cwd=tmp_path)
    assert nocache.returncode == 0 and "Loaded dataset" in nocache.stderr
    assert not (tmp_path / ".feature_cache" / "features").exists() or not list(
        (tmp_path / ".feature_cache" / "features").glob("*/*.npy"))


@pytest.mark.slow
def test_cli_features_export(tmp_path):
    cfg = write_project(tmp_path)
    out = tmp_path / "export"
    res = ablate("features", "-c", str(cfg), "--reps", "stats,delta_spectral", "--layer-config", "visual_only",
                 "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    index = json.loads((out / "index.json").read_text())
    assert set(index) >= {"sample_ids", "layers", "label_mapping", "columns"}
    stats = np.load(out / "stats.npy", allow_pickle=False)
    delta = np.load(out / "delta_spectral.npy", allow_pickle=False)
    labels = np.load(out / "labels.npy", allow_pickle=False)
    assert stats.dtype == np.float32 and stats.shape == (120, 64 * 7)
    assert delta.shape == (120, 32 * 12)  # 32 attn1 modules
    assert labels.shape == (120,) and len(index["sample_ids"]) == 120
    assert len(index["layers"]) == 64 and all(".attn1." in la for la in index["layers"])
    assert len(index["columns"]["stats"]) == stats.shape[1]
    assert index["columns"]["stats"][:2] == [f"{index['layers'][0]}/mean", f"{index['layers'][0]}/std"]
    assert index["columns"]["delta_spectral"][11].endswith(".attn1.to_q/nuclear")
    # the rows are the dataset's, in order: recompute one LoRA's stats directly
    table = DemoSource(name="tinydemo", **TINY_DEMO).load()
    from ablation_cli.features.reference import ref_stats

    first = table.weights[index["layers"][0]][5].astype(np.float64)
    np.testing.assert_allclose(stats[5, :7], ref_stats(first), rtol=1e-5)
    assert index["sample_ids"][5] == table.sample_ids[5]

    again = ablate("features", "-c", str(cfg), "--reps", "stats", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "already holds stats.npy" in again.stderr
    assert np.array_equal(np.load(out / "stats.npy"), stats)  # nothing overwritten
    bad = ablate("features", "-c", str(cfg), "--layer-config", "nope", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "unknown layer config 'nope'" in bad.stderr


def _big_entry(tmp_path: Path) -> tuple[FeatureCache, Path, np.ndarray]:
    """An 8 MB entry: more than the SAMPLE_BLOCKS blocks a load reads."""
    cache = FeatureCache(tmp_path / "cache" / "features")
    arr = np.random.default_rng(0).standard_normal((2000, 1000)).astype(np.float32)
    cache.store("k", "stats", 1, arr, {"dataset": "big"})
    return cache, tmp_path / "cache/features/k/stats-v1.npy", arr


def _unsampled_offset(size: int) -> int:
    """A byte no sampled block covers."""
    from ablation_cli.features.cache import SAMPLE_BLOCK, SAMPLE_BLOCKS

    last = size - SAMPLE_BLOCK
    starts = [last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)]
    return starts[10] + SAMPLE_BLOCK + 100  # between block 10 and block 11


def test_a_load_reads_a_sample_not_every_byte_and_cache_verify_reads_all(tmp_path, monkeypatch):
    """Each Slurm task and worker loads the entries it needs: a full hash there is 40 GB read per task for
    flat_vec at 100k LoRAs (issue 26, item 5). A load checks the size and a sample; `cache verify` all."""
    from ablation_cli.features import cache as cache_module

    cache, npy, arr = _big_entry(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(cache_module, "sha256_file", lambda path: (_ for _ in ()).throw(AssertionError("full hash")))
        np.testing.assert_array_equal(cache.load("k", "stats", 1), arr)

    raw = bytearray(npy.read_bytes())
    offset = _unsampled_offset(len(raw))
    raw[offset] ^= 0xFF
    npy.write_bytes(bytes(raw))
    assert cache.load("k", "stats", 1) is not None  # outside the sample: only the full check sees it
    res = ablate("cache", "verify", "--cache-dir", "cache", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert re.search(r"^\[1/1\] big stats-v1 \(8\.0 MB, [0-9.]+s\): CORRUPT \(its array file does not match its "
                     r"checksum\): deleted, the next run recomputes it$", res.stdout, re.M), res.stdout
    assert res.stdout.splitlines()[-1] == "0 of 1 entries whole in cache/features; 1 corrupt, deleted"
    assert not npy.exists() and cache.load("k", "stats", 1) is None

    cache, npy, arr = _big_entry(tmp_path)
    ok = ablate("cache", "verify", "--cache-dir", "cache", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "1 of 1 entries whole in cache/features"


def test_a_sampled_block_damaged_is_caught_by_a_load(tmp_path):
    from ablation_cli.features.cache import SAMPLE_BLOCK, SAMPLE_BLOCKS

    cache, npy, _ = _big_entry(tmp_path)
    raw = bytearray(npy.read_bytes())
    raw[(len(raw) - SAMPLE_BLOCK) * 32 // (SAMPLE_BLOCKS - 1) + 7] ^= 0x01  # inside sampled block 32 of 64
    npy.write_bytes(bytes(raw))
    assert cache.load("k", "stats", 1) is None and not npy.exists()  # corrupt: deleted, to be recomputed


def test_an_entry_of_an_older_version_is_checked_in_full(tmp_path):
    from ablation_cli.durable import atomic_write_json, read_sealed, seal

    cache, npy, arr = _big_entry(tmp_path)
    meta_path = npy.with_suffix(".json")
    meta = read_sealed(meta_path)
    del meta["sample_sha256"], meta["meta"]["checksum"]
    atomic_write_json(meta_path, seal(meta))
    np.testing.assert_array_equal(cache.load("k", "stats", 1), arr)
    raw = bytearray(npy.read_bytes())
    raw[_unsampled_offset(len(raw))] ^= 0xFF
    npy.write_bytes(bytes(raw))
    assert cache.load("k", "stats", 1) is None  # no sample digest recorded: the full sha256 decides
