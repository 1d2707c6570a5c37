"""Mistral (a sliding window on every layer, explicit head_dim) and Phi-3 / Phi-4-mini (fused qkv and
gate_up, partial rotary, longrope past the pretraining length) from Hugging Face folders, on sequences
longer than the window and the pretraining length: forward, cache, greedy/beam against transformers,
export back."""
import pytest

import zenlm
from family_checks import build, check_all, padded_batch
from zenlm.model import KVCache

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)


def test_mistral_matches_transformers(tmp_path):
    hf = build(transformers, "MistralConfig", "MistralForCausalLM", tmp_path / "hf", head_dim=24, sliding_window=8,
               **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.sliding_window == 8 and ours.config.head_dim == 24 and ours.config.layer_types is None
    print("mistral:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_mistral_decoding_keeps_about_two_windows_of_keys(tmp_path):
    hf = build(transformers, "MistralConfig", "MistralForCausalLM", tmp_path / "hf", sliding_window=8, **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    import torch

    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(capacity=256, trim_windows=True)
        steps = [ours(ids[:, :1], past_key_values=cache, use_cache=True).logits]
        for t in range(1, 60):
            steps.append(ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert all(k.size(2) <= 16 for k in cache.keys) and cache.start(0) > 40


def _phi3(folder, **extra):
    head = 64 // 4
    rotary = int(head * 0.75)
    rope = {"rope_type": "longrope", "rope_theta": 1000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(rotary // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(rotary // 2)], "original_max_position_embeddings": 20}
    config = dict(COMMON, rope_parameters=rope, original_max_position_embeddings=20, **extra)
    return build(transformers, "Phi3Config", "Phi3ForCausalLM", folder, **config)


def test_phi3_longrope_partial_rotary_matches_transformers(tmp_path):
    hf = _phi3(tmp_path / "hf", sliding_window=8)
    assert hasattr(hf.model.layers[0].self_attn, "qkv_proj") and hasattr(hf.model.layers[0].mlp, "gate_up_proj")
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert c.rope_scaling["rope_type"] == "longrope" and c.rotary_dim == 12 and c.sliding_window == 8
    # the batch (up to 60 positions) and generation (prompts of 3-13 tokens + 24) pass the pretraining
    # length 20: longrope's long factors. Generation re-encodes the sequence when it first crosses 20, as
    # transformers does; a plain cached forward does not, so cached decoding is compared within 20.
    ids, mask = padded_batch((60, 41, 52))
    print("phi3:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out", ids, mask, cache_length=20))


def test_phi4_mini_shape_tied_without_window(tmp_path):
    hf = _phi3(tmp_path / "hf", tie_word_embeddings=True)
    ours = zenlm.load(tmp_path / "hf")
    assert ours.config.tie_word_embeddings and ours.config.sliding_window is None
    ids, mask = padded_batch((60, 41, 52))
    print("phi4-mini:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out", ids, mask, cache_length=20))
