"""Qwen2 / Qwen2.5 and Qwen3: the Llama layout with Qwen's own switches. Qwen2 has a bias on the
q/k/v projections only (none on the output projection or the MLP); Qwen3 drops it and RMS-normalises
each query and key head before RoPE (``q_norm``/``k_norm``), with an explicit head_dim that need not be
hidden/heads. Both may run the layers from ``max_window_layers`` on with a sliding window
(``use_sliding_window``; transformers 5 lists ``layer_types``); long-context Qwen2.5 uses yarn.
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import Family
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights


def window_from_hf(h: dict, family: str) -> dict[str, Any]:
    """Qwen's sliding window: on only with use_sliding_window, for the layers ``layer_types`` marks
    (else those from max_window_layers on)."""
    window = h.get("sliding_window") if h.get("use_sliding_window") else None
    if window is None:
        return {}
    layers = h.get("num_hidden_layers", 32)
    types = h.get("layer_types") or ["sliding_attention" if i >= h.get("max_window_layers", 28) else "full_attention"
                                     for i in range(layers)]
    if "sliding_attention" not in types:
        return {}
    return dict(sliding_window=window, layer_types=list(types))


def window_to_hf(c: TransformerConfig) -> dict[str, Any]:
    if c.sliding_window is None:
        return dict(use_sliding_window=False, sliding_window=None)
    types = c.layer_types or ["sliding_attention"] * c.num_decoder_layers
    first = types.index("sliding_attention")
    return dict(use_sliding_window=True, sliding_window=c.sliding_window, layer_types=types, max_window_layers=first)


def _qwen2_from_hf(h: dict, names: set[str]) -> dict:
    return dict(decoder_config(h, "qwen2", names), **window_from_hf(h, "qwen2"))


def _qwen2_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), **window_to_hf(c))


def _qwen3_from_hf(h: dict, names: set[str]) -> dict:
    if h.get("attention_bias"):
        raise ValueError("qwen3: attention_bias=True is not supported (a bias on q/k/v and the output projection "
                         "but not the MLP; zenlm has q/k/v-only or everywhere)")
    return dict(decoder_config(h, "qwen3", names), **window_from_hf(h, "qwen3"))


def _qwen3_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), attention_bias=False, **window_to_hf(c))


_QWEN_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      max_position_embeddings=32768, bos_token_id=None, eos_token_id=None)

QWEN2 = Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM", base_architecture="Qwen2Model", prefix="model.",
    fields=decoder_fields(**_QWEN_DEFAULTS),
    fixed=dict(DECODER_FIXED, bias=False, qkv_bias=True, qk_norm=False),
    weights=llama_weights(),
    config_from_hf=_qwen2_from_hf, config_to_hf=_qwen2_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)

QWEN3 = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM", base_architecture="Qwen3Model", prefix="model.",
    fields=decoder_fields(**_QWEN_DEFAULTS),
    fixed=dict(DECODER_FIXED, bias=False, qkv_bias=None, qk_norm=True),
    weights=llama_weights(qk_norm=True),
    config_from_hf=_qwen3_from_hf, config_to_hf=_qwen3_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
