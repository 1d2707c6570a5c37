"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's choices, each a flag of the one model:
embeddings scaled by sqrt(hidden), RMSNorm scaling by (1 + weight), a GeGLU MLP with tanh GELU, norms
before *and* after attention and the MLP, scores scaled by 1/sqrt(query_pre_attn_scalar), sliding-window
and global layers alternating (``layer_types``). Gemma 2 soft-caps attention scores and final logits
(c·tanh(x/c)); Gemma 3 drops the caps, RMS-normalises each query/key head and gives its sliding layers
their own RoPE base (``rope_local_base_freq``; transformers 5 nests ``rope_parameters`` per layer type).
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import Family, activation_from_hf, first_tokens_from_hf, require_off, rope_from_hf, rope_to_hf
from .llama import DECODER_FIXED, decoder_fields, llama_weights

_GELU_TANH = {"gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh", "gelu_fast": "geglu_tanh",
              "gelu": "geglu"}


def _gemma_from_hf(family: str, pattern: int):
    def convert(h: dict, names: set[str]) -> dict:
        if h.get("attention_bias"):
            raise ValueError(f"{family}: attention_bias=True is not supported (zenlm's Gemma has no biases)")
        require_off(h, family, "use_bidirectional_attention")
        act = h.get("hidden_activation") or h.get("hidden_act") or "gelu_pytorch_tanh"
        heads, width = h.get("num_attention_heads", 8), h.get("hidden_size", 2304)
        layers = h.get("num_hidden_layers", 26)
        out: dict[str, Any] = dict(activation=activation_from_hf(act, family, _GELU_TANH),
                                   head_size=h.get("head_dim", 256),
                                   query_pre_attn_scalar=h.get("query_pre_attn_scalar", 256),
                                   attn_logit_softcap=h.get("attn_logit_softcapping"),
                                   final_logit_softcap=h.get("final_logit_softcapping"))
        if out["head_size"] == width // heads and width % heads == 0:
            out["head_size"] = None
        pattern_ = h.get("sliding_window_pattern") or h.get("_sliding_window_pattern") or pattern
        types = h.get("layer_types") or ["sliding_attention" if (i + 1) % pattern_ else "full_attention"
                                         for i in range(layers)]
        if h.get("sliding_window") is not None and "sliding_attention" in types:
            out.update(sliding_window=h["sliding_window"], layer_types=list(types))
        params = h.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one dict per layer type
            out.update(rope_from_hf(h, family, params.get("full_attention") or {}, 1_000_000.0))
            local = rope_from_hf(h, family, params.get("sliding_attention") or {}, 10_000.0)
            if "rope_scaling" in local:
                raise ValueError(f"{family}: rope_parameters.sliding_attention rope_type "
                                 f"{local['rope_scaling']['rope_type']!r} is not supported (zenlm scales the global "
                                 "layers' RoPE only)")
            out["rope_local_theta"] = local["rope_theta"]
        else:
            out.update(rope_from_hf(h, family, None, 1_000_000.0 if family == "gemma3_text" else 10_000.0))
            if family == "gemma3_text":
                out["rope_local_theta"] = float(h.get("rope_local_base_freq", 10_000.0))
        out.update(first_tokens_from_hf(h))
        return out
    return convert


def _gemma_to_hf(family: str):
    def convert(c: TransformerConfig) -> dict:
        out: dict[str, Any] = dict(
            hidden_activation={"geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu"}.get(c.activation, c.activation),
            head_dim=c.head_dim, query_pre_attn_scalar=c.query_pre_attn_scalar,
            attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap,
            sliding_window=c.sliding_window, attention_bias=False)
        if c.sliding_window is not None:
            out["layer_types"] = c.layer_types or ["sliding_attention"] * c.num_decoder_layers
        else:
            out["layer_types"] = ["full_attention"] * c.num_decoder_layers
        if family == "gemma3_text":
            local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
            out["rope_parameters"] = {"full_attention": rope_to_hf(c),
                                      "sliding_attention": rope_to_hf(c, local, {})}
        else:
            out["rope_parameters"] = rope_to_hf(c)
        return out
    return convert


_GEMMA_FIELDS = decoder_fields(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                               num_key_value_heads=4, num_hidden_layers=26, max_position_embeddings=8192,
                               pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
_GEMMA_FIXED = dict(DECODER_FIXED, scale_embedding=True, norm_unit_offset=True, sandwich_norm=True, bias=False)

GEMMA2 = Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM", base_architecture="Gemma2Model", prefix="model.",
    fields=_GEMMA_FIELDS,
    fixed=dict(_GEMMA_FIXED, qk_norm=False, rope_local_theta=None),
    weights=llama_weights(sandwich=True),
    config_from_hf=_gemma_from_hf("gemma2", 2), config_to_hf=_gemma_to_hf("gemma2"),
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)

GEMMA3 = Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM", base_architecture="Gemma3TextModel", prefix="model.",
    fields=dict(_GEMMA_FIELDS, vocab_size=("vocab_size", 262208), max_position_embeddings=("max_position_embeddings", 131072)),
    fixed=dict(_GEMMA_FIXED, qk_norm=True),
    weights=llama_weights(sandwich=True, qk_norm=True),
    config_from_hf=_gemma_from_hf("gemma3_text", 6), config_to_hf=_gemma_to_hf("gemma3_text"),
    ignore=(r".*rotary_emb\.inv_freq", r".*embed_scale"),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
