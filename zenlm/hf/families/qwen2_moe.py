"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 layout (q/k/v bias only) with a sparse mixture of
experts in place of the MLP: ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, the top
``num_experts_per_tok`` per token (their softmax weights rescaled to sum to 1 only with
``norm_topk_prob``), plus a shared expert every token goes through, scaled by sigmoid(w·x). Layers in
``mlp_only_layers`` (and, with ``decoder_sparse_step`` > 1, those off the step) keep a dense MLP of
``intermediate_size``: our ``dense_layers``.
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import Family
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights
from .mixtral import experts_from_hf, moe_weights
from .qwen import window_from_hf, window_to_hf


def dense_layers_from_hf(h: dict) -> dict[str, Any]:
    """Qwen's rule for the layers that keep a dense MLP: listed in mlp_only_layers, or off decoder_sparse_step."""
    step = h.get("decoder_sparse_step", 1) or 1
    only = set(h.get("mlp_only_layers") or ())
    dense = [i for i in range(h.get("num_hidden_layers", 24)) if i in only or (i + 1) % step]
    return dict(dense_layers=dense or None)


def moe_config_from_hf(h: dict, family: str, defaults: dict[str, int]) -> dict[str, Any]:
    """The Qwen-MoE keys both generations share (``defaults``: the HF class's num_experts,
    moe_intermediate_size and intermediate_size); an expert as wide as the dense MLP is ours by default."""
    width = h.get("moe_intermediate_size", defaults["moe_intermediate_size"])
    same = width == h.get("intermediate_size", defaults["intermediate_size"])
    return dict(experts_from_hf(h, family, defaults["num_experts"]), expert_intermediate_size=None if same else width,
                normalize_expert_weights=bool(h.get("norm_topk_prob", False)), **dense_layers_from_hf(h))


def moe_config_to_hf(c: TransformerConfig) -> dict[str, Any]:
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.experts_per_token,
                moe_intermediate_size=c.expert_intermediate_size or c.intermediate_size,
                norm_topk_prob=c.normalize_expert_weights, decoder_sparse_step=1, mlp_only_layers=c.dense_layers or [])


def _qwen2_moe_from_hf(h: dict, names: set[str]) -> dict:
    if h.get("use_sliding_window") and not h.get("layer_types"):  # Qwen2-MoE's own default: every other
        h = dict(h, layer_types=["sliding_attention" if (i + 1) % 2 and i < h.get("max_window_layers", 28)
                                 else "full_attention" for i in range(h.get("num_hidden_layers", 24))])
    return dict(decoder_config(h, "qwen2_moe", names), **window_from_hf(h, "qwen2_moe"),
                **moe_config_from_hf(h, "qwen2_moe", dict(num_experts=60, moe_intermediate_size=1408,
                                                          intermediate_size=5632)),
                shared_expert_size=h.get("shared_expert_intermediate_size", 5632))


def _qwen2_moe_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), **window_to_hf(c), **moe_config_to_hf(c),
                shared_expert_intermediate_size=c.shared_expert_size)


QWEN2_MOE = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", base_architecture="Qwen2MoeModel", prefix="model.",
    fields=dict(decoder_fields(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                               num_key_value_heads=16, num_hidden_layers=24, max_position_embeddings=32768,
                               bos_token_id=None, eos_token_id=None),
                qkv_bias=("qkv_bias", True)),
    fixed=dict(DECODER_FIXED, bias=False, qk_norm=False),
    weights={**llama_weights(), **moe_weights("mlp", shared=True)},
    config_from_hf=_qwen2_moe_from_hf, config_to_hf=_qwen2_moe_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
