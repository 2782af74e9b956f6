import pytest

from ablation_cli.data.keys import key_style, parse_key

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"


@pytest.mark.parametrize(
    ("key", "kind", "style"),
    [
        (f"unet.{MODULE}.lora.down.weight", "down", "diffusers_old"),
        (f"unet.{MODULE}.lora.up.weight", "up", "diffusers_old"),
        (f"unet.{MODULE}.lora_A.weight", "down", "peft"),
        (f"unet.{MODULE}.lora_B.weight", "up", "peft"),
        (f"base_model.model.{MODULE}.lora_A.weight", "down", "peft"),
        (f"base_model.model.{MODULE}.lora_B.default.weight", "up", "peft"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.down.weight", "down",
         "diffusers_processor"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight", "down", "kohya"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight", "up", "kohya"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.alpha", "alpha", "kohya"),
    ],
)
def test_every_spelling_maps_to_one_canonical_module(key, kind, style):
    parsed = parse_key(key)
    assert parsed is not None
    assert (parsed.module, parsed.kind, parsed.style) == (MODULE, kind, style)


@pytest.mark.parametrize(
    ("key", "module"),
    [
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
         "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        ("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.lora.down.weight",
         "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"),
        ("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
         "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ],
)
def test_mid_block_and_to_out(key, module):
    parsed = parse_key(key)
    assert parsed is not None and parsed.module == module


@pytest.mark.parametrize("key", [
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    "unet.down_blocks.0.resnets.0.conv1.lora.down.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
    "some.random.tensor",
])
def test_other_keys_are_not_unet_attention_lora(key):
    assert parse_key(key) is None


def test_key_style():
    assert key_style([f"base_model.model.{MODULE}.lora_A.weight"]) == "peft"
    assert key_style([f"unet.{MODULE}.lora_A.weight"]) == "diffusers"
    assert key_style([f"unet.{MODULE}.lora.down.weight", "lora_unet_x.alpha"]) == "diffusers_old"
    assert key_style([f"unet.{MODULE}.lora.down.weight", f"unet.{MODULE}.lora_B.weight"]) == "mixed"
    assert key_style(["nothing"]) == "unknown"
