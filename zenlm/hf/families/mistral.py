"""Mistral: the Llama layout with a sliding window on every layer (v0.1: 4096; later releases set
``sliding_window`` to null) and an explicit head_dim (Mistral NeMo: 128 with hidden 5120 / 32 heads).
Decoding keeps about two windows of keys per layer (``KVCache(trim_windows=True)``)."""
from __future__ import annotations

from ...config import TransformerConfig
from ..family import Family
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights


def _mistral_from_hf(h: dict, names: set[str]) -> dict:
    out = decoder_config(h, "mistral", names)
    if h.get("sliding_window") is not None:
        out["sliding_window"] = h["sliding_window"]
    return out


def _mistral_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), sliding_window=c.sliding_window)


MISTRAL = Family(
    model_type="mistral", architecture="MistralForCausalLM", base_architecture="MistralModel", prefix="model.",
    fields=decoder_fields(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072),
    fixed=dict(DECODER_FIXED, bias=False, layer_types=None),
    weights=llama_weights(),
    config_from_hf=_mistral_from_hf, config_to_hf=_mistral_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
