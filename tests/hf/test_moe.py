"""Mixtures of experts from Hugging Face folders: Mixtral (top-2 of 4 experts, renormalised, a sliding window
on every layer), Qwen2-MoE (q/k/v bias, a shared expert behind a sigmoid gate, norm_topk_prob off, a dense
first layer via mlp_only_layers, a window on one layer, yarn RoPE) and Qwen3-MoE (q/k norm, explicit
head_dim, norm_topk_prob on, a window on every layer): forward on a padded batch longer than the window,
cached decoding, greedy and beam-4 against transformers' generate(), export back to transformers."""
import pytest
import torch

import zenlm
from family_checks import build, check_all, padded_batch
from zenlm.model import MLP, MoE

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
              num_experts_per_tok=2)
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def _routes_vary(model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The batch reaches every expert of every MoE layer: a test whose tokens all went to the same two
    experts would not tell the routing apart from a dense MLP."""
    chosen, hooks = [], []
    for block in model.decoder.layers:
        if isinstance(block.mlp, MoE):
            k = block.mlp.top_k
            hooks.append(block.mlp.router.register_forward_hook(
                lambda mod, args, out, k=k: chosen.append(out.topk(k, dim=-1).indices)))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    assert chosen and all(set(c.flatten().tolist()) == set(range(model.config.num_experts)) for c in chosen)


def test_mixtral_matches_transformers(tmp_path):
    hf = build(transformers, "MixtralConfig", "MixtralForCausalLM", tmp_path / "hf", num_local_experts=4,
               sliding_window=8, **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert (c.num_experts, c.experts_per_token, c.normalize_expert_weights, c.shared_expert_size) == (4, 2, True, 0)
    assert c.sliding_window == 8 and all(isinstance(b.mlp, MoE) for b in ours.decoder.layers)
    _routes_vary(ours, *padded_batch())
    print("mixtral:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_qwen2_moe_shared_expert_and_dense_layer_match_transformers(tmp_path):
    hf = build(transformers, "Qwen2MoeConfig", "Qwen2MoeForCausalLM", tmp_path / "hf", num_experts=4,
               moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
               mlp_only_layers=[0], use_sliding_window=True, sliding_window=8, max_window_layers=2,
               layer_types=["full_attention", "sliding_attention"], rope_parameters=YARN, **COMMON)
    assert hasattr(hf.model.layers[1].mlp, "shared_expert_gate") and not hasattr(hf.model.layers[0].mlp, "gate")
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert (c.num_experts, c.expert_intermediate_size, c.shared_expert_size, c.normalize_expert_weights,
            c.dense_layers, c.qkv_bias) == (4, 32, 48, False, [0], True)
    assert isinstance(ours.decoder.layers[0].mlp, MLP) and isinstance(ours.decoder.layers[1].mlp, MoE)
    _routes_vary(ours, *padded_batch())
    assert c.layer_types == ["full_attention", "sliding_attention"] and c.rope_scaling["rope_type"] == "yarn"
    print("qwen2-moe:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_qwen3_moe_matches_transformers(tmp_path):
    hf = build(transformers, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", tmp_path / "hf", num_experts=4,
               moe_intermediate_size=32, norm_topk_prob=True, head_dim=32, use_sliding_window=True,
               sliding_window=8, **COMMON)
    ours = zenlm.load(tmp_path / "hf")
    c = ours.config
    assert (c.num_experts, c.expert_intermediate_size, c.normalize_expert_weights, c.qk_norm, c.head_dim) == (
        4, 32, True, True, 32)
    assert c.sliding_window == 8 and c.layer_types is None and c.dense_layers is None
    _routes_vary(ours, *padded_batch())
    print("qwen3-moe:", check_all(transformers, hf, tmp_path / "hf", tmp_path / "out"))


def test_moe_settings_zenlm_cannot_honour_are_errors(tmp_path):
    h = dict(model_type="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
        zenlm.hf.config_from_hf(dict(h, router_jitter_noise=0.1))
    with pytest.raises(ValueError, match=r"experts_per_token must be in \[1, num_experts=4\], got 5"):
        zenlm.hf.config_from_hf(dict(h, num_experts_per_tok=5))
    with pytest.raises(ValueError, match="num_experts=0"):
        zenlm.hf.config_from_hf(dict(h, model_type="qwen3_moe", num_experts=0))
    with pytest.raises(ValueError, match="dense_layers holds 7; layers are 0..1"):
        zenlm.TransformerConfig.from_preset("tiny", num_decoder_layers=2, num_experts=4, dense_layers=[7])
    with pytest.raises(ValueError, match="needs a decoder-only model"):
        zenlm.TransformerConfig.from_preset("tiny-seq2seq", num_experts=4)


def test_flops_per_token_count_the_experts_a_token_runs():
    """Training-cost estimates count k of the E experts per token (plus the router), not all of them."""
    from zenlm.config import estimate_costs

    base = zenlm.TransformerConfig.from_preset("tiny", num_decoder_layers=3, num_experts=2, experts_per_token=2,
                                               expert_intermediate_size=48, dense_layers=[0])
    wide = base.replace(num_experts=8)
    assert wide.num_parameters() > base.num_parameters() + 6 * 2 * 128 * 48 * 3  # 6 more experts in 2 layers
    extra_router = 2 * 2 * 128 * (8 - 2)  # 2 FLOPs per weight, 2 MoE layers, 6 more router rows of 128
    assert (estimate_costs(wide, seq_len=64)["forward_flops_per_token"]
            - estimate_costs(base, seq_len=64)["forward_flops_per_token"]) == extra_router


def test_qwen_moe_hub_configs_map_like_transformers_reads_them():
    """Hub config.json files predate layer_types: Qwen2-MoE's own rule picks the sliding layers, and
    decoder_sparse_step / mlp_only_layers the dense ones; transformers' config class is the reference."""
    h = dict(model_type="qwen2_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             num_hidden_layers=6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, use_sliding_window=True, sliding_window=8, max_window_layers=4,
             decoder_sparse_step=2, mlp_only_layers=[3])
    ref = transformers.Qwen2MoeConfig(**{k: v for k, v in h.items() if k != "model_type"})
    c = zenlm.hf.config_from_hf(h)
    assert c.layer_types == ref.layer_types and "sliding_attention" in c.layer_types
    moe = [i not in ref.mlp_only_layers and (i + 1) % ref.decoder_sparse_step == 0 for i in range(6)]
    assert [c.is_moe(i) for i in range(6)] == moe == [False, True, False, False, False, True]
