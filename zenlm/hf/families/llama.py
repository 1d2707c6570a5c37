"""Llama (1, 2, 3.x): a pre-norm decoder with RMSNorm, rotary positions (and Llama 3's context
scalings: llama3, linear, dynamic, yarn), grouped KV heads and a gated MLP (SwiGLU); q|k|v and
gate|up are fused into one tensor each on the way in and split on the way out. HF stores q and k
already in the rotate-half layout our rotary uses, so no permutation is needed. Llama 3 lists
several end tokens (all of them stop generation); 3.2 1B/3B tie the output head to the embeddings.

Qwen2/3, Mistral and Phi-3 share this layout: ``llama_weights`` and ``decoder_config`` are theirs too.
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import (Family, Source, activation_from_hf, end_tokens_to_hf, first_tokens_from_hf, rope_from_hf,
                      rope_to_hf, rope_window_to_hf)


def decoder_config(h: dict, family: str, names: set[str] = frozenset()) -> dict[str, Any]:
    """What every Llama-layout family reads the same way: activation, rope (and its scaling),
    an explicit head_dim, several end tokens."""
    out: dict[str, Any] = dict(activation=activation_from_hf(h.get("hidden_act", "silu"), family,
                                                             {"silu": "swiglu", "gelu": "geglu"}))
    out.update(rope_from_hf(h, family))
    heads, width = h.get("num_attention_heads", 32), h.get("hidden_size", 4096)
    if h.get("head_dim") not in (None, width // heads):
        out["head_size"] = h["head_dim"]
    out.update(first_tokens_from_hf(h))
    return out


def decoder_config_to_hf(c: TransformerConfig) -> dict[str, Any]:
    out = dict(hidden_act={"swiglu": "silu", "geglu": "gelu"}.get(c.activation, c.activation), head_dim=c.head_dim,
               rope_parameters=rope_to_hf(c), rope_theta=c.rope_theta)
    out.update(rope_window_to_hf(c))
    out.update(end_tokens_to_hf(c))
    return out


def _llama_from_hf(h: dict, names: set[str]) -> dict:
    if bool(h.get("mlp_bias", False)) != bool(h.get("attention_bias", False)):
        raise ValueError(f"llama: mlp_bias={h.get('mlp_bias')} differs from attention_bias={h.get('attention_bias')}; "
                         "zenlm has one bias flag")
    return decoder_config(h, "llama", names)


def _llama_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), mlp_bias=c.bias)


def llama_weights(layer: str = "model.layers.{n}.", fused_qkv: bool = False, fused_gate_up: bool = False,
                  qk_norm: bool = False, sandwich: bool = False) -> dict[str, Source]:
    """The Llama tensor names (``layer`` is one layer's prefix), for the families that share them;
    Phi-3 stores q|k|v and gate|up already fused, Qwen3 and Gemma 3 have per-head q/k norms,
    Gemma 2/3 norms after attention and the MLP too."""
    out: dict[str, Source] = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for p in ("weight", "bias"):
        out[f"decoder.layers.{{n}}.attn.qkv.{p}"] = (f"{layer}self_attn.qkv_proj.{p}" if fused_qkv else
                                                     tuple(f"{layer}self_attn.{x}_proj.{p}" for x in "qkv"))
        out[f"decoder.layers.{{n}}.mlp.fc_in.{p}"] = (f"{layer}mlp.gate_up_proj.{p}" if fused_gate_up else
                                                      tuple(f"{layer}mlp.{x}_proj.{p}" for x in ("gate", "up")))
        out[f"decoder.layers.{{n}}.attn.out.{p}"] = f"{layer}self_attn.o_proj.{p}"
        out[f"decoder.layers.{{n}}.mlp.fc_out.{p}"] = f"{layer}mlp.down_proj.{p}"
    out["decoder.layers.{n}.attn_norm.weight"] = f"{layer}input_layernorm.weight"
    if sandwich:
        out["decoder.layers.{n}.attn_post_norm.weight"] = f"{layer}post_attention_layernorm.weight"
        out["decoder.layers.{n}.mlp_norm.weight"] = f"{layer}pre_feedforward_layernorm.weight"
        out["decoder.layers.{n}.mlp_post_norm.weight"] = f"{layer}post_feedforward_layernorm.weight"
    else:
        out["decoder.layers.{n}.mlp_norm.weight"] = f"{layer}post_attention_layernorm.weight"
    if qk_norm:
        out["decoder.layers.{n}.attn.q_norm.weight"] = f"{layer}self_attn.q_norm.weight"
        out["decoder.layers.{n}.attn.k_norm.weight"] = f"{layer}self_attn.k_norm.weight"
    out["decoder.final_norm.weight"] = "model.norm.weight"
    out["lm_head.weight"] = "lm_head.weight"
    return out


# the flags every Llama-layout decoder has
DECODER_FIXED = dict(num_encoder_layers=0, pre_norm=True, norm="rmsnorm", position="rotary", position_offset=0,
                     scale_embedding=False, embedding_norm=False, final_norm=True, type_vocab_size=0,
                     lm_head_bias=False, mlm_transform=False)


def decoder_fields(**defaults: Any) -> dict[str, tuple[str, Any]]:
    """The config keys Llama-layout families share (HF defaults are Llama's unless overridden)."""
    base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=None, num_hidden_layers=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                attention_dropout=0.0, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                tie_word_embeddings=False)
    base.update(defaults)
    ours = dict(num_decoder_layers="num_hidden_layers", norm_eps="rms_norm_eps")
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "num_decoder_layers", "max_position_embeddings", "norm_eps", "attention_dropout", "initializer_range",
             "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    return {name: (ours.get(name, name), base[ours.get(name, name)]) for name in names}


LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM", base_architecture="LlamaModel", prefix="model.",
    fields=dict(decoder_fields(), bias=("attention_bias", False)),
    fixed=DECODER_FIXED,
    weights=llama_weights(),
    config_from_hf=_llama_from_hf, config_to_hf=_llama_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
