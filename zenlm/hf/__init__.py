"""Hugging Face checkpoints in and out: BERT (MiniLM), GPT-2, BART, MarianMT and Llama.

Conversion is data, as in litgpt's ``convert_hf_checkpoint.py``: each family is one
``Family`` record holding a map from our parameter names to theirs, plus the few
layout changes that are not renames:

* a tuple of HF names is concatenated along dim 0 into one fused tensor of ours
  (q|k|v → ``attn.qkv``, k|v → ``cross_attn.kv``, Llama's gate|up → ``mlp.fc_in``);
* ``transposed``: GPT-2 stores its Conv1D weights as (in, out);
* ``row``: BART and Marian keep ``final_logits_bias`` as a (1, vocab) buffer.

Exporting runs the same map backwards. The model itself never branches on where its
weights came from. Files are read safely: safetensors (one file or shards listed in
``model.safetensors.index.json``); a legacy ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, which refuses anything but tensors. transformers is
never imported here, and nothing touches the network.

Two things ride along besides the weights. The generation settings that change which tokens
``generate()`` picks (MarianMT's ``bad_words_ids=[[pad]]`` and ``forced_eos_token_id``, beam
count, length limits) are read from generation_config.json (else config.json, as transformers
does) into ``config.extra["generation"]``, which zenlm's ``Generator`` takes as its defaults.
BERT's pooler (``tanh(dense(h[CLS]))``, unused by sentence embeddings) has no place in the
model; it is kept as ``model.hf_pooler`` (see ``pooler_output``), in ``hf_pooler.safetensors``
beside a converted checkpoint, and written back on export, so HF -> zenlm -> HF keeps it.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from ..checkpoint import CONFIG_NAME, TOKENIZER_NAME, PathLike, atomic_write, read_json, save_weights, unique_state_dict
from ..config import TransformerConfig

log = logging.getLogger(__name__)

Source = Union[str, tuple[str, ...]]  # one HF tensor, or several concatenated along dim 0
GENERATION_NAME = "generation_config.json"
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", GENERATION_NAME)
HEAD_PARAMS = ("lm_head.weight", "lm_head_bias", "mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias")
REQUIRED = object()  # marks an HF config key without a default


# --------------------------------------------------------------------------- the family record
@dataclass(frozen=True)
class Family:
    """Everything that differs between two Hugging Face families, as data.

    ``fields`` maps our config field to (HF config key, the HF class default when the key is
    absent); ``fixed`` holds the flags every model of the family has; ``weights`` maps our
    tensor name to the HF one (``{n}`` is the layer index); the two hooks handle the handful
    of config values that are not a plain rename (activation names, rope settings)."""

    model_type: str
    architecture: str  # the class with the LM head, written on export
    base_architecture: str  # the bare backbone class (its tensor names lack ``prefix``)
    prefix: str
    fields: dict[str, tuple[str, Any]]
    fixed: dict[str, Any]
    weights: dict[str, Source]
    config_from_hf: Callable[[dict, set[str]], dict] = lambda h, names: {}
    config_to_hf: Callable[[TransformerConfig], dict] = lambda c: {}
    transposed: frozenset[str] = frozenset()
    row: frozenset[str] = frozenset()
    ignore: tuple[str, ...] = ()  # regexes of HF tensors with no counterpart here (pooler, stale buffers)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tied copies that may stand in


ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _activation(name: str, family: str, table: dict[str, str] = ACT_FROM_HF) -> str:
    if name not in table:
        raise ValueError(f"{family}: activation {name!r} is not supported; supported: {', '.join(sorted(table))}")
    return table[name]


def _act_to_hf(name: str, family: str) -> str:
    if name not in ACT_TO_HF:
        raise ValueError(f"{family} has no {name!r} activation; it has {', '.join(ACT_TO_HF)}")
    return ACT_TO_HF[name]


def _same(h: dict, family: str, *pairs: tuple[str, str]) -> None:
    """Our model shares one value between the encoder and decoder stacks."""
    for a, b in pairs:
        if b in h and a in h and h[a] != h[b]:
            raise ValueError(f"{family}: {a}={h[a]} differs from {b}={h[b]}; zenlm needs them equal")


def _false(h: dict, family: str, *keys: str) -> None:
    for key in keys:
        if h.get(key):
            raise ValueError(f"{family}: {key}={h[key]!r} is not supported (zenlm needs it off)")


# --------------------------------------------------------------------------- BERT (MiniLM)
def _bert_from_hf(h: dict, names: set[str]) -> dict:
    if h.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"bert: position_embedding_type={h['position_embedding_type']!r} is not supported; "
                         "supported: 'absolute'")
    _false(h, "bert", "is_decoder", "add_cross_attention")
    head = any(n.endswith("cls.predictions.transform.dense.weight") for n in names)
    return dict(activation=_activation(h.get("hidden_act", "gelu"), "bert"), mlm_transform=head, lm_head_bias=head)


def _bert_to_hf(c: TransformerConfig) -> dict:
    return dict(hidden_act=_act_to_hf(c.activation, "bert"), position_embedding_type="absolute")


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


# --------------------------------------------------------------------------- GPT-2
def _gpt2_from_hf(h: dict, names: set[str]) -> dict:
    if not h.get("scale_attn_weights", True):
        raise ValueError("gpt2: scale_attn_weights=False is not supported (zenlm always scales by 1/sqrt(head_dim))")
    _false(h, "gpt2", "scale_attn_by_inverse_layer_idx", "add_cross_attention")
    width = h.get("n_embd", 768)
    out = dict(intermediate_size=h.get("n_inner") or 4 * width,
               activation=_activation(h.get("activation_function", "gelu_new"), "gpt2"))
    if h.get("pad_token_id") is None:  # GPT-2 has no pad token; batches pad with end-of-text
        out["pad_token_id"] = h.get("eos_token_id", 50256)
    return out


def _gpt2_to_hf(c: TransformerConfig) -> dict:
    return dict(n_inner=c.intermediate_size, activation_function=_act_to_hf(c.activation, "gpt2"), embd_pdrop=c.dropout,
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


# --------------------------------------------------------------------------- BART and Marian
def _seq2seq_weights(positions: bool, embedding_norm: bool) -> dict[str, Source]:
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
        _same(h, family, ("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"))
        _false(h, family, "normalize_before", "add_final_layer_norm", "add_bias_logits")
        if family == "marian":
            if h.get("decoder_vocab_size") not in (None, h.get("vocab_size")):
                raise ValueError(f"marian: decoder_vocab_size={h['decoder_vocab_size']} differs from "
                                 f"vocab_size={h.get('vocab_size')}; zenlm shares one vocabulary")
            if not h.get("share_encoder_decoder_embeddings", True):
                raise ValueError("marian: share_encoder_decoder_embeddings=False is not supported")
        return dict(activation=_activation(h.get("activation_function", "gelu"), family))
    return convert


def _seq2seq_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_attention_heads=c.num_attention_heads, decoder_ffn_dim=c.intermediate_size,
                activation_function=_act_to_hf(c.activation, "bart/marian"), is_encoder_decoder=True,
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
    weights=_seq2seq_weights(positions=True, embedding_norm=True),
    config_from_hf=_seq2seq_from_hf("bart"), config_to_hf=_seq2seq_to_hf,
    row=frozenset({"lm_head_bias"}), aliases=_SEQ2SEQ_ALIASES,
)

MARIAN = Family(
    model_type="marian", architecture="MarianMTModel", base_architecture="MarianModel", prefix="model.",
    fields=dict(vocab_size=("vocab_size", 58101), pad_token_id=("pad_token_id", 58100), bos_token_id=("bos_token_id", None),
                eos_token_id=("eos_token_id", 0), decoder_start_token_id=("decoder_start_token_id", 58100),
                **_SEQ2SEQ_FIELDS),
    fixed=dict(_SEQ2SEQ_FIXED, position="sinusoidal", position_offset=0, embedding_norm=False),
    weights=_seq2seq_weights(positions=False, embedding_norm=False),
    config_from_hf=_seq2seq_from_hf("marian"), config_to_hf=_seq2seq_to_hf,
    row=frozenset({"lm_head_bias"}), aliases=_SEQ2SEQ_ALIASES,
    ignore=(r"(model\.)?(en|de)coder\.embed_positions\.weight",),  # fixed sinusoids: recomputed, never learned
)


# --------------------------------------------------------------------------- Llama
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
    out = dict(activation=_activation(h.get("hidden_act", "silu"), "llama", {"silu": "swiglu", "gelu": "geglu"}),
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

FAMILIES: dict[str, Family] = {f.model_type: f for f in (BERT, GPT2, BART, MARIAN, LLAMA)}
TRAINING_ONLY = ("dropout", "attention_dropout", "initializer_range", "extra")  # never block an export


# --------------------------------------------------------------------------- configs
def family_of(hf_config: dict, source: PathLike = "config.json") -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: unsupported architecture model_type={model_type!r} "
                         f"({', '.join(hf_config.get('architectures') or [])}); supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict, tensor_names: set[str] = frozenset(), source: PathLike = "config.json",
                   generation_config: Optional[dict] = None) -> TransformerConfig:
    """A TransformerConfig from an HF config.json dict (tensor names tell BERT whether it has an MLM head).

    ``generation_config`` is the folder's generation_config.json; without one, the generation keys
    of config.json are used (transformers' own rule). See ``generation_from_hf``."""
    family = family_of(hf_config, source)
    values: dict[str, Any] = {}
    for ours, (theirs, default) in family.fields.items():
        value = hf_config.get(theirs, default)
        if value is REQUIRED:
            raise ValueError(f"{source}: {family.model_type} config lacks {theirs!r}")
        if value is not None:  # None (no pad token, say): keep zenlm's default
            values[ours] = value
    values.update(family.fixed)
    values.update(family.config_from_hf(hf_config, set(tensor_names)))
    values["extra"] = {"hf_model_type": family.model_type,
                       "hf_architectures": list(hf_config.get("architectures") or [family.architecture])}
    vocab = values["vocab_size"]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # zenlm's defaults (0, 1, 2) may not fit a tiny vocab
        if key not in values:
            values[key] = min(TransformerConfig.__dataclass_fields__[key].default, vocab - 1)
    if family is not BERT:
        generation = generation_from_hf(hf_config if generation_config is None else generation_config,
                                        encoder_decoder=values.get("num_encoder_layers", 0) > 0
                                        and values.get("num_decoder_layers", 0) > 0,
                                        eos_token_id=values["eos_token_id"], source=source,
                                        window=values.get("max_position_embeddings"))
        if generation:
            values["extra"]["generation"] = generation
    try:
        return TransformerConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None



# HF generation settings that change which tokens generate() picks, with transformers' defaults
HF_GENERATION = dict(bad_words_ids=None, no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0, early_stopping=False,
                     repetition_penalty=1.0, forced_bos_token_id=None, forced_eos_token_id=None,
                     renormalize_logits=False, do_sample=False, temperature=1.0, top_p=1.0, min_p=None)


def generation_from_hf(settings: dict, encoder_decoder: bool, eos_token_id: Optional[int] = None,
                       source: PathLike = "generation_config.json", window: Optional[int] = None) -> dict:
    """zenlm ``GenerationConfig`` defaults from an HF generation_config.json (or config.json) dict:
    only the values that differ from transformers' defaults, so ``zenlm generate`` on an imported
    model decodes what ``model.generate()`` would. ``max_length``/``min_length`` count the decoder's
    start token in an encoder-decoder (new tokens = length - 1); a decoder-only model's count the
    prompt, which zenlm cannot know in advance, so they are left out there. Settings zenlm cannot
    combine (sampling with beams) are dropped with a warning rather than making the model unloadable."""
    from ..generate import GenerationConfig

    out: dict[str, Any] = {}
    for key, default in HF_GENERATION.items():
        value = settings.get(key)
        if value is not None and value != default:
            out[key] = [list(w) for w in value] if key == "bad_words_ids" else value
    if out.get("do_sample"):  # transformers samples from the top 50 unless told otherwise
        out["top_k"] = settings.get("top_k", 50) or 0
    eos = settings.get("eos_token_id")
    if eos is not None and eos != eos_token_id:  # Llama 3 lists several end tokens
        out["eos_token_id"] = eos
    if settings.get("max_new_tokens") is not None:
        out["max_new_tokens"] = settings["max_new_tokens"]
    elif encoder_decoder and settings.get("max_length") is not None:
        out["max_new_tokens"] = max(1, settings["max_length"] - 1)
        if window is not None:  # the decoder's positions hold the start token and the new tokens
            out["max_new_tokens"] = min(out["max_new_tokens"], window - 1)
    if settings.get("min_new_tokens"):
        out["min_new_tokens"] = settings["min_new_tokens"]
    elif encoder_decoder and settings.get("min_length"):
        out["min_new_tokens"] = max(0, settings["min_length"] - 1)
    try:
        GenerationConfig(**out)
    except (TypeError, ValueError) as e:
        log.warning("%s: generation settings %s not carried over (%s)", source, out, e)
        return {}
    return out


def generation_to_hf(config: TransformerConfig) -> dict:
    """generation_config.json for ``config``: its token ids and the defaults ``generation_from_hf`` read."""
    generation = dict(config.extra.get("generation") or {})
    out: dict[str, Any] = {key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if config.is_encoder_decoder:
        out["decoder_start_token_id"] = config.start_token_id
        for ours, theirs in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            if ours in generation:
                out[theirs] = generation.pop(ours) + 1
    out.update(generation)
    return out


def config_to_hf(config: TransformerConfig, family: Family, head: bool = True) -> dict:
    """The HF config.json dict of ``family`` for this config (see ``family_for`` to pick one)."""
    out: dict[str, Any] = {"model_type": family.model_type,
                           "architectures": [family.architecture if head else family.base_architecture]}
    for ours, (theirs, _) in family.fields.items():
        out[theirs] = getattr(config, ours)
    out.update(family.config_to_hf(config))
    if config.is_encoder_decoder:
        out["is_encoder_decoder"] = True
    return out


def _mismatch(config: TransformerConfig, family: Family) -> Optional[str]:
    """Why ``config`` cannot be written as ``family`` (None when it can): export, re-import, compare."""
    ours = _state_names(config)
    mapped = [n for n in ours if _template(n)[0] in family.weights]
    try:
        back = config_from_hf(config_to_hf(config, family), set(_hf_names(family, mapped)))
    except ValueError as e:
        return str(e)
    for key, value in config.to_dict().items():
        if key not in TRAINING_ONLY and getattr(back, key) != value:
            return f"{key}={value!r} (a {family.model_type} model has {getattr(back, key)!r})"
    unmapped = [n for n in ours if n not in mapped]
    return f"tensor {unmapped[0]!r} has no {family.model_type} counterpart" if unmapped else None


def family_for(config: TransformerConfig) -> Family:
    """The HF family a config can be exported as: where it was imported from, else the first that fits."""
    wanted = config.extra.get("hf_model_type")
    candidates = [FAMILIES[wanted]] if wanted in FAMILIES else list(FAMILIES.values())
    reasons = []
    for family in candidates:
        why = _mismatch(config, family)
        if why is None:
            return family
        reasons.append(f"{family.model_type}: {why}")
    raise ValueError("this model matches no Hugging Face family zenlm can write; " + "; ".join(reasons))


# --------------------------------------------------------------------------- names
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _template(name: str) -> tuple[str, Optional[int]]:
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".layers.{n}." + name[m.end():], int(m.group(1))


def _sources(family: Family, name: str) -> tuple[tuple[str, ...], str]:
    """HF tensor names behind one of our tensors, and the template that matched."""
    template, n = _template(name)
    if template not in family.weights:
        raise ValueError(f"zenlm tensor {name!r} has no {family.model_type} counterpart")
    source = family.weights[template]
    names = (source,) if isinstance(source, str) else source
    return tuple(s.format(n=n) for s in names), template


def _hf_names(family: Family, ours: list[str], head: bool = True) -> list[str]:
    names = [hf for name in ours for hf in _sources(family, name)[0]]
    return names if head else [_strip(family, n) for n in names]


def _strip(family: Family, name: str) -> str:
    return name[len(family.prefix):] if name.startswith(family.prefix) else name


def _state_names(config: TransformerConfig, cls=None) -> list[str]:
    from ..model import TransformerLM

    with torch.device("meta"):
        model = (cls or TransformerLM)(config)
    return list(model.state_dict())  # no tied parameters in zenlm models: names are unique


def _part_sizes(parts: int, rows: int, config: TransformerConfig) -> list[int]:
    """Rows of each piece of a fused tensor: q|k|v follows the head counts, k|v and gate|up are halves."""
    if parts == 3:
        kv = config.num_key_value_heads * config.head_dim
        return [rows - 2 * kv, kv, kv]
    return [rows // parts] * parts


# --------------------------------------------------------------------------- reading HF files
class TensorFiles:
    """The tensors of an HF folder, whichever files hold them, read lazily and safely.

    Knows which file holds each name, so every error names the file and the tensor."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        d = self.directory
        self.source = d  # the file a missing tensor should have been in: the weights file or the shard index
        if (d / "model.safetensors").exists():
            self.source = d / "model.safetensors"
            self._add_safetensors(self.source)
        elif (d / "model.safetensors.index.json").exists():
            self.source = d / "model.safetensors.index.json"
            for shard in self._shards(self.source):
                self._add_safetensors(shard)
        elif (d / "pytorch_model.bin").exists():
            self.source = d / "pytorch_model.bin"
            self._add_bin(self.source)
        elif (d / "pytorch_model.bin.index.json").exists():
            self.source = d / "pytorch_model.bin.index.json"
            for shard in self._shards(self.source):
                self._add_bin(shard)
        else:
            raise FileNotFoundError(f"{d} has no weights: expected model.safetensors, model.safetensors.index.json, "
                                    "pytorch_model.bin or pytorch_model.bin.index.json")

    def _shards(self, index: Path) -> list[Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or Path(name).name != name:  # shards live beside the index, nowhere else
                raise ValueError(f"{index}: shard {name!r} is not a file name in {self.directory}")
            if not (self.directory / name).exists():
                raise FileNotFoundError(f"{index} lists shard {name} but {self.directory / name} does not exist")
            shards.append(self.directory / name)
        return shards

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        self._open[path] = handle
        for name in handle.keys():
            self.where[name] = path

    def _add_bin(self, path: Path) -> None:
        try:  # weights_only: the unpickler builds tensors and plain containers, never arbitrary objects
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise ValueError(f"{path} is not a readable PyTorch weights file: {e}") from None
            state = self._load_bin_unmapped(path)  # pre-zip legacy format cannot be memory-mapped
        except Exception as e:  # UnpicklingError for anything that is not plain tensors
            raise ValueError(f"{path}: refused to load (only plain tensors are read from .bin files, "
                             f"with torch.load(weights_only=True)): {str(e).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path} does not hold a flat name -> tensor state dict")
        self._bins[path] = state
        for name in state:
            self.where[name] = path

    @staticmethod
    def _load_bin_unmapped(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: refused to load (only plain tensors are read from .bin files, "
                             f"with torch.load(weights_only=True)): {str(e).splitlines()[0]}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.where[name]
        if path in self._bins:
            return tuple(self._bins[path][name].shape)
        return tuple(self._open[path].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path in self._bins:
            return self._bins[path][name]
        try:
            return self._open[path].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} (truncated file?): {e}") from None


_LEGACY_NORM = re.compile(r"(?<=LayerNorm\.)(weight|bias)$")


def _resolve(files: TensorFiles, family: Family, name: str) -> Optional[str]:
    """The stored name of an HF tensor: as written, without the head model's prefix (a bare
    backbone checkpoint such as MiniLM's BertModel), or a tied copy of it."""
    for candidate in (name, *family.aliases.get(name, ())):
        for stored in (candidate, _strip(family, candidate)):
            if stored in files.where:
                return stored
            legacy = _LEGACY_NORM.sub(lambda m: {"weight": "gamma", "bias": "beta"}[m.group(1)], stored)
            if legacy in files.where:  # early BERT checkpoints (TF ports) name LayerNorm gamma/beta
                return legacy
    return None


# --------------------------------------------------------------------------- import
_INIT_LOCK = threading.Lock()
_SKIPPING = threading.local()


@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without random initialisation: every weight is replaced by the
    checkpoint's right after (transformers' from_pretrained does the same); for a
    BART-base-sized model this is most of the load time. Only this thread skips:
    a model built meanwhile on another thread is initialised as usual."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "constant_")

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if getattr(_SKIPPING, "on", False) else original(tensor, *args, **kwargs)
        return init

    with _INIT_LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, skipping(saved[n]))
            _SKIPPING.on = True
            yield
        finally:
            _SKIPPING.on = False
            for n, fn in saved.items():
                setattr(torch.nn.init, n, fn)


def state_from_hf(files: TensorFiles, family: Family, config: TransformerConfig, expected: dict[str, torch.Size],
                  dtype: torch.dtype = torch.float32, workers: int = 1) -> dict[str, torch.Tensor]:
    """Our tensors (name -> tensor with the ``expected`` shape) read through the family's map.

    Plain renames stay memory-mapped views of the file (no copy, as in transformers); fused
    and transposed tensors are copied, by ``workers`` threads at once."""
    pending, used = {}, set()
    for ours, shape in expected.items():
        sources, template = _sources(family, ours)
        sizes = _part_sizes(len(sources), shape[0], config) if len(sources) > 1 else [shape[0]]
        parts = []
        for source, rows in zip(sources, sizes):
            stored = _resolve(files, family, source)
            if stored is None:
                raise ValueError(f"{files.source}: missing tensor {source!r} (needed for {ours})")
            want = (rows, *shape[1:])
            if template in family.transposed:
                want = want[::-1]
            if template in family.row:
                want = (1, *want)
            if files.shape(stored) != want:
                raise ValueError(f"{files.where[stored]}: tensor {stored!r} has shape {files.shape(stored)}, "
                                 f"expected {want} for this config.json")
            tensor = files.get(stored)
            if template in family.transposed:
                tensor = tensor.t()
            if template in family.row:
                tensor = tensor[0]
            parts.append(tensor)
            used.add(stored)
        pending[ours] = parts
    # head tensors a bare backbone does not take, and tied copies of tensors already read, are expected leftovers
    known = {_resolve(files, family, s) for name in HEAD_PARAMS if name in family.weights
             for s in _sources(family, name)[0]}
    known |= {_resolve(files, family, a) for alts in family.aliases.values() for a in alts}
    left = [n for n in files.where if n not in used and n not in known
            and not any(re.fullmatch(p, n) for p in family.ignore)]
    if left:
        log.warning("%s: %d tensor(s) have no place in zenlm's %s model and were not loaded: %s",
                    files.directory, len(left), family.model_type, ", ".join(sorted(left)[:8]))

    def build(parts: list[torch.Tensor]) -> torch.Tensor:
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return tensor.to(dtype).contiguous()

    with ThreadPoolExecutor(max(1, workers)) as pool:  # copies release the GIL; first-touch page faults dominate
        return dict(zip(pending, pool.map(build, pending.values())))


def is_hf_folder(path: PathLike) -> bool:
    """A Hugging Face model folder: config.json with a ``model_type``."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(directory: PathLike) -> TransformerConfig:
    """The zenlm config of an HF folder without building the model (for ``zenlm info``): config.json,
    generation_config.json and, for BERT's MLM head, the tensor names (a folder without weights
    is read from its config alone)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model folder")
    hf_config = read_json(directory / CONFIG_NAME)
    family_of(hf_config, directory / CONFIG_NAME)
    try:
        names = set(TensorFiles(directory).where)
    except FileNotFoundError:
        names = set()
    generation = directory / GENERATION_NAME
    return config_from_hf(hf_config, names, directory / CONFIG_NAME,
                          read_json(generation) if generation.is_file() else None)


def load_hf(directory: PathLike, cls=None, dtype: Optional[torch.dtype] = None):
    """Build a zenlm model (``TransformerLM`` by default) from a local Hugging Face folder.

    Weights stay in fp32 unless ``dtype`` is given; head tensors are dropped when ``cls``
    is the bare ``TransformerModel``. Every error names the file and the tensor."""
    from ..model import TransformerLM

    cls = cls or TransformerLM
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model folder at {directory}")
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model folder")
    hf_config = read_json(directory / CONFIG_NAME)
    family = family_of(hf_config, directory / CONFIG_NAME)
    files = TensorFiles(directory)
    generation = directory / GENERATION_NAME
    config = config_from_hf(hf_config, set(files.where), directory / CONFIG_NAME,
                            read_json(generation) if generation.is_file() else None)
    with _skip_init():
        model = cls(config)
    expected = {n: t.shape for n, t in model.state_dict(keep_vars=True).items()}
    threads = torch.get_num_threads()
    try:  # one thread per copy, as many copies at once as torch has threads
        torch.set_num_threads(1)
        state = state_from_hf(files, family, config, expected, dtype or torch.float32, workers=threads)
    finally:
        torch.set_num_threads(threads)
    model.load_state_dict(state, strict=True, assign=True)
    if family is BERT:
        _attach_pooler(model, files, dtype or torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------- BERT's pooler
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
POOLER_FILE = "hf_pooler.safetensors"  # beside a converted zenlm checkpoint


def _attach_pooler(model: torch.nn.Module, files: TensorFiles, dtype: torch.dtype) -> None:
    """Keep BERT's pooler as ``model.hf_pooler`` (a plain dict, outside the state dict)."""
    stored = [_resolve(files, BERT, BERT.prefix + name) for name in POOLER]
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


# --------------------------------------------------------------------------- export
def state_to_hf(model: torch.nn.Module, family: Family, head: bool = True) -> dict[str, torch.Tensor]:
    """HF tensor name -> tensor for this model, the map run backwards."""
    out = {}
    for ours, tensor in unique_state_dict(model).items():
        sources, template = _sources(family, ours)
        parts = (tensor.split(_part_sizes(len(sources), tensor.size(0), model.config), dim=0)
                 if len(sources) > 1 else (tensor,))
        for name, part in zip(sources, parts):
            if template in family.transposed:
                part = part.t()
            if template in family.row:
                part = part[None]
            out[name if head else _strip(family, name)] = part.contiguous()
    return out


def save_hf(model: torch.nn.Module, directory: PathLike, tokenizer=None, side_files_from: Optional[PathLike] = None
            ) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json, model.safetensors, tokenizer files)
    that transformers' ``AutoModel…from_pretrained`` loads with the same outputs."""
    from ..model import TransformerLM

    family = family_for(model.config)
    # a BERT without its MLM head (MiniLM) is a bare BertModel; any bare backbone likewise
    head = isinstance(model, TransformerLM) and (family is not BERT or model.config.mlm_transform)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_to_hf(model, family, head)
    pooler = getattr(model, "hf_pooler", None)
    if family is BERT and not head and pooler:  # BertModel has the pooler; BertForMaskedLM does not
        tensors.update({name: pooler[name].contiguous() for name in POOLER})
    hf_config = config_to_hf(model.config, family, head)
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"))
    save_weights(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    copied = _copy_side_files(side_files_from, directory)
    if GENERATION_NAME not in copied and model.config.extra.get("generation"):
        settings = generation_to_hf(model.config)
        atomic_write(directory / GENERATION_NAME, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(directory)
        if "tokenizer_config.json" not in copied:
            _write_tokenizer_config(tokenizer, model.config, directory)
    return directory


def _copy_side_files(source: Optional[PathLike], directory: Path) -> list[str]:
    copied = []
    if source is not None and Path(source).resolve() != directory.resolve():
        for name in HF_SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)
                copied.append(name)
    return copied


def _write_tokenizer_config(tokenizer, config: TransformerConfig, directory: Path) -> None:
    """Enough for AutoTokenizer to load tokenizer.json with the right special tokens."""
    special = {}
    for key, idx in (("pad_token", config.pad_token_id), ("bos_token", config.bos_token_id),
                     ("eos_token", config.eos_token_id)):
        token = tokenizer.id_to_token(idx)
        if token is not None:
            special[key] = token
    for key, token in (("unk_token", "<unk>"), ("mask_token", "<mask>")):
        if tokenizer.token_to_id(token) is not None:
            special[key] = token
    data = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings, **special}
    atomic_write(directory / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


# --------------------------------------------------------------------------- tokenizers and folders
def load_tokenizer(directory: PathLike):
    """The tokenizer beside a model folder (zenlm or Hugging Face), from its tokenizer.json.

    The pad token named in an HF folder's tokenizer_config.json is honoured. transformers adds
    special tokens by default; to encode exactly as it does, pass ``add_special_tokens=True``
    (BERT's [CLS] … [SEP]) to ``encode``/``encode_batch``."""
    from ..tokenizer import Tokenizer

    directory = Path(directory)
    if not (directory / TOKENIZER_NAME).exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (folders with only vocab.txt or *.spm files "
                                "need `AutoTokenizer.from_pretrained(...).save_pretrained(...)` once to create it)")
    tokenizer = Tokenizer.load(directory)
    pad = _special_token(directory, "pad_token")
    if pad is not None and tokenizer.token_to_id(pad) is not None:
        tokenizer.pad_token = pad
    return tokenizer


def _special_token(directory: Path, key: str) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            value = read_json(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def convert_from_hf(source: PathLike, out: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """HF folder → zenlm checkpoint folder (config.json, model.safetensors, tokenizer.json).

    The HF tokenizer_config/special_tokens_map/generation_config files ride along so that
    ``convert_to_hf`` gives them back unchanged."""
    from ..checkpoint import save_pretrained

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError(f"source and output are the same folder ({source}); pick a new output folder")
    model = load_hf(source, dtype=dtype)
    tokenizer = load_tokenizer(source) if (source / TOKENIZER_NAME).exists() else None
    if tokenizer is None:
        log.warning("%s has no tokenizer.json; the converted checkpoint has no tokenizer", source)
    save_pretrained(model, out, tokenizer)
    if getattr(model, "hf_pooler", None):
        save_weights(model.hf_pooler, out / POOLER_FILE, metadata={"format": "pt"})
    _copy_side_files(source, out)
    return out


def convert_to_hf(source: PathLike, out: PathLike) -> Path:
    """zenlm checkpoint folder → HF folder that transformers loads."""
    from ..checkpoint import load_model

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError(f"source and output are the same folder ({source}); pick a new output folder")
    if is_hf_folder(source):
        raise ValueError(f"{source} is already a Hugging Face folder (its config.json has a model_type)")
    model = load_model(source)
    if (source / POOLER_FILE).is_file():
        from ..checkpoint import load_weights

        model.hf_pooler = load_weights(source / POOLER_FILE)
    tokenizer = load_tokenizer(source) if (source / TOKENIZER_NAME).exists() else None
    return save_hf(model, out, tokenizer, side_files_from=source)
