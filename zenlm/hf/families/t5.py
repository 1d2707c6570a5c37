"""T5 (v1.0: ``feed_forward_proj="relu"``, one ``wi`` matrix) and T5 v1.1 / Flan-T5 (gated-gelu: ``wi_0`` for
the gate, ``wi_1`` for the up projection): a pre-norm encoder-decoder with
RMSNorm (no bias anywhere), no position embeddings but a learned bias per head for each bucket of
key − query distance (``relative_attention_num_buckets``, ``relative_attention_max_distance``; the first
layer of each stack holds it, every layer adds it: ours lives on the stack), unscaled attention scores
(``query_pre_attn_scalar=1``), one embedding shared by both stacks. The output head is the embedding
unless the folder holds its own ``lm_head.weight`` (Flan-T5 does); with ``scale_decoder_outputs`` (the
original T5's tied head) the logits are scaled by d_model^-0.5.
"""
from __future__ import annotations

from typing import Any

from ...config import GATED, TransformerConfig
from ..family import Family, Source

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu_tanh", "gated-gelu_new": "geglu_tanh",
                "gated-silu": "swiglu"}
_TO_HF = {"relu": "relu", "gelu": "gelu", "geglu_tanh": "gated-gelu", "swiglu": "gated-silu"}


def _t5_weights() -> dict[str, Source]:
    out: dict[str, Source] = {"embed_tokens.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack, mlp in (("encoder", 1), ("decoder", 2)):
        layer, ours = f"{stack}.block.{{n}}.layer.", f"{stack}.layers.{{n}}."
        out[f"{stack}.relative_bias.weight"] = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[f"{stack}.final_norm.weight"] = f"{stack}.final_layer_norm.weight"
        out[f"{ours}attn.qkv.weight"] = tuple(f"{layer}0.SelfAttention.{x}.weight" for x in "qkv")
        out[f"{ours}attn.out.weight"] = f"{layer}0.SelfAttention.o.weight"
        out[f"{ours}attn_norm.weight"] = f"{layer}0.layer_norm.weight"
        out[f"{ours}mlp.fc_in.weight"] = (f"{layer}{mlp}.DenseReluDense.wi_0.weight",
                                          f"{layer}{mlp}.DenseReluDense.wi_1.weight")
        out[f"{ours}mlp.fc_out.weight"] = f"{layer}{mlp}.DenseReluDense.wo.weight"
        out[f"{ours}mlp_norm.weight"] = f"{layer}{mlp}.layer_norm.weight"
    out["decoder.layers.{n}.cross_norm.weight"] = "decoder.block.{n}.layer.1.layer_norm.weight"
    out["decoder.layers.{n}.cross_attn.q.weight"] = "decoder.block.{n}.layer.1.EncDecAttention.q.weight"
    out["decoder.layers.{n}.cross_attn.kv.weight"] = tuple(f"decoder.block.{{n}}.layer.1.EncDecAttention.{x}.weight"
                                                           for x in "kv")
    out["decoder.layers.{n}.cross_attn.out.weight"] = "decoder.block.{n}.layer.1.EncDecAttention.o.weight"
    return out


def _plain_mlp(c: TransformerConfig) -> dict[str, Source]:
    """T5 v1.0's MLP has one input matrix ``wi`` (the map above has v1.1's gated pair)."""
    if c.activation in GATED:
        return {}
    return {f"{stack}.layers.{{n}}.mlp.fc_in.weight": f"{stack}.block.{{n}}.layer.{mlp}.DenseReluDense.wi.weight"
            for stack, mlp in (("encoder", 1), ("decoder", 2))}


def _t5_from_hf(h: dict, names: set[str]) -> dict[str, Any]:
    kind = h.get("feed_forward_proj", "relu")
    if kind not in _ACTIVATIONS:
        raise ValueError(f"t5: feed_forward_proj={kind!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    width, heads = h.get("d_model", 512), h.get("num_heads", 8)
    scaled = h.get("scale_decoder_outputs", h.get("tie_word_embeddings", True) is not False)
    out: dict[str, Any] = dict(activation=_ACTIVATIONS[kind],
                               num_decoder_layers=h.get("num_decoder_layers") or h.get("num_layers", 6),
                               tie_word_embeddings="lm_head.weight" not in names,
                               logit_scale=width ** -0.5 if scaled else 1.0)
    if h.get("d_kv", 64) != width // heads:
        out["head_size"] = h.get("d_kv", 64)
    return out


def _t5_to_hf(c: TransformerConfig) -> dict[str, Any]:
    scaled = c.logit_scale != 1.0
    if c.activation not in _TO_HF:
        raise ValueError(f"t5 has no {c.activation!r} MLP; it has {', '.join(_TO_HF)}")
    return dict(feed_forward_proj=_TO_HF[c.activation],
                d_kv=c.head_dim, num_decoder_layers=c.num_decoder_layers, is_encoder_decoder=True,
                scale_decoder_outputs=scaled, tie_word_embeddings=scaled)


T5 = Family(
    model_type="t5", architecture="T5ForConditionalGeneration", base_architecture="T5Model", prefix="",
    fields=dict(vocab_size=("vocab_size", 32128), hidden_size=("d_model", 512), intermediate_size=("d_ff", 2048),
                num_attention_heads=("num_heads", 8), num_encoder_layers=("num_layers", 6),
                max_position_embeddings=("n_positions", 512), norm_eps=("layer_norm_epsilon", 1e-6),
                dropout=("dropout_rate", 0.1), relative_buckets=("relative_attention_num_buckets", 32),
                relative_max_distance=("relative_attention_max_distance", 128), pad_token_id=("pad_token_id", 0),
                eos_token_id=("eos_token_id", 1), decoder_start_token_id=("decoder_start_token_id", 0)),
    fixed=dict(pre_norm=True, norm="rmsnorm", position="relative", position_offset=0, bias=False, qkv_bias=None,
               query_pre_attn_scalar=1.0, scale_embedding=False, embedding_norm=False, final_norm=True,
               type_vocab_size=0, lm_head_bias=False, mlm_transform=False),
    weights=_t5_weights(),
    config_from_hf=_t5_from_hf, config_to_hf=_t5_to_hf, weights_for=_plain_mlp,
    ignore=(r"(en|de)coder\.embed_tokens\.weight", r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
)
