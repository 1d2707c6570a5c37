"""Qwen2/Qwen2.5 (q/k/v bias only) and Qwen3 (per-head q/k RMSNorm, head_dim != hidden/heads) from
Hugging Face folders, with the sliding window on for the upper layer and yarn RoPE scaling, on
sequences longer than the window: forward, cache, greedy/beam against transformers, export back."""
import pytest

import zenlm
from family_checks import build, check_all

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              initializer_range=0.2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
              rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                               "original_max_position_embeddings": 32})


def test_qwen2_matches_transformers(tmp_path):
    hf = build(transformers, "Qwen2Config", "Qwen2ForCausalLM", tmp_path / "hf", **COMMON)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None and hf.model.layers[0].self_attn.o_proj.bias is None
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert (c.qkv_bias, c.bias, c.sliding_window, c.layer_types) == (
        True, False, 8, ["full_attention", "sliding_attention"])
    print("qwen2:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_qwen3_matches_transformers(tmp_path):
    hf = build(transformers, "Qwen3Config", "Qwen3ForCausalLM", tmp_path / "hf", head_dim=32, **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.qk_norm and ours.config.head_dim == 32 != 64 // 4
    print("qwen3:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_qwen3_tied_without_window(tmp_path):
    """Qwen3-0.6B's shape: tied embeddings, no window, plain RoPE."""
    config = {k: v for k, v in COMMON.items() if k not in ("use_sliding_window", "sliding_window", "rope_parameters")}
    hf = build(transformers, "Qwen3Config", "Qwen3ForCausalLM", tmp_path / "hf", head_dim=24,
               tie_word_embeddings=True, **config)
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.tie_word_embeddings and ours.config.sliding_window is None
    print("qwen3 tied:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))
