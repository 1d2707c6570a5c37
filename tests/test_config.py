"""TransformerConfig: validation names the value and the rule; JSON round trip; presets; costs."""
import json

import pytest

from zenlm import PRESETS, TransformerConfig, TransformerLM
from zenlm.config import estimate_costs


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_size=100, num_attention_heads=8), r"hidden_size \(100\) must be divisible by num_attention_heads \(8\)"),
    (dict(num_attention_heads=12, num_key_value_heads=5), r"num_attention_heads \(12\) must be divisible by num_key_value_heads \(5\)"),
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (dict(vocab_size=-3), "vocab_size must be a positive integer, got -3"),
    (dict(activation="mish"), "unknown activation 'mish'; valid: gelu, gelu_tanh, relu, silu, swiglu, geglu, geglu_tanh"),
    (dict(rope_scaling={"rope_type": "su", "factor": 2.0}), r"rope_scaling: rope_type 'su' is not supported; supported: "
                                                            r"linear, dynamic, llama3, yarn, longrope"),
    (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling: rope_type 'linear' needs factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 4}),
     r"rope_scaling: beta_fast=4 is not supported for rope_type 'linear'"),
    (dict(layer_types=["full_attention"] * 6, sliding_window=4, num_decoder_layers=5), "layer_types lists 6 layers"),
    (dict(layer_types=["local"] * 6, sliding_window=4), "layer_types holds 'local'; valid: full_attention, sliding_attention"),
    (dict(layer_types=["sliding_attention"] * 6), "sliding_window is None"),
    (dict(partial_rotary_factor=0.0), r"partial_rotary_factor must be in \(0, 1\], got 0.0"),
    (dict(attn_logit_softcap=-1.0), r"attn_logit_softcap must be > 0 \(or None\), got -1.0"),
    (dict(head_size=0), "head_size must be a positive integer, got 0"),
    (dict(norm="batchnorm"), "unknown norm 'batchnorm'; valid: layernorm, rmsnorm"),
    (dict(position="alibi"), "unknown position 'alibi'; valid: learned, sinusoidal, rotary, relative, none"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    (dict(attention_dropout=1.5), r"attention_dropout must be in \[0, 1\), got 1.5"),
    (dict(num_encoder_layers=0, num_decoder_layers=0), "both 0"),
    (dict(num_encoder_layers=-1), "num_encoder_layers must be an integer >= 0, got -1"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(pad_token_id=10_000), r"pad_token_id must be in \[0, vocab_size=10000\), got 10000"),
])
def test_every_validation_error_names_value_and_rule(changes, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{"vocab_size": 10000, **changes})


def test_defaults_are_the_contract_shape():
    c = TransformerConfig(vocab_size=10000, max_position_embeddings=512, num_attention_heads=8,
                          num_encoder_layers=6, num_decoder_layers=6)
    assert (c.hidden_size, c.intermediate_size, c.family) == (768, 3072, "encoder-decoder")
    assert c.num_key_value_heads == 8 and c.head_dim == 96


def test_an_explicit_head_size_need_not_divide_hidden_size(tmp_path):
    c = TransformerConfig(vocab_size=100, hidden_size=60, num_attention_heads=4, head_size=32, num_encoder_layers=0,
                          num_decoder_layers=2, position="rotary", partial_rotary_factor=0.75,
                          sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert (c.head_dim, c.rotary_dim, c.is_sliding(0), c.is_sliding(1)) == (32, 24, True, False)
    c.save(tmp_path / "config.json")
    assert TransformerConfig.load(tmp_path) == c


def test_json_round_trip(tmp_path):
    c = TransformerConfig.from_preset("llama-tiny")
    c.save(tmp_path / "config.json")
    assert TransformerConfig.load(tmp_path) == c
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["num_key_value_heads"] == 4


def test_load_rejects_unknown_keys_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hiden_size": 4}))
    with pytest.raises(ValueError, match="unknown config keys \\['hiden_size'\\]"):
        TransformerConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TransformerConfig.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_count_parameters(name):
    config = TransformerConfig.from_preset(name)
    assert config.num_parameters() > 0
    if name in ("tiny", "tiny-seq2seq", "llama-tiny"):
        model = TransformerLM(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_known_parameter_counts():
    # the published sizes of these shapes (HF: bert-base-uncased with MLM head 109.5M + head transform,
    # gpt2 124.4M); ours differ only where a head is counted
    gpt2 = TransformerConfig.from_preset("gpt2-small").num_parameters()
    assert gpt2 == 124_439_808
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        TransformerConfig.from_preset("gpt5")


def test_costs_scale_with_shape():
    tiny = estimate_costs(TransformerConfig.from_preset("tiny"), batch_size=1, seq_len=64)
    big = estimate_costs(TransformerConfig.from_preset("gpt2-small"), batch_size=1, seq_len=64)
    assert big["forward_flops_per_token"] > 20 * tiny["forward_flops_per_token"]
    assert big["training_flops_per_token"] == 3 * big["forward_flops_per_token"]
    # ~2 FLOPs per parameter per token for a model whose attention term is small at this length
    assert 2 * big["parameters"] * 0.95 < big["forward_flops_per_token"] < 2 * big["parameters"] * 1.1
    assert estimate_costs(TransformerConfig.from_preset("tiny"), 8, 64)["activations_bytes"] == 8 * tiny["activations_bytes"]
