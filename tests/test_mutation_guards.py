"""Numbers and records the rest of the suite could not tell from a wrong one (mutants of scripts/mutants.py
that used to pass): Cohen's d with unequal run counts, the checksum covering ``meta``, ``ablate reset``
clearing a failure, and kohya's alpha divided by the rank (rank-4 files made by peft).

``ABLATE_UPDATE_GOLDEN=1`` with peft and diffusers importable regenerates the rank-4 kohya files
(tests/golden/kohya_rank4/) and peft's own numbers for them (tests/golden/kohya_rank4.json); neither
library is needed to run the tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ablation_cli.config import SplitConfig
from ablation_cli.data.folders import FolderSource
from ablation_cli.durable import atomic_write_json, read_sealed, seal
from ablation_cli.reports.tables import _welch
from ablation_cli.status import build_status
from ablation_cli.store import ExperimentStore, verify
from ablation_cli.workspace import Workspace
from tests.conftest import TINY_DEMO, tiny_config

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ABLATE_UPDATE_GOLDEN") == "1"


# -- Cohen's d and Welch's test with unequal run counts -------------------------------------------

def test_cohens_d_pools_each_variance_with_its_own_degrees_of_freedom():
    a = [0.50, 0.52, 0.60]  # 3 runs: mean 0.54, sample variance 0.0056 / 2 = 0.0028
    b = [0.40, 0.42, 0.41, 0.45, 0.30]  # 5 runs: mean 0.396, sample variance 0.01292 / 4 = 0.00323
    pooled = math.sqrt((2 * 0.0028 + 4 * 0.00323) / (3 + 5 - 2))  # (na-1) va + (nb-1) vb over na + nb - 2
    p, d = _welch(a, b)
    assert p is not None and d is not None
    assert d == pytest.approx((0.54 - 0.396) / pooled, rel=1e-12)
    assert d == pytest.approx(2.5918963262203856, rel=1e-12)  # weights swapped: 2.6543
    # Welch: t = 0.144 / sqrt(0.0028/3 + 0.00323/5), Welch-Satterthwaite degrees of freedom (4.62), two-sided
    from scipy import stats

    se2a, se2b = 0.0028 / 3, 0.00323 / 5
    t = 0.144 / math.sqrt(se2a + se2b)
    df = (se2a + se2b) ** 2 / (se2a**2 / 2 + se2b**2 / 4)
    assert p == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    assert p == pytest.approx(0.017389756716276183, rel=1e-9)  # Student's equal-variance test: 0.0121
    p_back, d_back = _welch(b, a)
    assert (p_back, d_back) == (pytest.approx(p), pytest.approx(-d))


# -- the checksum of a sealed checkpoint covers its meta ------------------------------------------

def cell_doc(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"representation": "stats", "layer_config": "all_layers", "num_runs": 2, "per_run_results": [],
            "test_acc_mean": 0.5, "meta": {**fingerprint, "created_at": "2026-01-01T00:00:00+00:00"}}


@pytest.mark.parametrize("edit", [
    pytest.param(lambda meta: meta["config"].update(dropout=0.3), id="config"),
    pytest.param(lambda meta: meta["code"].update(protocol_version=0), id="code"),
    pytest.param(lambda meta: meta.update(created_at="2020-01-01T00:00:00+00:00"), id="created_at"),
])
def test_editing_a_checkpoints_meta_makes_it_corrupt(tmp_path, edit):
    fingerprint = {"fingerprint": "abc", "config": {"dropout": 0.5}, "dataset": {"dataset": "d"},
                   "code": {"protocol_version": 1}}
    store = ExperimentStore(tmp_path)
    store.write_cell("all_layers_stats", cell_doc(fingerprint))
    path = store.cell_path("all_layers_stats")
    assert verify(path, "cell", fingerprint).state == "ok"
    doc = json.loads(path.read_text())
    edit(doc["meta"])  # the fingerprint digest itself is left as it was: only the checksum can tell
    path.write_text(json.dumps(doc))
    verdict = verify(path, "cell", fingerprint)
    assert (verdict.state, verdict.reason) == ("corrupt", "checksum mismatch (file was modified or damaged)")
    assert read_sealed(path) is None


def test_read_sealed_rejects_an_edited_meta(tmp_path):
    path = tmp_path / "entry.json"
    atomic_write_json(path, seal({"shape": [3, 4], "meta": {"representation": "stats", "version": 1}}))
    assert read_sealed(path) is not None
    doc = json.loads(path.read_text())
    doc["meta"]["version"] = 2
    path.write_text(json.dumps(doc))
    assert read_sealed(path) is None


# -- `ablate reset` removes a failed cell's failure record ----------------------------------------

def test_reset_of_a_failed_cell_removes_its_failure_record(tmp_path):
    from typer.testing import CliRunner

    from ablation_cli.cli import app
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.executors.local import LocalExecutor
    from ablation_cli.orchestrator import Orchestrator

    def failing(data, params, seeds, **kwargs):
        raise RuntimeError("bug in training")

    cfg = tiny_config(representations=["simple_stats"])
    store = ExperimentStore(tmp_path / "exp")
    workspace = Workspace(DemoSource(name="tinydemo", **TINY_DEMO), cfg.split, None, cfg.device)
    outcome = Orchestrator(cfg, workspace, store, LocalExecutor(failing)).run()
    assert set(outcome.failed) == {"all_layers_simple_stats", "visual_only_simple_stats"}
    assert store.failure_path("visual_only_simple_stats").exists()

    result = CliRunner().invoke(app, ["reset", "--rep", "simple_stats", "--layer-config", "visual_only", "--yes",
                                      "--output-dir", str(store.root)])
    assert result.exit_code == 0, result.output
    assert "visual_only_simple_stats: 1 file(s)" in result.output
    assert not store.failure_path("visual_only_simple_stats").exists()
    assert store.read_failure("visual_only_simple_stats") is None
    states = {c["id"]: c["state"] for c in build_status(store)["cells"]}
    assert states == {"all_layers_simple_stats": "failed", "visual_only_simple_stats": "pending"}


# -- kohya alpha: the scale of dW = up @ down is alpha / rank -------------------------------------

KOHYA_RANK4 = GOLDEN / "kohya_rank4"
KOHYA_RANK4_PEFT = GOLDEN / "kohya_rank4.json"
RANK, LORA_ALPHA = 4, 8  # peft's scale alpha / r = 2: neither 1 (rank-1 files with alpha 1) nor alpha


def make_rank4_kohya(out: Path) -> dict[str, Any]:
    """Three rank-4 LoRAs (lora_alpha 8) on to_q of the tiny SD1.5-shaped UNet of scripts/make_fixtures.py,
    trained a few steps by peft, saved in kohya's layout through diffusers' ``convert_state_dict_to_kohya``;
    and peft's own ``get_delta_weight`` of every module, reduced to its singular values and norm.

    diffusers' conversion writes ``alpha = r`` (``len(lora_down)``: scale 1, peft's lora_alpha dropped); the
    alpha written here is peft's lora_alpha, as kohya's sd-scripts writes its network_alpha, so each file
    means the same dW as the peft model it came from."""
    import diffusers
    import peft
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from scripts.make_fixtures import tiny_sd15_unet

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    reference: dict[str, Any] = {"rank": RANK, "lora_alpha": LORA_ALPHA, "made_with": {
        "peft": peft.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}, "loras": {}}
    labels = []
    for i, label in enumerate(("airplane", "bird", "cat")):
        unet = tiny_sd15_unet()
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=["to_q"],
                                    init_lora_weights="gaussian"))
        gen = torch.Generator().manual_seed(300 + i)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):  # up (lora_B) starts at zero: a few steps make dW non-zero
            x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
            loss = torch.nn.functional.mse_loss(unet(x, torch.tensor([10, 20]), text).sample, torch.randn_like(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
        for key in [k for k in kohya if k.endswith(".alpha")]:
            assert int(kohya[key]) == RANK  # what diffusers writes
            kohya[key] = torch.tensor(float(LORA_ALPHA))
        sid = f"lora-{i:02d}"
        save_file({k: v.detach().contiguous() for k, v in kohya.items()}, str(out / f"{sid}.safetensors"))
        labels.append(f"{sid}.safetensors,{label}")
        modules = {}
        with torch.no_grad():
            for name, module in unet.named_modules():
                if hasattr(module, "get_delta_weight"):
                    assert module.scaling["default"] == LORA_ALPHA / RANK
                    delta = module.get_delta_weight("default").double().numpy()
                    modules[name] = {"s": np.linalg.svd(delta, compute_uv=False)[:RANK].tolist(),
                                     "fro": float(np.linalg.norm(delta))}
        reference["loras"][sid] = modules
    (out / "labels.csv").write_text("file,label\n" + "\n".join(labels) + "\n")
    return reference


def test_kohya_rank4_scale_is_alpha_over_rank(tmp_path):
    if UPDATE:
        pytest.importorskip("peft")
        pytest.importorskip("diffusers")
        KOHYA_RANK4_PEFT.write_text(json.dumps(make_rank4_kohya(KOHYA_RANK4), indent=1) + "\n")
    reference = json.loads(KOHYA_RANK4_PEFT.read_text())
    root = shutil.copytree(KOHYA_RANK4, tmp_path / "kohya_rank4")  # nothing is written beside the fixture
    source = FolderSource(root)
    table = source.load()
    assert source.describe().details["key_style"] == "kohya"
    assert {table.weights[la].shape[1] for la in table.layers if la.endswith(".down")} == {RANK}
    assert {float(a) for arr in table.alphas.values() for a in arr} == {float(LORA_ALPHA)}

    ws = Workspace(FolderSource(root), SplitConfig(), None)
    layers = ws.index.layers
    x = ws.features("delta_spectral", layers)
    col = {name: k for k, name in enumerate(ws.columns("delta_spectral", layers))}
    assert len(col) == 32 * 12 and list(ws.index.sample_ids) == sorted(reference["loras"])
    for i, sid in enumerate(ws.index.sample_ids):
        for module, want in reference["loras"][sid].items():
            got_s = [x[i, col[f"{module}/s{k}"]] for k in range(1, 11)]
            np.testing.assert_allclose(got_s, [*want["s"], *[0.0] * 6], rtol=1e-5, atol=1e-6)
            assert x[i, col[f"{module}/fro"]] == pytest.approx(want["fro"], rel=1e-5)
            assert x[i, col[f"{module}/nuclear"]] == pytest.approx(sum(want["s"]), rel=1e-5)
