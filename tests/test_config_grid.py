from pathlib import Path

import pytest

from ablation_cli.config import ExperimentConfig, load_config
from ablation_cli.data.demo import DemoSource
from ablation_cli.data.layers import count_group, sd15_layers, select_layers
from ablation_cli.errors import ConfigError
from ablation_cli.grid import expand
from tests.conftest import REPO, tiny_config


def test_default_config_file_equals_the_built_in_defaults():
    cfg, used = load_config(REPO / "configs/visual_ablation.toml")
    assert used == REPO / "configs/visual_ablation.toml"
    assert cfg == ExperimentConfig()
    assert cfg.num_runs == 10 and cfg.classifier.dropout == 0.5 and cfg.training.patience == 15
    assert list(cfg.layer_configs) == ["all_layers", "visual_only"]
    assert cfg.representations[0] == "simple_stats" and len(cfg.representations) == 9


def test_overrides_apply_and_validate():
    cfg, _ = load_config(REPO / "configs/visual_ablation.toml", {"classifier.dropout": 0.3, "num_runs": 3,
                                                                 "seed": None})
    assert cfg.classifier.dropout == 0.3 and cfg.num_runs == 3 and cfg.seed == 42
    with pytest.raises(ConfigError, match=r"command-line flags: split: train \+ val \+ test must be 1, got 1.1"):
        load_config(REPO / "configs/visual_ablation.toml", {"split.train": 0.8})


def test_sd15_topology():
    layers = sd15_layers()
    names = [s.name for s in layers]
    assert len(names) == 128 and names == sorted(names)
    assert count_group(names, "attn1") == 64 and count_group(names, "attn2") == 64
    sizes = [s.shape[0] * s.shape[1] for s in layers]
    attn1 = sum(n for s, n in zip(layers, sizes) if ".attn1." in s.name)
    assert (attn1, sum(sizes) - attn1) == (49_920, 49_728)
    shapes = {s.name: s.shape for s in layers}
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.down"] == (1, 768)
    assert shapes["up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q.up"] == (320, 1)


def test_layer_patterns():
    names = [s.name for s in sd15_layers()]
    assert len(select_layers(names, ["*.attn1.*"])) == 64
    assert len(select_layers(names, ["*"], ["*.attn2.*", "mid_block.*"])) == 60
    assert select_layers(names, ["nothing*"]) == []


def test_grid_order_ids_and_fingerprints():
    info = DemoSource(num_samples=30, num_classes=3).describe()
    cells = expand(tiny_config(), info)
    assert [c.id for c in cells] == ["all_layers_simple_stats", "all_layers_stats", "visual_only_simple_stats",
                                     "visual_only_stats"]
    assert len({c.fingerprint.digest for c in cells}) == 4
    again = expand(tiny_config(), info)
    assert [c.fingerprint.digest for c in again] == [c.fingerprint.digest for c in cells]
    other = expand(tiny_config(num_runs=7), info)
    assert [c.fingerprint.digest for c in other] == [c.fingerprint.digest for c in cells]  # runs are independent
    changed = expand(tiny_config(seed=1), info)
    assert all(a.fingerprint.digest != b.fingerprint.digest for a, b in zip(changed, cells))
    data = expand(tiny_config(), DemoSource(num_samples=31, num_classes=3).describe())
    assert all(a.fingerprint.digest != b.fingerprint.digest for a, b in zip(data, cells))


def test_layer_config_selecting_nothing_is_a_config_error():
    cfg = tiny_config(layer_configs={"none": {"include": ["*.attn9.*"]}})
    with pytest.raises(ConfigError, match=r"layer_configs.none: include \['\*.attn9.\*'\] / exclude \[\] selects no"):
        expand(cfg, DemoSource(num_samples=30, num_classes=3).describe())


def test_bad_layer_config_name_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="must be letters, digits"):
        tiny_config(layer_configs={"../x": {"include": ["*"]}})
