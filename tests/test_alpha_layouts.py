"""Every layout's alpha against the real libraries (no mocks): a tiny UNet with SD1.5's block structure gets a
peft LoRA (rank 4, lora_alpha 8; rank/alpha patterns; rsLoRA) with random weights, saved as users have it:
a PEFT folder (``save_pretrained``), a diffusers file (``save_lora_weights``, with and without its LoRA
config in the metadata) and a kohya file (``convert_state_dict_to_kohya`` plus the true ``.alpha``). Each
file is loaded back by its own library into a fresh UNet, and the update it applies to each module must be
ablate's alpha / r * up @ down."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ablation_cli.data.folders import FolderSource
from ablation_cli.data.sources import resolve
from ablation_cli.data.table import LoraTable
from ablation_cli.errors import DataError

RANK, LORA_ALPHA = 4, 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    # first match wins, a pattern matches the module name or a suffix after a dot, ^ anchors at the UNet
    "patterns": {"rank_pattern": {"attn2.to_k": 2, "^up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 6},
                 "alpha_pattern": {"attn1.to_v": 16, "to_v": 2, r"down_blocks\.1\..*\.to_out\.0": 3}},
    "rslora": {"use_rslora": True},
}
LAYOUTS = ("peft", "diffusers", "diffusers_nometa", "kohya")
LABELS = ("cat", "dog")  # one LoRA each: a folder dataset needs two classes


@pytest.fixture(scope="module")
def base() -> Any:
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from scripts.make_fixtures import tiny_sd15_unet  # the UNet the committed real fixtures were made with

    return tiny_sd15_unet()


def deltas(model: Any, adapter: str) -> dict[str, np.ndarray]:
    """Canonical module -> the update (out, in) that the library applies, from each LoRA layer it built."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module.get_delta_weight(adapter).detach().double().numpy()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def save_lora(base: Any, config: dict[str, Any], seed: int, sid: str, label: str, roots: dict[str, Path]) -> None:
    """One LoRA with random non-zero weights, saved in each layout."""
    import torch
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD15
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                                           **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    meta = json.dumps({"category_label": label})
    model.save_pretrained(roots["peft"] / sid)
    (roots["peft"] / sid / "metadata.json").write_text(meta)
    unet = model.base_model.model
    state = get_peft_model_state_dict(unet)
    for layout, metadata in (("diffusers", model.peft_config["default"].to_dict()), ("diffusers_nometa", None)):
        SD15.save_lora_weights(roots[layout] / sid, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
        (roots[layout] / sid / "metadata.json").write_text(meta)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    for name, module in unet.named_modules():  # the converter writes alpha = r: the true alpha is scale * r
        if isinstance(module, LoraLayer):
            alpha = module.scaling["default"] * module.r["default"]
            kohya[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    save_file({k: v.detach().contiguous().numpy() for k, v in kohya.items()},
              str(roots["kohya"] / f"{sid}.safetensors"))
    with (roots["kohya"] / "labels.csv").open("a") as fh:
        fh.write(f"{sid}.safetensors,{label}\n")


def library_deltas(base: Any, layout: str, root: Path, sid: str) -> dict[str, np.ndarray]:
    """The file loaded back by its own library into a fresh UNet, and the update of each module."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD15
    from peft import PeftModel

    if layout == "peft":
        return deltas(PeftModel.from_pretrained(copy.deepcopy(base), root / sid), "default")
    where = {"weight_name": f"{sid}.safetensors"} if layout == "kohya" else {}
    state, network_alphas, metadata = SD15.lora_state_dict(str(root if layout == "kohya" else root / sid),
                                                           return_lora_metadata=True, **where)
    assert (network_alphas is not None) == (layout == "kohya")
    assert (metadata is not None) == (layout == "diffusers")
    unet = copy.deepcopy(base)
    SD15.load_lora_into_unet(state, network_alphas, unet, adapter_name="loaded", metadata=metadata)
    return deltas(unet, "loaded")


def ablate_deltas(table: LoraTable, i: int) -> dict[str, np.ndarray]:
    """Canonical module -> alpha / r * up @ down as ablate reads the LoRA (alpha NaN or absent: scale 1)."""
    out = {}
    for layer in table.layers:
        if layer.endswith(".down"):
            module = layer.removesuffix(".down")
            down, up = table.weights[layer][i].astype(np.float64), table.weights[f"{module}.up"][i].astype(np.float64)
            alpha = float(table.alphas[module][i]) if module in table.alphas else float("nan")
            out[module] = (alpha / down.shape[0] if np.isfinite(alpha) else 1.0) * up @ down
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], only: set[str] | None = None) -> None:
    assert sorted(got) == sorted(want) and len(got) == 128  # 16 transformer blocks x attn1, attn2 x 4
    for module, dw in want.items():
        if only is not None and module not in only:
            continue
        np.testing.assert_allclose(got[module], dw, rtol=1e-5, atol=1e-6 * np.abs(dw).max(), err_msg=module)


@pytest.fixture(scope="module", params=list(CASES))
def written(request: pytest.FixtureRequest, base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One case's LoRAs in every layout, and the update each applies as trained (the in-memory peft model's)."""
    from peft import PeftModel

    case = request.param
    roots = {layout: tmp_path_factory.mktemp(f"{case}_{layout}") for layout in LAYOUTS}
    (roots["kohya"] / "labels.csv").write_text("file,label\n")
    trained = {}
    for seed, label in enumerate(LABELS):
        sid = f"lora-{label}"
        save_lora(base, CASES[case], seed, sid, label, roots)
        trained[sid] = deltas(PeftModel.from_pretrained(copy.deepcopy(base), roots["peft"] / sid), "default")
    return {"case": case, "roots": roots, "trained": trained}


def usual_alpha_modules(table: LoraTable, i: int) -> set[str] | None:
    """The modules at a kohya file's most common alpha when its alphas differ (else None: all). diffusers
    (0.42) loads a SD1.5 UNet's kohya alphas as one lora_alpha, the most common, plus an alpha_pattern whose
    keys keep its old processor spelling (``attn1.processor.to_v_lora.down.weight``), so that peft ignores
    them with a RuntimeWarning: only the modules at the most common alpha get their alpha / r. kohya-ss and
    A1111 apply each module's alpha / r: the trained update checks those (the .alpha were written from it)."""
    alphas = {m: float(a[i]) for m, a in table.alphas.items()}
    values = list(alphas.values())
    usual = max(set(values), key=values.count)
    return None if len(set(values)) == 1 else {m for m, a in alphas.items() if a == usual}


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_alpha_over_rank_is_the_scale_the_layouts_library_applies(base, written, layout):
    root = written["roots"][layout]
    source = resolve(str(root), {})
    table = source.load()
    assert source.describe().kind == f"folder:{'flat' if layout == 'kohya' else layout.split('_')[0]}"
    assert table.sample_ids == tuple(f"lora-{label}" for label in LABELS)
    for i, sid in enumerate(table.sample_ids):
        got = ablate_deltas(table, i)
        only = usual_alpha_modules(table, i) if layout == "kohya" else None
        assert_same(got, library_deltas(base, layout, root, sid), only)
        if layout != "diffusers_nometa":  # saved with its alphas: the update it was trained with
            assert_same(got, written["trained"][sid])
    scales = {float(a[0]) / table.weights[f"{m}.down"].shape[1] for m, a in table.alphas.items()}
    if layout == "diffusers_nometa":  # no alpha anywhere: scale 1, as diffusers loads it
        assert not table.alphas
    elif written["case"] == "plain":
        assert scales == {LORA_ALPHA / RANK}
    elif written["case"] == "rslora":
        assert scales == {LORA_ALPHA / RANK**0.5}
    else:
        assert len(scales) == 5  # 8/4; 8/2 (attn2.to_k) = 16/4 (attn1.to_v); 8/6; 2/4; 3/4
    assert 1.0 not in scales


# -- without the libraries: configs in the fingerprint, bad configs ------------------------------------------

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def peft_folder(root: Path, configs: dict[str, str | None]) -> Path:
    """PEFT adapters (rank 2), each with the given adapter_config.json text (None: none)."""
    rng = np.random.default_rng(0)
    for sid, config in configs.items():
        (root / sid).mkdir(parents=True)
        save_file({f"base_model.model.{MODULE}.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
                   f"base_model.model.{MODULE}.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32)},
                  str(root / sid / "adapter_model.safetensors"))
        (root / sid / "metadata.json").write_text(json.dumps({"category_label": sid}))
        if config is not None:
            (root / sid / "adapter_config.json").write_text(config)
    return root


def test_a_configs_alpha_is_in_the_fingerprint_and_scale_one_keeps_it(tmp_path):
    none = FolderSource(peft_folder(tmp_path / "none", {"a": None, "b": None}))
    fingerprint = none.describe().fingerprint
    assert not none.load().alphas
    same = '{"r": 2, "lora_alpha": 2, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": false}'
    shutil.copytree(tmp_path / "none", tmp_path / "identity")  # copy2: the same mtimes
    for sid in ("a", "b"):
        (tmp_path / "identity" / sid / "adapter_config.json").write_text(same)
    identity = FolderSource(tmp_path / "identity")
    assert identity.describe().fingerprint == fingerprint  # scale 1, as without a config: cells kept
    assert {float(a) for a in identity.load().alphas[MODULE]} == {2.0}
    config = tmp_path / "identity" / "b" / "adapter_config.json"
    config.write_text(same.replace('"lora_alpha": 2', '"lora_alpha": 8'))
    changed = FolderSource(tmp_path / "identity")
    assert changed.describe().fingerprint != fingerprint
    assert changed.load().alphas[MODULE].tolist() == [2.0, 8.0]
    config.write_text(same.replace('"lora_alpha": 2', '"lora_alpha": 4'))
    again = FolderSource(tmp_path / "identity").describe().fingerprint
    assert again not in (fingerprint, changed.describe().fingerprint)


@pytest.mark.parametrize("text, reason", [
    ('{"r": 2, "lora_alpha": 8', "Expecting"),
    ('{"r": 2, "lora_alpha": "eight"}', "lora_alpha is 'eight', not a number"),
    ('{"r": 2, "lora_alpha": 8, "alpha_pattern": {"to_q": null}}', "alpha_pattern['to_q'] is None, not a number"),
    ('{"r": 2, "lora_alpha": 8, "rank_pattern": {"(to_q": 4}}', "not a regular expression"),
])
def test_a_bad_adapter_config_is_a_data_error_naming_the_file(tmp_path, text, reason):
    from tests.conftest import ablate_in_process as ablate

    root = peft_folder(tmp_path / "loras", {"a": None, "b": text})
    with pytest.raises(DataError) as err:
        FolderSource(root).load()
    assert str(err.value.message).startswith(f"{root / 'b' / 'adapter_config.json'}: bad adapter config: ")
    assert reason in err.value.message and "\n" not in str(err.value)
    result = ablate("inspect", str(root), cwd=tmp_path)
    assert result.returncode == 2 and "adapter_config.json: bad adapter config" in result.stderr


def test_peft_patterns_match_the_module_names_peft_gives_the_keys(tmp_path):
    """An adapter on a model that holds the UNet as ``unet``: peft names its modules ``unet.down_blocks...``,
    and an anchored pattern matches those names, not the UNet's own module path."""
    config = json.dumps({"r": 2, "lora_alpha": 2, "alpha_pattern": {"^down_blocks.*to_q": 100, r"^unet\.down.*q": 6}})
    root = peft_folder(tmp_path / "loras", {"a": config, "b": config})
    for sid in ("a", "b"):
        path = root / sid / "adapter_model.safetensors"
        tensors = load_file(str(path))
        save_file({k.replace("base_model.model.", "base_model.model.unet."): v for k, v in tensors.items()}, str(path))
    assert FolderSource(root).load().alphas[MODULE].tolist() == [6.0, 6.0]


# -- the invariance audit on the real libraries' files -----------------------------------------------------------

AUDITED = ("stats", "spectral", "delta_spectral", "delta_canonical", "delta_sketch")


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_the_audit_finds_the_invariant_representations_unchanged_on_real_loras(written, layout, tmp_path):
    from tests.conftest import ablate_in_process

    out = tmp_path / "audit"
    done = ablate_in_process("audit", "invariance", "--dataset", str(written["roots"][layout]), "--reps",
                             ",".join(AUDITED), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "invariance.json").read_text())
    assert (report["num_loras"], report["transforms"], report["cells"]) == (2, ["gl", "scale", "sign", "alpha"], [])
    worst = {r["name"]: {t: c["max_rel_change"] for t, c in r["change"].items()} for r in report["representations"]}
    assert list(worst) == list(AUDITED)
    for name in ("delta_spectral", "delta_canonical", "delta_sketch"):
        assert max(worst[name].values()) < 1e-5, (name, worst[name])
    for name in ("stats", "spectral"):  # the factors' own features move under a reparametrisation
        assert worst[name]["gl"] > 1e-2 and worst[name]["scale"] > 1e-2, (name, worst[name])
    table = (out / "invariance.md").read_text()
    assert "| delta_canonical | " in table and table.count("| invariant |") == 3
