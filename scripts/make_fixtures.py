"""Make the real-library LoRA fixtures under tests/fixtures/real (committed; a few hundred KB).

A tiny UNet with the SD1.5 block structure (diffusers' UNet2DConditionModel, random init, small
widths: the same 16 transformer blocks and module names as SD1.5), LoRA attached by peft on
to_q and to_v (rank 1), a few training steps per adapter, then the same adapters saved:

    diffusers/       <id>/pytorch_lora_weights.safetensors (+ metadata.json), diffusers'
                     save_lora_weights with its own conversion (older `lora.down` spelling)
    diffusers_new/   the same layout, PEFT-style keys (`unet.<module>.lora_A.weight`)
    kohya/           <id>.safetensors + labels.csv, diffusers' convert_state_dict_to_kohya
    peft/            <id>/adapter_model.safetensors (+ metadata.json), PeftModel.save_pretrained
    hf_dataset/      a Hugging Face `datasets` folder (save_to_disk): one Array2D column per tensor
    reference.npz    the canonical tensors every layout must load to (for the tests)

Needs: pip install torch diffusers peft datasets safetensors   (not needed to run the tests)

    python scripts/make_fixtures.py [--out tests/fixtures/real] [--num-loras 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

CLASSES = ("airplane", "bird", "cat")


def tiny_sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, attention_head_dim=2, cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def train_adapter(seed: int):
    """A fresh UNet + peft LoRA (to_q, to_v, rank 1), trained a few steps; returns the peft state dict."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_sd15_unet()
    unet.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        text = torch.randn(2, 5, 12, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(x, torch.tensor([10, 20]), text).sample, torch.randn_like(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet, get_peft_model_state_dict(unet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/real"))
    parser.add_argument("--num-loras", type=int, default=6)
    args = parser.parse_args()

    from datasets import Array2D, Dataset, Features, Value
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows: list[dict] = []
    reference: dict[str, np.ndarray] = {}
    kohya_labels = []
    for i in range(args.num_loras):
        sid, label = f"lora-{i:02d}", CLASSES[i % len(CLASSES)]
        unet, state = train_adapter(seed=100 + i)
        meta = json.dumps({"category_label": label, "rank": 1, "instance_prompt": f"a photo of sks {label}"})

        old = out / "diffusers" / sid
        StableDiffusionPipeline.save_lora_weights(old, unet_lora_layers=convert_state_dict_to_diffusers(state))
        (old / "metadata.json").write_text(meta)

        new = out / "diffusers_new" / sid
        StableDiffusionPipeline.save_lora_weights(new, unet_lora_layers=state)
        (new / "metadata.json").write_text(meta)

        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        (out / "kohya").mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(out / "kohya" / f"{sid}.safetensors"))
        kohya_labels.append(f"{sid}.safetensors,{label}")

        base = tiny_sd15_unet()
        peft_model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["to_q", "to_v"]))
        peft_model.base_model.model.load_state_dict(unet.state_dict(), strict=False)
        peft_model.save_pretrained(out / "peft" / sid)
        (out / "peft" / sid / "metadata.json").write_text(meta)

        row = {"category_label": i % len(CLASSES), "category_name": label, "rank": 1}
        for key, tensor in state.items():
            module, factor = key.rsplit(".lora_", 1)
            layer = f"{module}.{'down' if factor.startswith('A') else 'up'}"
            reference[f"{sid}/{layer}"] = tensor.detach().float().numpy()
            row[f"unet.{key}"] = tensor.detach().float().numpy()
        rows.append(row)
    (out / "kohya" / "labels.csv").write_text("file,label\n" + "\n".join(kohya_labels) + "\n")

    tensor_cols = [k for k in rows[0] if k.startswith("unet.")]
    features = Features({"category_label": Value("int64"), "category_name": Value("string"), "rank": Value("int64"),
                         **{k: Array2D(shape=rows[0][k].shape, dtype="float32") for k in tensor_cols}})
    Dataset.from_list(rows, features=features).save_to_disk(str(out / "hf_dataset"))
    np.savez_compressed(out / "reference.npz", **reference)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {args.num_loras} LoRAs in 5 layouts to {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
