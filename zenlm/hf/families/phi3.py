"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with q|k|v and gate|up stored fused (``qkv_proj``,
``gate_up_proj``: already our layout), RoPE on the first ``partial_rotary_factor`` of each head
(Phi-4-mini: 0.75) with ``longrope`` scaling (short factors up to the pretraining length
``original_max_position_embeddings``, long ones past it), and an optional sliding window on every layer."""
from __future__ import annotations

from ...config import TransformerConfig
from ..family import Family
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights


def _phi3_from_hf(h: dict, names: set[str]) -> dict:
    out = decoder_config(h, "phi3", names)
    if h.get("sliding_window") is not None:
        out["sliding_window"] = h["sliding_window"]
    if h.get("embd_pdrop"):
        raise ValueError(f"phi3: embd_pdrop={h['embd_pdrop']} is not supported (zenlm drops out inside the layers only)")
    return out


def _phi3_to_hf(c: TransformerConfig) -> dict:
    out = dict(decoder_config_to_hf(c), sliding_window=c.sliding_window, embd_pdrop=0.0,
               original_max_position_embeddings=(c.rope_scaling or {}).get("original_max_position_embeddings",
                                                                           c.max_position_embeddings))
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


PHI3 = Family(
    model_type="phi3", architecture="Phi3ForCausalLM", base_architecture="Phi3Model", prefix="model.",
    fields=dict(decoder_fields(vocab_size=32064, hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, eos_token_id=32000, pad_token_id=32000),
                dropout=("resid_pdrop", 0.0)),
    fixed=dict(DECODER_FIXED, bias=False, layer_types=None),
    weights=llama_weights(fused_qkv=True, fused_gate_up=True),
    config_from_hf=_phi3_from_hf, config_to_hf=_phi3_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
