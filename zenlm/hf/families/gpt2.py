"""GPT-2: a pre-norm decoder with learned positions. Its Conv1D layers store weights as (in, out),
so those four tensors are transposed on the way in and out; its fused ``c_attn`` is already our
q|k|v layout once transposed.
"""
from __future__ import annotations

from ...config import TransformerConfig
from ..family import Family, activation_from_hf, activation_to_hf, require_off


def _gpt2_from_hf(h: dict, names: set[str]) -> dict:
    if not h.get("scale_attn_weights", True):
        raise ValueError("gpt2: scale_attn_weights=False is not supported (zenlm always scales by 1/sqrt(head_dim))")
    require_off(h, "gpt2", "scale_attn_by_inverse_layer_idx", "add_cross_attention")
    width = h.get("n_embd", 768)
    out = dict(intermediate_size=h.get("n_inner") or 4 * width,
               activation=activation_from_hf(h.get("activation_function", "gelu_new"), "gpt2"))
    if h.get("pad_token_id") is None:  # GPT-2 has no pad token; batches pad with end-of-text
        out["pad_token_id"] = h.get("eos_token_id", 50256)
    return out


def _gpt2_to_hf(c: TransformerConfig) -> dict:
    return dict(n_inner=c.intermediate_size, activation_function=activation_to_hf(c.activation, "gpt2"), embd_pdrop=c.dropout,
                scale_attn_weights=True)


_GPT2_LAYER = "transformer.h.{n}."
GPT2 = Family(
    model_type="gpt2", architecture="GPT2LMHeadModel", base_architecture="GPT2Model", prefix="transformer.",
    fields=dict(vocab_size=("vocab_size", 50257), hidden_size=("n_embd", 768), num_attention_heads=("n_head", 12),
                num_decoder_layers=("n_layer", 12), max_position_embeddings=("n_positions", 1024),
                norm_eps=("layer_norm_epsilon", 1e-5), dropout=("resid_pdrop", 0.1),
                attention_dropout=("attn_pdrop", 0.1), initializer_range=("initializer_range", 0.02),
                bos_token_id=("bos_token_id", 50256), eos_token_id=("eos_token_id", 50256),
                pad_token_id=("pad_token_id", None), tie_word_embeddings=("tie_word_embeddings", True)),
    fixed=dict(num_encoder_layers=0, pre_norm=True, norm="layernorm", position="learned", position_offset=0,
               bias=True, scale_embedding=False, embedding_norm=False, final_norm=True, type_vocab_size=0,
               lm_head_bias=False, mlm_transform=False),
    weights={
        "embed_tokens.weight": "transformer.wte.weight",
        "decoder.positions.weight": "transformer.wpe.weight",
        **{f"decoder.layers.{{n}}.{ours}.{p}": f"{_GPT2_LAYER}{theirs}.{p}" for p in ("weight", "bias")
           for ours, theirs in (("attn_norm", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                ("mlp_norm", "ln_2"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj"))},
        "decoder.final_norm.weight": "transformer.ln_f.weight",
        "decoder.final_norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    config_from_hf=_gpt2_from_hf, config_to_hf=_gpt2_to_hf,
    # Conv1D keeps (in, out); its fused c_attn is already our q|k|v layout once transposed
    transposed=frozenset(f"decoder.layers.{{n}}.{m}.weight" for m in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")),
    ignore=(r".*\.attn\.(masked_)?bias",),
    aliases={"transformer.wte.weight": ("lm_head.weight",)},
)
