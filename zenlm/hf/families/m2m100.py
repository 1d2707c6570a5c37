"""M2M100 and NLLB-200 (NLLB uses M2M100's architecture and ``model_type``; NLLB-MoE is another family):
BART's layer naming, but pre-norm with a final layer norm on each stack, embeddings scaled by
sqrt(d_model), ReLU, one embedding for both stacks and the head (no ``final_logits_bias``), and fairseq's sinusoidal positions. Those are recomputed,
never stored: frequencies 1 … 1/10000 with both ends (``sinusoid_endpoint``), angles starting at
pad_token_id + 1 (``position_offset``), counted over non-pad tokens only, a pad token getting no position
vector (``positions_skip_pad``, fairseq's make_positions). The target language is the token forced
after the decoder's start token: ``forced_bos_token_id`` in generation_config.json, carried as a
generation default like the others (see ``..generation``).
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import Family, Source, activation_from_hf, activation_to_hf, require_equal
from .bart import seq2seq_weights


def _m2m100_weights() -> dict[str, Source]:
    out = {k: v for k, v in seq2seq_weights(positions=False, embedding_norm=False).items() if k != "lm_head_bias"}
    for stack in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            out[f"{stack}.final_norm.{p}"] = f"model.{stack}.layer_norm.{p}"
    return out


def _m2m100_from_hf(h: dict, names: set[str]) -> dict[str, Any]:
    require_equal(h, "m2m_100", ("encoder_attention_heads", "decoder_attention_heads"),
                  ("encoder_ffn_dim", "decoder_ffn_dim"))
    if h.get("tie_word_embeddings") is False:
        raise ValueError("m2m_100: tie_word_embeddings=False is not supported (transformers then unties the encoder's "
                         "and the decoder's embeddings as well; zenlm shares one table)")
    pad = h.get("pad_token_id", 1)
    if pad is None:
        raise ValueError("m2m_100: pad_token_id=None; its positions count from pad_token_id + 1, so it needs one")
    return dict(activation=activation_from_hf(h.get("activation_function", "relu"), "m2m_100"), position_offset=pad + 1)


def _m2m100_to_hf(c: TransformerConfig) -> dict[str, Any]:
    return dict(decoder_attention_heads=c.num_attention_heads, decoder_ffn_dim=c.intermediate_size,
                activation_function=activation_to_hf(c.activation, "m2m_100"), tie_word_embeddings=True)


M2M100 = Family(
    model_type="m2m_100", architecture="M2M100ForConditionalGeneration", base_architecture="M2M100Model",
    prefix="model.",
    fields=dict(vocab_size=("vocab_size", 128112), hidden_size=("d_model", 1024),
                intermediate_size=("encoder_ffn_dim", 4096), num_attention_heads=("encoder_attention_heads", 16),
                num_encoder_layers=("encoder_layers", 12), num_decoder_layers=("decoder_layers", 12),
                max_position_embeddings=("max_position_embeddings", 1024), scale_embedding=("scale_embedding", True),
                dropout=("dropout", 0.1), attention_dropout=("attention_dropout", 0.1),
                initializer_range=("init_std", 0.02),
                pad_token_id=("pad_token_id", 1), bos_token_id=("bos_token_id", 0), eos_token_id=("eos_token_id", 2),
                decoder_start_token_id=("decoder_start_token_id", 2)),
    fixed=dict(tie_word_embeddings=True, pre_norm=True, norm="layernorm", norm_eps=1e-5, bias=True, qkv_bias=None, final_norm=True,
               type_vocab_size=0, lm_head_bias=False, mlm_transform=False, embedding_norm=False,
               position="sinusoidal", sinusoid_endpoint=True, positions_skip_pad=True),
    weights=_m2m100_weights(),
    config_from_hf=_m2m100_from_hf, config_to_hf=_m2m100_to_hf,
    aliases={"model.shared.weight": ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                     "lm_head.weight")},
    # fixed sinusoids (``weights``; fairseq's ``_float_tensor``): recomputed, never learned
    ignore=(r"(model\.)?(en|de)coder\.embed_positions\.(weights?|_float_tensor)",),
)
