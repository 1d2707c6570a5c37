"""BERT (MiniLM is a small BERT): an encoder with learned positions, post-norm, token types, and an
MLM head when the checkpoint has one (``BertForMaskedLM``; MiniLM ships the bare ``BertModel``).

BERT's pooler (``tanh(dense(h[CLS]))``, unused by sentence embeddings) has no place in the model;
it rides along as ``model.hf_pooler`` (see ``pooler_output``), is kept in ``hf_pooler.safetensors``
beside a converted checkpoint, and is written back on export, so HF -> zenlm -> HF keeps it.
"""
from __future__ import annotations

import torch

from ...config import TransformerConfig
from ..family import REQUIRED, Family, activation_from_hf, activation_to_hf, require_off
from ..files import TensorFiles
from ..weights import resolve


def _bert_from_hf(h: dict, names: set[str]) -> dict:
    if h.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"bert: position_embedding_type={h['position_embedding_type']!r} is not supported; "
                         "supported: 'absolute'")
    require_off(h, "bert", "is_decoder", "add_cross_attention")
    head = any(n.endswith("cls.predictions.transform.dense.weight") for n in names)
    return dict(activation=activation_from_hf(h.get("hidden_act", "gelu"), "bert"), mlm_transform=head, lm_head_bias=head)


def _bert_to_hf(c: TransformerConfig) -> dict:
    return dict(hidden_act=activation_to_hf(c.activation, "bert"), position_embedding_type="absolute")


_BERT_LAYER = "bert.encoder.layer.{n}."
BERT = Family(
    model_type="bert", architecture="BertForMaskedLM", base_architecture="BertModel", prefix="bert.",
    fields=dict(vocab_size=("vocab_size", REQUIRED), hidden_size=("hidden_size", 768),
                intermediate_size=("intermediate_size", 3072), num_attention_heads=("num_attention_heads", 12),
                num_encoder_layers=("num_hidden_layers", 12), max_position_embeddings=("max_position_embeddings", 512),
                type_vocab_size=("type_vocab_size", 2), norm_eps=("layer_norm_eps", 1e-12),
                dropout=("hidden_dropout_prob", 0.1), attention_dropout=("attention_probs_dropout_prob", 0.1),
                initializer_range=("initializer_range", 0.02), pad_token_id=("pad_token_id", 0),
                bos_token_id=("bos_token_id", None), eos_token_id=("eos_token_id", None),
                tie_word_embeddings=("tie_word_embeddings", True)),
    fixed=dict(num_decoder_layers=0, pre_norm=False, norm="layernorm", position="learned", position_offset=0,
               bias=True, scale_embedding=False, embedding_norm=True, final_norm=False),
    weights={
        "embed_tokens.weight": "bert.embeddings.word_embeddings.weight",
        "encoder.positions.weight": "bert.embeddings.position_embeddings.weight",
        "encoder.token_types.weight": "bert.embeddings.token_type_embeddings.weight",
        "encoder.embed_norm.weight": "bert.embeddings.LayerNorm.weight",
        "encoder.embed_norm.bias": "bert.embeddings.LayerNorm.bias",
        **{f"encoder.layers.{{n}}.attn.qkv.{p}": tuple(f"{_BERT_LAYER}attention.self.{x}.{p}"
                                                       for x in ("query", "key", "value")) for p in ("weight", "bias")},
        **{f"encoder.layers.{{n}}.{ours}.{p}": f"{_BERT_LAYER}{theirs}.{p}" for p in ("weight", "bias")
           for ours, theirs in (("attn.out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                ("mlp.fc_in", "intermediate.dense"), ("mlp.fc_out", "output.dense"),
                                ("mlp_norm", "output.LayerNorm"))},
        "mlm_dense.weight": "cls.predictions.transform.dense.weight",
        "mlm_dense.bias": "cls.predictions.transform.dense.bias",
        "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head_bias": "cls.predictions.bias",
        "lm_head.weight": "cls.predictions.decoder.weight",
    },
    config_from_hf=_bert_from_hf, config_to_hf=_bert_to_hf,
    ignore=(r"(bert\.)?pooler\..*", r".*position_ids", r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.bias"),
    aliases={"bert.embeddings.word_embeddings.weight": ("cls.predictions.decoder.weight",)},
)


# --------------------------------------------------------------------------- the pooler
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
POOLER_FILE = "hf_pooler.safetensors"  # beside a converted zenlm checkpoint


def attach_pooler(model: torch.nn.Module, files: TensorFiles, dtype: torch.dtype) -> None:
    """Keep BERT's pooler as ``model.hf_pooler`` (a plain dict, outside the state dict)."""
    stored = [resolve(files, BERT, BERT.prefix + name) for name in POOLER]
    if None in stored:
        return
    width = model.config.hidden_size
    for name, want in zip(stored, ((width, width), (width,))):
        if files.shape(name) != want:
            raise ValueError(f"{files.where[name]}: tensor {name!r} has shape {files.shape(name)}, expected {want}")
    model.hf_pooler = {name: files.get(s).to(dtype) for name, s in zip(POOLER, stored)}


def pooler_output(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """BERT's ``pooler_output``: tanh(dense(hidden state of the first token)), with the pooler a
    Hugging Face BERT folder brought along (transformers' ``BertModel(...).pooler_output``)."""
    pooler = getattr(model, "hf_pooler", None)
    if not pooler:
        raise ValueError("this model has no pooler: only BERT models imported from a Hugging Face folder "
                         "with pooler.dense weights carry one")
    weight, bias = (pooler[n].to(hidden.device, hidden.dtype) for n in POOLER)
    return torch.tanh(torch.nn.functional.linear(hidden[:, 0], weight, bias))
