"""Folder datasets: every layout and key spelling gives the same table; bad inputs are exit 2."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ablation_cli.data.demo import DemoSource
from ablation_cli.data.folders import FolderSource
from ablation_cli.data.layers import sd15_layers
from ablation_cli.errors import DataError
from ablation_cli.store import path_slug
from tests.conftest import ablate_in_process as ablate
from tests.conftest import write_project
from tests.lora_files import STYLES, tensors_of, write_dataset

LAYOUT = {"diffusers": "diffusers", "diffusers_old": "diffusers", "peft": "peft", "kohya": "flat"}


@pytest.fixture(scope="module")
def table():
    return DemoSource(name="small", num_samples=24, num_classes=3, seed=3).load()


@pytest.mark.parametrize("style", STYLES)
def test_every_layout_and_spelling_loads_the_same_table(tmp_path, table, style):
    source = FolderSource(write_dataset(table, tmp_path / style, style))
    info = source.describe()
    assert info.layers == tuple(s.name for s in sd15_layers())
    assert info.details["layout"] == LAYOUT[style] and info.num_samples == 24
    loaded = source.load()
    assert loaded.label_names == table.label_names
    assert loaded.sample_ids == table.sample_ids
    np.testing.assert_array_equal(loaded.labels, table.labels)
    for layer in table.layers:
        np.testing.assert_array_equal(loaded.weights[layer], table.weights[layer])
    if style == "kohya":
        assert len(loaded.alphas) == 64 and all((a == 1.0).all() for a in loaded.alphas.values())


def test_fingerprint_is_cheap_and_tracks_changes(tmp_path, table):
    root = write_dataset(table, tmp_path / "d", "diffusers")
    first = FolderSource(root).describe().fingerprint
    assert FolderSource(root).describe().fingerprint == first
    (root / table.sample_ids[0] / "metadata.json").write_text(json.dumps({"category_label": "zebra"}))
    assert FolderSource(root).describe().fingerprint != first


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, table):
    root = write_dataset(table, tmp_path / "d", "kohya")
    marker = tmp_path / "pwned"
    (root / "evil.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DataError, match=r"refusing to read 1 pickle file\(s\) in .*: evil.pt; unpickling runs"):
        FolderSource(root).describe()
    assert not marker.exists()


def _damage(root: Path, table, what: str) -> None:
    first = root / f"{table.sample_ids[0]}.safetensors"
    tensors = tensors_of(table, 0, "kohya")
    if what == "no-lora":
        for p in root.glob("*.safetensors"):
            save_file({"foo": np.zeros(3, dtype=np.float32)}, str(p))
    elif what == "mismatch":
        tensors.pop(next(k for k in tensors if k.endswith("lora_down.weight")))
        save_file(tensors, str(first))
    elif what == "shape":
        key = next(k for k in tensors if k.endswith("lora_down.weight"))
        tensors[key] = np.zeros((2, tensors[key].shape[1]), dtype=np.float32)
        save_file(tensors, str(first))
    elif what == "nan":
        key = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = np.nan
        save_file(tensors, str(first))
    elif what == "labels":
        lines = (root / "labels.csv").read_text().splitlines()
        (root / "labels.csv").write_text("\n".join(lines[:-2]) + "\n")
    elif what == "truncated":
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 3])
    elif what == "not-safetensors":
        first.write_text("hello, I am not a tensor file")
    elif what == "empty":
        for p in root.glob("*.safetensors"):
            p.unlink()


BAD = {
    "no-lora": "no LoRA tensors found in",
    "mismatch": "1 of 24 LoRAs have a different layer set than",
    "shape": "1 LoRAs have matrix shapes (ranks) unlike the others",
    "nan": "1 LoRAs contain NaN or Inf weights: small-00000.safetensors",
    "labels": "missing labels for 2 of 24 LoRAs",
    "truncated": "small-00000.safetensors is not a readable safetensors file",
    "not-safetensors": "small-00000.safetensors is not a readable safetensors file",
    "empty": "no LoRA files found in",
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_data_is_one_clear_error(tmp_path, table, what):
    root = write_dataset(table, tmp_path / "d", "kohya")
    _damage(root, table, what)
    with pytest.raises(DataError) as info:
        source = FolderSource(root)
        source.describe()
        source.load()
    assert BAD[what] in str(info.value)


def test_mismatch_skip_and_drop_nonfinite(tmp_path, table, caplog):
    root = write_dataset(table, tmp_path / "d", "kohya")
    _damage(root, table, "mismatch")
    loaded = FolderSource(root, on_mismatch="skip").load()
    assert loaded.num_samples == 23 and "skipped (--on-mismatch skip)" in caplog.text
    _damage(root, table, "nan")
    assert FolderSource(root, drop_nonfinite=True).load().num_samples == 23


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.log"}


def experiment_on_folder(tmp_path: Path, table, style: str) -> tuple[Path, Path, Path]:
    """A finished 1-run experiment on a folder dataset: (project, data folder, experiment folder)."""
    project = tmp_path / "p"
    write_project(project, top='name = "tiny"\nnum_runs = 1\ndevice = "cpu"\nrepresentations = ["simple_stats"]\n')
    data = write_dataset(table, tmp_path / "loras", style)
    ok = ablate("run", "--config", "exp.toml", "--dataset", str(data), cwd=project)
    assert ok.returncode == 0, ok.stderr
    return project, data, project / "results" / f"tiny_{path_slug(data)}"


@pytest.mark.slow
def test_cli_runs_on_a_folder_and_bad_data_damages_nothing(tmp_path):
    table = DemoSource(name="small", num_samples=60, num_classes=3, seed=3).load()
    project, data, exp = experiment_on_folder(tmp_path, table, "diffusers")
    record = json.loads((exp / "experiment.json").read_text())
    assert record["dataset"]["kind"] == "folder:diffusers" and record["dataset"]["num_samples"] == 60
    status = ablate("status", "--dataset", str(data), "--json", cwd=project)
    assert json.loads(status.stdout)["done"] == 2
    before = _tree_digest(exp)
    (data / "evil.ckpt").write_bytes(b"\x80\x04junk")
    refused = ablate("run", "--config", "exp.toml", "--dataset", str(data), cwd=project)
    assert refused.returncode == 2
    assert "error: refusing to read 1 pickle file(s)" in refused.stderr and "weights_only=True" in refused.stderr
    (data / "evil.ckpt").unlink()
    (data / table.sample_ids[1] / "metadata.json").unlink()
    missing = ablate("run", "--config", "exp.toml", "--dataset", str(data), cwd=project)
    assert missing.returncode == 2 and "missing labels for 1 of 60 LoRAs" in missing.stderr
    assert _tree_digest(exp) == before


def test_demo_goes_through_a_real_diffusers_folder(tmp_path):
    source = DemoSource(name="tinydemo", num_samples=30, num_classes=3, seed=5, cache_dir=tmp_path)
    table = source.load()
    folder = source.folder()
    assert folder is not None and (folder / ".complete").exists()
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(subdirs) == 30 and subdirs[0] == "tinydemo-00000"
    assert json.loads((folder / "tinydemo-00000" / "metadata.json").read_text())["category_label"] in table.label_names
    info = FolderSource(folder).describe()
    assert info.details["layout"] == "diffusers" and info.details["key_style"] == "diffusers_old"
    generated = DemoSource(name="tinydemo", num_samples=30, num_classes=3, seed=5).load()
    assert table.info == generated.info and table.sample_ids == generated.sample_ids
    np.testing.assert_array_equal(table.labels, generated.labels)
    for layer in generated.layers:
        np.testing.assert_array_equal(table.weights[layer], generated.weights[layer])
    mtime = (folder / ".complete").stat().st_mtime_ns
    source.load()  # cached: not written again
    assert (folder / ".complete").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_every_bad_input_via_the_cli_is_exit_2_and_damages_nothing(tmp_path):
    """On an existing experiment: each damage gives one error line, exit 2, and no file changes."""
    table = DemoSource(name="small", num_samples=24, num_classes=2, seed=3).load()
    project, data, exp = experiment_on_folder(tmp_path, table, "kohya")
    before = _tree_digest(exp)
    pristine = {p.name: p.read_bytes() for p in data.iterdir()}
    for what, message in BAD.items():
        _damage(data, table, what)
        result = ablate("run", "--config", "exp.toml", "--dataset", str(data), cwd=project)
        assert result.returncode == 2, (what, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (what, result.stderr)
        assert _tree_digest(exp) == before, what
        for p in data.iterdir():
            p.unlink()
        for name, content in pristine.items():
            (data / name).write_bytes(content)
    few = DemoSource(name="few", num_samples=12, num_classes=6, seed=3).load()
    small = write_dataset(few, tmp_path / "few", "kohya")
    result = ablate("run", "--config", "exp.toml", "--dataset", str(small), cwd=project)
    assert result.returncode == 2 and "have fewer than 3 samples: too small for a stratified" in result.stderr
