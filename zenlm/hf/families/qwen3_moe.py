"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 layout (per-head q/k RMSNorm, explicit head_dim,
no bias) with a sparse mixture of ``num_experts`` SwiGLU experts of width ``moe_intermediate_size`` in
place of the MLP, the top ``num_experts_per_tok`` per token (rescaled to sum to 1 with ``norm_topk_prob``,
which the released models set), no shared expert. ``use_sliding_window`` windows every layer.
"""
from __future__ import annotations

from ...config import TransformerConfig
from ..family import Family
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights
from .mixtral import moe_weights
from .qwen2_moe import moe_config_from_hf, moe_config_to_hf


def _qwen3_moe_from_hf(h: dict, names: set[str]) -> dict:
    if h.get("attention_bias"):
        raise ValueError("qwen3_moe: attention_bias=True is not supported (a bias on q/k/v and the output "
                         "projection but not the MLP; zenlm has q/k/v-only or everywhere)")
    out = dict(decoder_config(h, "qwen3_moe", names), **moe_config_from_hf(h, "qwen3_moe", dict(
        num_experts=128, moe_intermediate_size=768, intermediate_size=6144)))
    if h.get("use_sliding_window") and h.get("sliding_window") is not None:
        out["sliding_window"] = h["sliding_window"]
    return out


def _qwen3_moe_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), **moe_config_to_hf(c), attention_bias=False,
                use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window)


QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", base_architecture="Qwen3MoeModel", prefix="model.",
    fields=decoder_fields(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_key_value_heads=4,
                          num_hidden_layers=24, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    fixed=dict(DECODER_FIXED, bias=False, qkv_bias=None, qk_norm=True, layer_types=None, shared_expert_size=0),
    weights={**llama_weights(qk_norm=True), **moe_weights("mlp")},
    config_from_hf=_qwen3_moe_from_hf, config_to_hf=_qwen3_moe_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
