"""Gemma 2 and Gemma 3 (text) from Hugging Face folders: sqrt(hidden)-scaled embeddings, (1 + weight)
RMSNorm, tanh GeGLU, norms before and after each sublayer, query_pre_attn_scalar, alternating sliding
and global layers (window 8, sequences of 40); Gemma 2's attention and final-logit soft caps; Gemma 3's
q/k norms, separate local RoPE base and linear scaling on the global layers. Forward, cache, greedy and
beam against transformers; export back."""
import pytest

import zenlm
from family_checks import build, check_all

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=0.05, query_pre_attn_scalar=24, sliding_window=8,
              hidden_activation="gelu_pytorch_tanh")


def test_gemma2_matches_transformers(tmp_path):
    hf = build(transformers, "Gemma2Config", "Gemma2ForCausalLM", tmp_path / "hf", attn_logit_softcapping=1.0,
               final_logit_softcapping=0.5, **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert (c.layer_types, c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar) == (
        ["sliding_attention", "full_attention"], 1.0, 0.5, 24)
    assert c.norm_unit_offset and c.sandwich_norm and c.scale_embedding and c.activation == "geglu_tanh"
    print("gemma2:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_gemma3_matches_transformers(tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    hf = build(transformers, "Gemma3TextConfig", "Gemma3ForCausalLM", tmp_path / "hf", rope_parameters=rope,
               layer_types=["sliding_attention", "full_attention"], **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert c.qk_norm and c.rope_local_theta == 100.0 and c.rope_theta == 5000.0
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.attn_logit_softcap is None and c.final_logit_softcap is None
    print("gemma3:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_gemma3_hub_style_config_with_a_pattern_and_local_base(tmp_path):
    """Hub config.json files of Gemma 3 predate transformers 5: sliding_window_pattern, rope_theta,
    rope_local_base_freq, rope_scaling at the top level."""
    hf = build(transformers, "Gemma3TextConfig", "Gemma3ForCausalLM", tmp_path / "hf", **dict(
        COMMON, num_hidden_layers=3), rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    h = hf.config.to_dict()
    for key in ("rope_parameters", "layer_types"):
        h.pop(key)
    h.update(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None)
    c = zenlm.hf.config_from_hf(h)
    assert c.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, None)
