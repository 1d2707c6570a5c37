"""BART and MarianMT: post-norm encoder-decoders sharing one vocabulary and one layer naming. BART
has learned positions (offset by 2) and an embedding norm; Marian has fixed sinusoids, recomputed
rather than loaded. Both keep ``final_logits_bias`` as a (1, vocab) buffer (``row``).
"""
from __future__ import annotations

from typing import Callable

from ...config import TransformerConfig
from ..family import Family, Source, activation_from_hf, activation_to_hf, require_equal, require_off


def seq2seq_weights(positions: bool, embedding_norm: bool) -> dict[str, Source]:
    """BART and Marian share their layer names; they differ in positions and the embedding norm."""
    out: dict[str, Source] = {"embed_tokens.weight": "model.shared.weight", "lm_head_bias": "final_logits_bias",
                              "lm_head.weight": "lm_head.weight"}
    for stack in ("encoder", "decoder"):
        if positions:
            out[f"{stack}.positions.weight"] = f"model.{stack}.embed_positions.weight"
        for p in ("weight", "bias"):
            if embedding_norm:
                out[f"{stack}.embed_norm.{p}"] = f"model.{stack}.layernorm_embedding.{p}"
            layer = f"model.{stack}.layers.{{n}}."
            out[f"{stack}.layers.{{n}}.attn.qkv.{p}"] = tuple(f"{layer}self_attn.{x}_proj.{p}" for x in "qkv")
            pairs = [("attn.out", "self_attn.out_proj"), ("attn_norm", "self_attn_layer_norm"),
                     ("mlp.fc_in", "fc1"), ("mlp.fc_out", "fc2"), ("mlp_norm", "final_layer_norm")]
            if stack == "decoder":
                out[f"decoder.layers.{{n}}.cross_attn.q.{p}"] = f"{layer}encoder_attn.q_proj.{p}"
                out[f"decoder.layers.{{n}}.cross_attn.kv.{p}"] = tuple(f"{layer}encoder_attn.{x}_proj.{p}" for x in "kv")
                pairs += [("cross_attn.out", "encoder_attn.out_proj"), ("cross_norm", "encoder_attn_layer_norm")]
            for ours, theirs in pairs:
                out[f"{stack}.layers.{{n}}.{ours}.{p}"] = f"{layer}{theirs}.{p}"
    return out


def _seq2seq_from_hf(family: str) -> Callable[[dict, set[str]], dict]:
    def convert(h: dict, names: set[str]) -> dict:
        require_equal(h, family, ("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"))
        require_off(h, family, "normalize_before", "add_final_layer_norm", "add_bias_logits")
        if family == "marian":
            if h.get("decoder_vocab_size") not in (None, h.get("vocab_size")):
                raise ValueError(f"marian: decoder_vocab_size={h['decoder_vocab_size']} differs from "
                                 f"vocab_size={h.get('vocab_size')}; zenlm shares one vocabulary")
            if not h.get("share_encoder_decoder_embeddings", True):
                raise ValueError("marian: share_encoder_decoder_embeddings=False is not supported")
        return dict(activation=activation_from_hf(h.get("activation_function", "gelu"), family))
    return convert


def _seq2seq_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_attention_heads=c.num_attention_heads, decoder_ffn_dim=c.intermediate_size,
                activation_function=activation_to_hf(c.activation, "bart/marian"), is_encoder_decoder=True,
                decoder_vocab_size=c.vocab_size, share_encoder_decoder_embeddings=True)


_SEQ2SEQ_FIELDS = dict(hidden_size=("d_model", 1024), intermediate_size=("encoder_ffn_dim", 4096),
                       num_attention_heads=("encoder_attention_heads", 16), num_encoder_layers=("encoder_layers", 12),
                       num_decoder_layers=("decoder_layers", 12), max_position_embeddings=("max_position_embeddings", 1024),
                       scale_embedding=("scale_embedding", False), dropout=("dropout", 0.1),
                       attention_dropout=("attention_dropout", 0.0), initializer_range=("init_std", 0.02),
                       tie_word_embeddings=("tie_word_embeddings", True))
_SEQ2SEQ_FIXED = dict(pre_norm=False, norm="layernorm", norm_eps=1e-5, bias=True, final_norm=False, type_vocab_size=0,
                      lm_head_bias=True, mlm_transform=False)
_SEQ2SEQ_ALIASES = {"model.shared.weight": ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                            "lm_head.weight")}

BART = Family(
    model_type="bart", architecture="BartForConditionalGeneration", base_architecture="BartModel", prefix="model.",
    fields=dict(vocab_size=("vocab_size", 50265), pad_token_id=("pad_token_id", 1), bos_token_id=("bos_token_id", 0),
                eos_token_id=("eos_token_id", 2), decoder_start_token_id=("decoder_start_token_id", 2),
                **_SEQ2SEQ_FIELDS),
    fixed=dict(_SEQ2SEQ_FIXED, position="learned", position_offset=2, embedding_norm=True),
    weights=seq2seq_weights(positions=True, embedding_norm=True),
    config_from_hf=_seq2seq_from_hf("bart"), config_to_hf=_seq2seq_to_hf,
    row=frozenset({"lm_head_bias"}), aliases=_SEQ2SEQ_ALIASES,
)

MARIAN = Family(
    model_type="marian", architecture="MarianMTModel", base_architecture="MarianModel", prefix="model.",
    fields=dict(vocab_size=("vocab_size", 58101), pad_token_id=("pad_token_id", 58100), bos_token_id=("bos_token_id", None),
                eos_token_id=("eos_token_id", 0), decoder_start_token_id=("decoder_start_token_id", 58100),
                **_SEQ2SEQ_FIELDS),
    fixed=dict(_SEQ2SEQ_FIXED, position="sinusoidal", position_offset=0, embedding_norm=False),
    weights=seq2seq_weights(positions=False, embedding_norm=False),
    config_from_hf=_seq2seq_from_hf("marian"), config_to_hf=_seq2seq_to_hf,
    row=frozenset({"lm_head_bias"}), aliases=_SEQ2SEQ_ALIASES,
    ignore=(r"(model\.)?(en|de)coder\.embed_positions\.weight",),  # fixed sinusoids: recomputed, never learned
)
