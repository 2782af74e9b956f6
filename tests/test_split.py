"""The two split methods: ablate's stratified split and the original script's, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from ablation_cli.config import load_config
from ablation_cli.data.demo import DemoSource
from ablation_cli.errors import ConfigError
from ablation_cli.grid import expand
from ablation_cli.training.split import original_split
from ablation_cli.workspace import Workspace
from tests.conftest import TINY_DEMO, tiny_config


def _datasets_split(n: int) -> tuple[list[int], list[int], list[int]]:
    """What the original script does, with the real `datasets` library."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"row": list(range(n))})
    first = ds.train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.67, seed=42)
    return first["train"]["row"], second["train"]["row"], second["test"]["row"]


def _all(n: int) -> np.ndarray:
    return np.arange(n)


@pytest.mark.parametrize("n", [11, 1000, 1037, 9170])
def test_original_split_equals_the_datasets_library(n):
    train, val, test = _datasets_split(n)
    split = original_split(_all(n), n)
    assert split.train.tolist() == sorted(train)
    assert split.val.tolist() == sorted(val)
    assert split.test.tolist() == sorted(test)


@pytest.mark.parametrize("n", [5, 10])
def test_original_split_of_a_tiny_dataset_uses_every_row(n):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="train set will be empty"):  # why the original used all rows
        datasets.Dataset.from_dict({"row": list(range(n))}).train_test_split(test_size=0.3, seed=42)[
            "test"].train_test_split(test_size=0.67, seed=42)
    split = original_split(_all(n), n)
    assert split.train.tolist() == split.val.tolist() == split.test.tolist() == list(range(n))


@pytest.mark.parametrize(("n", "sizes"), [(1000, (700, 99, 201)), (9170, (6419, 907, 1844)),
                                          (45400, (31780, 4494, 9126)), (91700, (64190, 9078, 18432))],
                         ids=["1k", "10k", "50k", "100k"])
def test_original_split_sizes(n, sizes):
    split = original_split(_all(n), n)
    assert (len(split.train), len(split.val), len(split.test)) == sizes
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(n))


def test_dropped_rows_leave_their_parts_and_the_others_keep_their_places(caplog):
    n = 1000
    full = original_split(_all(n), n)
    dropped = [int(full.train[3]), int(full.val[0]), int(full.test[5]), int(full.test[6])]
    kept = np.setdiff1d(_all(n), dropped)  # stored rows of the loaded rows
    split = original_split(kept, n)
    row_of = {int(p): i for i, p in enumerate(kept)}
    for part in ("train", "val", "test"):
        expected = [row_of[int(p)] for p in getattr(full, part) if int(p) not in dropped]
        assert getattr(split, part).tolist() == expected
    assert "removed from their parts (train 1, val 1, test 2)" in caplog.text


def test_original_method_is_in_the_fingerprint_only_when_chosen():
    info = DemoSource(name="tinydemo", **TINY_DEMO).describe()
    default = expand(tiny_config(), info)[0].fingerprint
    original = expand(tiny_config(split={"method": "original"}), info)[0].fingerprint
    assert "split_method" not in default.config
    assert original.config["split_method"] == "original" and original.digest != default.digest


def test_original_method_keeps_the_original_fractions(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[split]\nmethod = "original"\ntrain = 0.8\nval = 0.1\ntest = 0.1\n')
    with pytest.raises(ConfigError, match="original script's fixed split"):
        load_config(path)
    path.write_text('[split]\nmethod = "random"\n')
    with pytest.raises(ConfigError, match=r"split\.method"):
        load_config(path)
    path.write_text('[split]\nmethod = "original"\n')
    assert load_config(path)[0].split.method == "original"


def test_workspace_uses_the_original_split_on_stored_rows():
    cfg = tiny_config(split={"method": "original"})
    source = DemoSource(name="tinydemo", **TINY_DEMO)
    split = Workspace(source, cfg.split, None, "cpu").split
    expected = original_split(_all(120), 120)
    assert (len(split.train), len(split.val), len(split.test)) == (84, 11, 25)
    assert split.test.tolist() == expected.test.tolist()
