"""Llama: a pre-norm decoder with RMSNorm, rotary positions, grouped KV heads and a gated MLP
(SwiGLU); q|k|v and gate|up are fused into one tensor each on the way in and split on the way out.
HF stores q and k already in the rotate-half layout our rotary uses, so no permutation is needed.
"""
from __future__ import annotations

from ...config import TransformerConfig
from ..family import Family, activation_from_hf


def _llama_from_hf(h: dict, names: set[str]) -> dict:
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"llama: rope_type {kind!r} is not supported; supported: 'default'")
    heads, width = h.get("num_attention_heads", 32), h.get("hidden_size", 4096)
    if h.get("head_dim") not in (None, width // heads):
        raise ValueError(f"llama: head_dim={h['head_dim']} is not hidden_size/num_attention_heads={width // heads}")
    if bool(h.get("mlp_bias", False)) != bool(h.get("attention_bias", False)):
        raise ValueError(f"llama: mlp_bias={h.get('mlp_bias')} differs from attention_bias={h.get('attention_bias')}; "
                         "zenlm has one bias flag")
    out = dict(activation=activation_from_hf(h.get("hidden_act", "silu"), "llama", {"silu": "swiglu", "gelu": "geglu"}),
               rope_theta=float(rope.get("rope_theta", h.get("rope_theta", 10000.0))))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(h.get(key), list):  # Llama 3 lists several end tokens; the first is the main one
            out[key] = h[key][0]
    return out


def _llama_to_hf(c: TransformerConfig) -> dict:
    return dict(hidden_act={"swiglu": "silu", "geglu": "gelu"}.get(c.activation, c.activation), head_dim=c.head_dim,
                mlp_bias=c.bias, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                rope_theta=c.rope_theta)


_LLAMA_LAYER = "model.layers.{n}."
LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM", base_architecture="LlamaModel", prefix="model.",
    fields=dict(vocab_size=("vocab_size", 32000), hidden_size=("hidden_size", 4096),
                intermediate_size=("intermediate_size", 11008), num_attention_heads=("num_attention_heads", 32),
                num_key_value_heads=("num_key_value_heads", None), num_decoder_layers=("num_hidden_layers", 32),
                max_position_embeddings=("max_position_embeddings", 2048), norm_eps=("rms_norm_eps", 1e-6),
                attention_dropout=("attention_dropout", 0.0), bias=("attention_bias", False),
                initializer_range=("initializer_range", 0.02), bos_token_id=("bos_token_id", 1),
                eos_token_id=("eos_token_id", 2), pad_token_id=("pad_token_id", None),
                tie_word_embeddings=("tie_word_embeddings", False)),
    fixed=dict(num_encoder_layers=0, pre_norm=True, norm="rmsnorm", position="rotary", position_offset=0,
               scale_embedding=False, embedding_norm=False, final_norm=True, type_vocab_size=0, lm_head_bias=False,
               mlm_transform=False),
    weights={
        "embed_tokens.weight": "model.embed_tokens.weight",
        **{f"decoder.layers.{{n}}.attn.qkv.{p}": tuple(f"{_LLAMA_LAYER}self_attn.{x}_proj.{p}" for x in "qkv")
           for p in ("weight", "bias")},
        **{f"decoder.layers.{{n}}.mlp.fc_in.{p}": tuple(f"{_LLAMA_LAYER}mlp.{x}_proj.{p}" for x in ("gate", "up"))
           for p in ("weight", "bias")},
        **{f"decoder.layers.{{n}}.{ours}.{p}": f"{_LLAMA_LAYER}{theirs}.{p}" for p in ("weight", "bias")
           for ours, theirs in (("attn.out", "self_attn.o_proj"), ("mlp.fc_out", "mlp.down_proj"))},
        "decoder.layers.{n}.attn_norm.weight": f"{_LLAMA_LAYER}input_layernorm.weight",
        "decoder.layers.{n}.mlp_norm.weight": f"{_LLAMA_LAYER}post_attention_layernorm.weight",
        "decoder.final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    config_from_hf=_llama_from_hf, config_to_hf=_llama_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
