"""GGUF out and in: hand a model to llama.cpp / Ollama, and read their files back.

``export_gguf(model, tokenizer, "model.gguf", type="f32"|"f16"|"q8_0")`` writes what llama.cpp's own
converter (``convert_hf_to_gguf.py``) writes for the same model: the architecture name (llama, qwen2,
qwen3, phi3, gemma, gemma2, gemma3), its hyper-parameter keys, its tensor names (``token_embd.weight``,
``blk.N.attn_q.weight``, ..., ``output_norm.weight``, ``output.weight`` unless tied; Gemma's norms as
w + 1) and the tokenizer (``tokenizer.ggml.*``: a byte-level BPE as model "gpt2" with its merges; a
SentencePiece-style byte-fallback BPE (Llama 2, Mistral, Gemma) as model "llama" with scores; a
Unigram as model "t5"; token types, special ids and chat template with each).

``load_gguf("model.gguf")`` reads such a file (f32, f16, bf16, q8_0 and, through the ``gguf``
package's dequantizers, q4_0/q4_1/q5_0/q5_1/q4_K/q5_K/q6_K) back into a ``TransformerLM`` with its
``Tokenizer`` as ``model.tokenizer``; ``zenlm.load("model.gguf")`` comes here.

Architectures are data (``ARCHS``): one ``Arch`` record per llama.cpp architecture says which zenlm
config it takes, how its rotary layout differs and which extra tensors it has. Adding a family is one
record there. Rotary layout: zenlm (like Hugging Face) rotates the pairs (x_i, x_{i+d/2}) of a head;
llama.cpp's ``llama`` architecture rotates (x_{2i}, x_{2i+1}), so its converter permutes the rows of
the q and k projections per head (``permute`` below, the converter's own formula) and we undo it on
the way in. ``qwen2``, ``qwen3``, ``phi3`` and the gemmas use the NeoX layout, which is ours: no permutation.

The ``gguf`` package (written by the llama.cpp project) is imported inside the functions only, so
``import zenlm`` does not need it: ``pip install 'zenlm[gguf]'``.

Why it is one long module: writing and reading share the ``ARCHS`` records, the tensor-name plan,
the rotary permutation and the tokenizer fields; keeping both directions beside those tables is what
keeps them the inverse of each other.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .config import TransformerConfig
from .model import TransformerLM
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
TYPES = ("f32", "f16", "q8_0")  # what export_gguf writes (llama.cpp's converter: --outtype f32|f16|q8_0)

# tokenizer.ggml.pre names of the byte-level pre-tokenizers zenlm knows, by the Split regex in front
# of a ByteLevel(use_regex=False) (a bare ByteLevel with its GPT-2 regex is "gpt-2")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}
_GPT2_PRE = ("gpt-2", "default")

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# the zenlm key that carries what llama.cpp's keys cannot say (llama3 rope parameters)
_ZENLM_ROPE_KEY = "zenlm.rope_scaling"


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture, as data.

    ``accepts(config)`` lists what of a zenlm config the architecture cannot express (empty: it
    maps); ``interleaved_rope``: llama.cpp rotates adjacent pairs, so q/k rows are permuted on the
    way out; ``layer_tensors``: our per-layer tensor name suffix -> GGUF suffix(es) (a tuple: our
    fused tensor split in that order along dim 0); ``config_from_gguf`` adds the flags the
    architecture implies when reading."""

    name: str
    interleaved_rope: bool
    accepts: Callable[[TransformerConfig], list[str]]
    config_from_gguf: Callable[[dict, set[str]], dict] = lambda kv, tensors: {}
    layer_tensors: dict[str, Any] = field(default_factory=dict)
    # Gemma's RMSNorm scales by (1 + w): llama.cpp's converter stores w + 1 in every "*norm.weight"
    norm_offset: float = 0.0
    # the keys only this architecture has (softcaps, sliding window, ...), written after the common ones
    write_hparams: Callable[[Any, TransformerConfig], None] = lambda w, c: None


_COMMON_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.qkv.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "attn.qkv.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "attn.out.weight": "attn_output.weight",
    "attn.out.bias": "attn_output.bias",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.fc_in.weight": ("ffn_gate.weight", "ffn_up.weight"),
    "mlp.fc_in.bias": ("ffn_gate.bias", "ffn_up.bias"),
    "mlp.fc_out.weight": "ffn_down.weight",
    "mlp.fc_out.bias": "ffn_down.bias",
}
_QK_NORM_LAYER = {"attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight"}
_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "decoder.final_norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _rmsnorm_rope_swiglu(c: TransformerConfig) -> list[str]:
    """What keeps a decoder from being the pre-norm RMSNorm + rotary + SwiGLU transformer that
    llama.cpp's llama/qwen2/qwen3 graphs compute."""
    bad = []

    def want(name: str, ok: bool, value: Any = None):
        if not ok:
            bad.append(f"{name}={getattr(c, name) if value is None else value!r}")

    want("num_encoder_layers", c.num_encoder_layers == 0)
    want("num_decoder_layers", c.num_decoder_layers > 0)
    want("norm", c.norm == "rmsnorm")
    want("norm_unit_offset", not c.norm_unit_offset)
    want("pre_norm", c.pre_norm)
    want("final_norm", c.final_norm)
    want("sandwich_norm", not c.sandwich_norm)
    want("embedding_norm", not c.embedding_norm)
    want("scale_embedding", not c.scale_embedding)
    want("type_vocab_size", c.type_vocab_size == 0)
    want("mlm_transform", not c.mlm_transform)
    want("lm_head_bias", not c.lm_head_bias)
    want("position", c.position == "rotary")
    want("activation", c.activation == "swiglu")
    want("partial_rotary_factor", c.partial_rotary_factor == 1.0)
    want("attn_logit_softcap", c.attn_logit_softcap is None)
    want("final_logit_softcap", c.final_logit_softcap is None)
    want("query_pre_attn_scalar", c.query_pre_attn_scalar is None)
    want("rope_local_theta", c.rope_local_theta is None)
    # llama.cpp's llama graph attends to every position: a window that never binds is fine
    if not (c.sliding_window is None or c.sliding_window >= c.max_position_embeddings):
        bad.append(f"sliding_window={c.sliding_window} (llama.cpp's graph attends to every position; "
                   "export_gguf(..., ignore_sliding_window=True) writes it as llama.cpp's converter does, "
                   "equal within the window)")
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind not in (None, "linear", "llama3", "yarn"):
        bad.append(f"rope_scaling rope_type={kind!r} (llama.cpp computes linear, llama3 and yarn)")
    if kind == "yarn":
        extra = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if scaling.get(k) is not None]
        if extra or scaling.get("truncate", True) is False:
            bad.append(f"rope_scaling yarn with {', '.join(extra) or 'truncate=False'} "
                       "(llama.cpp computes yarn's default attention factor only)")
    return bad


def _llama_accepts(c: TransformerConfig) -> list[str]:
    bad = _rmsnorm_rope_swiglu(c)
    if c.qk_norm:
        bad.append("qk_norm=True")
    if c.qkv_bias is not None and c.qkv_bias != c.bias:
        bad.append(f"qkv_bias={c.qkv_bias} with bias={c.bias}")
    return bad


def _qwen2_accepts(c: TransformerConfig) -> list[str]:
    bad = _rmsnorm_rope_swiglu(c)
    if c.qk_norm:
        bad.append("qk_norm=True")
    if c.bias or not c.qkv_bias:
        bad.append(f"bias={c.bias}, qkv_bias={c.qkv_bias} (qwen2: bias on q/k/v only)")
    return bad


def _qwen3_accepts(c: TransformerConfig) -> list[str]:
    bad = _rmsnorm_rope_swiglu(c)
    if not c.qk_norm:
        bad.append("qk_norm=False")
    if c.bias or c.qkv_bias:
        bad.append(f"bias={c.bias}, qkv_bias={c.qkv_bias} (qwen3: no biases)")
    return bad


def _phi3_accepts(c: TransformerConfig) -> list[str]:
    # llama.cpp's phi3 graph: NeoX rotary over the first rope.dimension_count dims (partial rotary)
    bad = [b for b in _rmsnorm_rope_swiglu(c) if not b.startswith("partial_rotary_factor")]
    if c.qk_norm:
        bad.append("qk_norm=True")
    if c.bias or c.qkv_bias:
        bad.append(f"bias={c.bias}, qkv_bias={c.qkv_bias} (phi3: no biases)")
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        bad.append("rope_scaling rope_type='llama3' (llama.cpp reads rope_freqs for llama only)")
    return bad


_PHI3_LAYER = {"attn_norm.weight": "attn_norm.weight", "attn.qkv.weight": "attn_qkv.weight",
               "attn.out.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
               "mlp.fc_in.weight": "ffn_up.weight",  # gate|up fused, gate first, as HF's gate_up_proj
               "mlp.fc_out.weight": "ffn_down.weight"}

# ---- Gemma, Gemma 2, Gemma 3: what llama.cpp's graphs (src/models/gemma*.cpp) compute and read
_GEMMA_BLOCKS = {"gemma": 0, "gemma2": 2, "gemma3": 6}  # llama.cpp's default sliding pattern (0: no window)
_GEMMA_BIG = {"gemma2": 46, "gemma3": 62}  # the 27B block counts: llama.cpp scales scores by 1/sqrt(hidden/heads)


def gemma_query_scalar(arch: str, hidden: int, heads: int, head_dim: int, layers: int) -> float:
    """The query_pre_attn_scalar llama.cpp's gemma graphs use: it is not a GGUF key, llama.cpp derives
    it from the model size (hidden/heads for the 27B models, head_dim for every other)."""
    return float(hidden // heads if layers == _GEMMA_BIG.get(arch) else head_dim)


def swa_layers(pattern: Any, layers: int) -> list[bool]:
    """Which layers attend within the window, from ``attention.sliding_window_pattern`` as llama.cpp
    reads it: a per-layer bool array, or a period n (layer i slides unless i % n == n - 1; 0: all)."""
    if isinstance(pattern, list):
        return [bool(p) for p in pattern][:layers]
    n = int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(layers)]


def _gemma_accepts(version: str) -> Callable[[TransformerConfig], list[str]]:
    """What keeps a config from being llama.cpp's ``version`` graph (Gemma: (1+w) RMSNorm, embeddings
    times sqrt(hidden), tanh-GELU GeGLU, output tied to the embeddings; Gemma 2 adds norms after
    attention and the MLP, both softcaps and alternating sliding layers; Gemma 3 drops the attention
    softcap, adds q/k norms and a local rope base, and may untie the output)."""
    def accepts(c: TransformerConfig) -> list[str]:
        bad = []

        def want(name: str, ok: bool, why: str = ""):
            if not ok:
                bad.append(f"{name}={getattr(c, name)!r}" + (f" ({why})" if why else ""))

        want("num_encoder_layers", c.num_encoder_layers == 0)
        want("num_decoder_layers", c.num_decoder_layers > 0)
        want("norm", c.norm == "rmsnorm")
        want("norm_unit_offset", c.norm_unit_offset)
        want("pre_norm", c.pre_norm)
        want("final_norm", c.final_norm)
        want("sandwich_norm", c.sandwich_norm == (version != "gemma"))
        want("scale_embedding", c.scale_embedding)
        want("embedding_norm", not c.embedding_norm)
        want("type_vocab_size", c.type_vocab_size == 0)
        want("mlm_transform", not c.mlm_transform)
        want("lm_head_bias", not c.lm_head_bias)
        want("position", c.position == "rotary")
        want("activation", c.activation == "geglu_tanh", "llama.cpp's gemma graphs compute the tanh GELU")
        want("partial_rotary_factor", c.partial_rotary_factor == 1.0)
        want("bias", not c.bias)
        want("qkv_bias", not c.qkv_bias)
        want("qk_norm", c.qk_norm == (version == "gemma3"))
        want("tie_word_embeddings", c.tie_word_embeddings or version == "gemma3",
             f"llama.cpp's {version} graph reads its output from the token embeddings")
        scalar = gemma_query_scalar(version, c.hidden_size, c.num_attention_heads, c.head_dim, c.num_decoder_layers)
        want("query_pre_attn_scalar", c.query_pre_attn_scalar in (None, scalar) if version != "gemma2" else
             c.query_pre_attn_scalar == scalar, f"llama.cpp uses {scalar:g} at this size")
        want("attn_logit_softcap", (c.attn_logit_softcap is not None) == (version == "gemma2"),
             "llama.cpp soft-caps attention in gemma2 and only there")
        want("final_logit_softcap", c.final_logit_softcap is not None or version != "gemma2",
             "llama.cpp's gemma2 graph always soft-caps the logits")
        want("final_logit_softcap", c.final_logit_softcap is None or version != "gemma")
        if version == "gemma":
            want("sliding_window", c.sliding_window is None or c.sliding_window >= c.max_position_embeddings,
                 "llama.cpp's gemma graph attends to every position")
            want("rope_local_theta", c.rope_local_theta is None)
        kind = (c.rope_scaling or {}).get("rope_type")
        if kind not in (None, "linear"):
            bad.append(f"rope_scaling rope_type={kind!r} (zenlm writes gemma with linear scaling only)")
        sliding = c.sliding_window is not None and any(c.is_sliding(i) for i in range(c.num_decoder_layers))
        if kind and sliding and version == "gemma3" and c.rope_local_theta is None:
            bad.append("rope_scaling on the sliding layers (llama.cpp's gemma3 scales the global layers' rope only; "
                       "set rope_local_theta)")
        if kind and sliding and version == "gemma2" and c.rope_local_theta is not None:
            bad.append("rope_scaling with rope_local_theta (llama.cpp's gemma2 scales the sliding layers' rope too)")
        return bad
    return accepts


def _gemma_hparams(w, c: TransformerConfig) -> None:
    """Softcaps, the window and which layers slide, the local rope base (gemma2, gemma3)."""
    if c.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(float(c.attn_logit_softcap))
    if c.final_logit_softcap is not None:
        w.add_final_logit_softcapping(float(c.final_logit_softcap))
    if w.arch == "gemma":
        return
    layers = c.num_decoder_layers
    slides = [c.is_sliding(i) for i in range(layers)]
    if not any(slides):
        if w.arch == "gemma2":  # llama.cpp's gemma2 always has sliding layers unless the pattern says none
            w.add_sliding_window_pattern([False] * layers)
        return
    w.add_sliding_window(int(c.sliding_window))
    if slides != swa_layers(_GEMMA_BLOCKS[w.arch], layers):  # the converter writes no pattern for the default
        w.add_sliding_window_pattern(slides)
    if c.rope_local_theta is not None:
        w.add_rope_freq_base_swa(float(c.rope_local_theta))
    elif w.arch == "gemma3":  # llama.cpp's gemma3 default local base is 10000, ours is the global one
        w.add_rope_freq_base_swa(float(c.rope_theta))


def _gemma_from_gguf(version: str) -> Callable[[dict, set[str]], dict]:
    """The zenlm flags of a gemma/gemma2/gemma3 file, with llama.cpp's defaults for absent keys."""
    def convert(meta: dict, tensors: set[str]) -> dict:
        def key(name, default=None):
            return meta.get(f"{version}.{name}", default)

        layers, heads = int(key("block_count")), int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", hidden // heads))
        out: dict[str, Any] = dict(norm_unit_offset=True, scale_embedding=True, activation="geglu_tanh",
                                   sandwich_norm=version != "gemma", qk_norm=version == "gemma3", bias=False,
                                   qkv_bias=None)
        if version != "gemma":
            out["query_pre_attn_scalar"] = gemma_query_scalar(version, hidden, heads, head_dim, layers)
        if version == "gemma2":
            out["attn_logit_softcap"] = _f32(key("attn_logit_softcapping", 50.0))
            out["final_logit_softcap"] = _f32(key("final_logit_softcapping", 30.0))
        elif version == "gemma3" and key("final_logit_softcapping"):
            out["final_logit_softcap"] = _f32(key("final_logit_softcapping"))
        window = key("attention.sliding_window", 4096 if version == "gemma2" else None)
        if version != "gemma" and window:
            slides = swa_layers(key("attention.sliding_window_pattern", _GEMMA_BLOCKS[version]), layers)
            if any(slides):
                out["sliding_window"] = int(window)
                out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in slides]
                local = key("rope.freq_base_swa", 10_000.0 if version == "gemma3" else None)
                if local is not None:
                    out["rope_local_theta"] = _f32(local)
        return out
    return convert


_GEMMA_LAYER = dict(_COMMON_LAYER, **{"attn_post_norm.weight": "post_attention_norm.weight",
                                     "mlp_post_norm.weight": "post_ffw_norm.weight"})
_GEMMA_LAYER = {k: v for k, v in _GEMMA_LAYER.items() if not k.endswith(".bias")}

ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", interleaved_rope=True, accepts=_llama_accepts, layer_tensors=dict(_COMMON_LAYER)),
    Arch("qwen2", interleaved_rope=False, accepts=_qwen2_accepts, layer_tensors=dict(_COMMON_LAYER),
         config_from_gguf=lambda kv, t: dict(bias=False, qkv_bias=True)),
    Arch("qwen3", interleaved_rope=False, accepts=_qwen3_accepts, layer_tensors={**_COMMON_LAYER, **_QK_NORM_LAYER},
         config_from_gguf=lambda kv, t: dict(qk_norm=True)),
    Arch("phi3", interleaved_rope=False, accepts=_phi3_accepts, layer_tensors=dict(_PHI3_LAYER)),
    *(Arch(v, interleaved_rope=False, accepts=_gemma_accepts(v), config_from_gguf=_gemma_from_gguf(v),
           layer_tensors={**_GEMMA_LAYER, **(_QK_NORM_LAYER if v == "gemma3" else {})}, norm_offset=1.0,
           write_hparams=_gemma_hparams) for v in ("gemma", "gemma2", "gemma3")),
)}
# which architecture a config is written as: the first in this order that maps
_EXPORT_ORDER = ("qwen3", "qwen2", "llama", "phi3", "gemma3", "gemma2", "gemma")


def arch_for(config: TransformerConfig, arch: Optional[str] = None, ignore_sliding_window: bool = False) -> Arch:
    """The llama.cpp architecture a zenlm config is written as (``arch`` to choose one); a ValueError
    naming what does not map. ``ignore_sliding_window``: write a windowed model (Mistral) as
    llama.cpp's converter does, for a graph that attends to every position (equal within the window)."""
    if ignore_sliding_window and config.sliding_window is not None:
        config = config.replace(sliding_window=None, layer_types=None)
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"unknown GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")
    problems = {}
    for name in ([arch] if arch else _EXPORT_ORDER):
        bad = ARCHS[name].accepts(config)
        if not bad:
            return ARCHS[name]
        problems[name] = bad
    # name the closest architecture's objections (fewest of them)
    name = min(problems, key=lambda n: len(problems[n]))
    raise ValueError(f"this model does not map to a llama.cpp architecture (supported: {', '.join(ARCHS)}); "
                     f"as {name!r} these settings do not map: {'; '.join(problems[name])}")


# --------------------------------------------------------------------------- rotary layout
def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter (``LlamaModel.permute``): per head, rows (0..d/2-1 | d/2..d-1) of the
    rotate-half layout become interleaved (0, d/2, 1, d/2+1, ...)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute``."""
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(c: TransformerConfig, scaling: dict) -> torch.Tensor:
    """The ``rope_freqs.weight`` tensor llama.cpp's converter writes for rope_type llama3: each
    frequency is divided by its factor (the converter's loop, in float32)."""
    dim, base = c.head_dim, c.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# the llama3 settings Meta shipped (3.1, 3.2): tried against a rope_freqs tensor from another writer
_LLAMA3_KNOWN = [dict(factor=f, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
                 for f in (8.0, 32.0, 16.0)]


# --------------------------------------------------------------------------- tokenizer out
def _tokenizer_json(tokenizer: Tokenizer) -> dict:
    return json.loads(tokenizer.backend.to_str())


def _pre_name(data: dict) -> str:
    """tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer; a ValueError for one llama.cpp lacks."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True)):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            for name, known in PRE_TOKENIZERS.items():
                if regex == known:
                    return name
            raise ValueError(f"tokenizer: the pre-tokenizer regex {regex!r} is not one llama.cpp names; "
                             f"known: GPT-2's (gpt-2), {', '.join(PRE_TOKENIZERS)}")
    raise ValueError(f"tokenizer: pre-tokenizer {json.dumps(pre)[:200]} does not map to llama.cpp "
                     "(byte-level BPE tokenizers only)")


_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _steps(part: Optional[dict], key: str) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder as its list of steps (a Sequence flattened, None empty)."""
    if not part:
        return []
    if part.get("type") == "Sequence":
        return [s for step in part.get(key) or [] for s in _steps(step, key)]
    return [part]


def _spm_space_prefix(data: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" to the text (llama.cpp's
    tokenizer.ggml.add_space_prefix), from the two forms transformers writes: the legacy normalizer
    (Prepend "▁", Replace " " -> "▁"; Gemma: Replace only) or a Metaspace pre-tokenizer that does not
    split; a ValueError for any other step, which llama.cpp's "llama" tokenizer would not apply.
    llama.cpp (like sentencepiece) prepends the space to every piece of text, after special tokens and
    before a leading space too; transformers' Metaspace skips a piece that starts with a space, and its
    "first" scheme every piece after the first: on such text the file tokenizes as llama.cpp does."""
    prefix, escaped = False, False
    for step in _steps(data.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == _SPACE:
            prefix = True
        elif kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE:
            escaped = True
        else:
            raise ValueError(f"tokenizer: normalizer step {json.dumps(step)[:120]} does not map to llama.cpp's "
                             "SentencePiece tokenizer (it escapes spaces as '▁' and may prepend one, nothing else)")
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement", _SPACE) == _SPACE and not step.get("split", True):
            escaped = True
            prefix = prefix or step.get("prepend_scheme", "always") in ("always", "first")
        elif not (kind == "Split" and step.get("pattern") == {"String": " "} and escaped):  # Gemma's: no spaces left
            raise ValueError(f"tokenizer: pre-tokenizer step {json.dumps(step)[:120]} does not map to llama.cpp's "
                             "SentencePiece tokenizer (it sees the whole text as one piece)")
    if not escaped:
        raise ValueError("tokenizer: a byte-fallback BPE that does not write spaces as '▁' is not SentencePiece-style; "
                         "llama.cpp's 'llama' tokenizer would not reproduce it")
    return prefix


def _spm_scores(data: dict, tokens: list[str], types: list[int]) -> list[float]:
    """SentencePiece scores that make llama.cpp's merge-by-score loop (``llm_tokenizer_spm``) apply a
    BPE's merges in its order: a token's score is minus the rank of the first merge producing it; a
    token no merge produces ranks below every merge (its score never decides a merge in llama.cpp)."""
    rank: dict[str, int] = {}
    for r, m in enumerate((data.get("model") or {}).get("merges") or []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    floor = len(rank) + 1
    return [float(-rank[t]) if t in rank and k == _NORMAL else
            (0.0 if k in (_CONTROL, _BYTE, _UNKNOWN) else float(-(floor + i))) for i, (t, k) in enumerate(zip(tokens, types))]


_ZENLM_NORMALIZER_KEY = "zenlm.tokenizer.normalizer"  # a normalizer llama.cpp cannot apply, for zenlm's reader


def _unigram_options(data: dict) -> dict:
    """A Unigram tokenizer.json as llama.cpp's "t5" (SentencePiece unigram, Viterbi) tokenizer sees it:
    whether a "▁" is prepended (a Metaspace pre-tokenizer's prepend_scheme), the precompiled
    character map of a SentencePiece normalizer, and an NFKC normalizer llama.cpp does not apply
    (kept under a zenlm key, and said in a warning). Anything else is a ValueError naming it."""
    model = data.get("model") or {}
    if model.get("byte_fallback"):
        raise ValueError("tokenizer: a Unigram model with byte_fallback does not map to llama.cpp (its unigram "
                         "tokenizer maps unknown characters to <unk>, never to bytes)")
    out: dict[str, Any] = dict(charsmap=None, normalizer=None, add_space_prefix=None)
    for step in _steps(data.get("normalizer"), "normalizers"):
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            import base64

            out["charsmap"] = base64.b64decode(step["precompiled_charsmap"])
        elif step.get("type") == "NFKC" and out["normalizer"] is None:
            out["normalizer"] = "NFKC"
        else:
            raise ValueError(f"tokenizer: normalizer step {json.dumps(step)[:120]} does not map to llama.cpp's "
                             "unigram tokenizer (a SentencePiece character map or NFKC only)")
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") != "Metaspace" or step.get("replacement", _SPACE) != _SPACE or out["add_space_prefix"] is not None:
            raise ValueError(f"tokenizer: pre-tokenizer step {json.dumps(step)[:120]} does not map to llama.cpp's "
                             "unigram tokenizer (one Metaspace with '▁' only)")
        out["add_space_prefix"] = step.get("prepend_scheme", "always") != "never"
    if out["add_space_prefix"] is None:
        raise ValueError("tokenizer: a Unigram model without a Metaspace pre-tokenizer keeps its spaces; llama.cpp's "
                         "unigram tokenizer writes them as '▁'")
    return out


def _tokenizer_fields(tokenizer: Tokenizer, config: TransformerConfig) -> dict:
    """Everything export_gguf writes under tokenizer.ggml.*, as plain values: a byte-level BPE as model
    "gpt2" (vocabulary and merges), a SentencePiece-style byte-fallback BPE (Llama 2, Mistral, Gemma) as
    model "llama" (vocabulary, scores, token types, whether a space is prepended)."""
    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    unigram = model.get("type") == "Unigram"
    if not (spm or unigram) and (model.get("type") != "BPE" or decoder != "ByteLevel"):
        raise ValueError(f"tokenizer: a {model.get('type')} model with a {decoder} decoder does not map to llama.cpp "
                         "(byte-level BPE: its 'gpt2' tokenizer; a byte-fallback BPE with '▁' for spaces, as Llama 2, "
                         "Mistral and Gemma have: its 'llama' SentencePiece tokenizer; a Unigram: its 't5' one)")
    if unigram:
        pre, unigram_options = "default", _unigram_options(data)
    elif spm:
        add_prefix = _spm_space_prefix(data)
        pre = "default"
    else:
        normalizer = data.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            raise ValueError(f"tokenizer: normalizer {normalizer.get('type')!r} does not map to llama.cpp")
        pre = _pre_name(data)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    if size != config.vocab_size:
        raise ValueError(f"tokenizer has ids up to {size - 1}; the model's vocab_size is {config.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    if spm:
        for i, token in enumerate(tokens):
            if types[i] == _NORMAL and _BYTE_TOKEN.fullmatch(token):
                types[i] = _BYTE
    for added in data.get("added_tokens") or []:
        i, text = added["id"], added["content"]
        if i < size:
            tokens[i] = text
            looks_special = text.startswith("<|") and text.endswith("|>")
            types[i] = _CONTROL if added.get("special") or looks_special else _USER_DEFINED
    unk = tokenizer.special_tokens.get("unk_token") or (model.get("unk_token") if spm else None)
    unk_id = tokenizer.token_to_id(unk) if unk is not None else None
    if unigram and model.get("unk_id") is not None:
        unk_id = int(model["unk_id"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # special ids: the model's own, else the tokenizer's
    encoded = tokenizer.backend.encode("a", add_special_tokens=True).ids
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    out = dict(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
               bos=config.bos_token_id, eos=config.eos_token_id,
               pad=tokenizer.pad_id if tokenizer.pad_id is not None else config.pad_token_id,
               add_bos=len(encoded) > len(plain) and encoded[0] == config.bos_token_id,
               add_eos=len(encoded) > len(plain) and encoded[-1] == config.eos_token_id,
               chat_template=tokenizer.chat_template or None)
    if unk_id is not None:
        out["unk"] = unk_id
    if spm:
        if unk_id is not None and unk_id < size:
            types[unk_id] = _UNKNOWN
        # llama.cpp's converter writes no merges for a SentencePiece vocabulary: the scores order them
        out.update(model="llama", merges=[], scores=_spm_scores(data, tokens, types), add_space_prefix=add_prefix)
    if unigram:
        if unk_id is None:
            raise ValueError("tokenizer: llama.cpp's unigram tokenizer needs an unknown token; this Unigram has none")
        types[unk_id] = _UNKNOWN
        scores = [-1e9] * size  # padding rows: never chosen
        for i, (_, score) in enumerate(model.get("vocab") or []):
            if i < size:
                scores[i] = float(score)
        out.update(model="t5", scores=[0.0 if k == _CONTROL else sc for sc, k in zip(scores, types)],
                   add_space_prefix=unigram_options["add_space_prefix"], charsmap=unigram_options["charsmap"],
                   zenlm_normalizer=unigram_options["normalizer"])
    others = [i for i in tokenizer.stop_token_ids if i != config.eos_token_id and i < size]
    if others:
        out["eot"] = others[0]  # llama.cpp stops on eos and on eot
    return out


# --------------------------------------------------------------------------- export
def _tensor_plan(model: TransformerLM, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in our layout turned into llama.cpp's) for every weight."""
    c = model.config
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    splits = {"attn.qkv": [q_dim, kv_dim, kv_dim], "mlp.fc_in": [c.intermediate_size] * 2}
    out = []
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(torch.float32).cpu()
        if name in _GLOBAL:
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            out.append((_GLOBAL[name], tensor))
            continue
        prefix = "decoder.layers."
        if not name.startswith(prefix):
            raise ValueError(f"tensor {name!r} has no place in a GGUF of architecture {arch.name!r}")
        layer, _, suffix = name[len(prefix):].partition(".")
        if suffix not in arch.layer_tensors:
            raise ValueError(f"tensor {name!r} has no place in a GGUF of architecture {arch.name!r}")
        target = arch.layer_tensors[suffix]
        if isinstance(target, tuple):
            parts = tensor.split(splits[suffix.rpartition(".")[0]], dim=0)
        else:
            parts, target = (tensor,), (target,)
        for gguf_name, part in zip(target, parts):
            if arch.interleaved_rope and gguf_name.startswith(("attn_q.", "attn_k.")):
                part = permute(part, c.num_attention_heads if gguf_name.startswith("attn_q.") else c.num_key_value_heads)
            out.append((f"blk.{layer}.{gguf_name}", part.contiguous()))
    if arch.norm_offset:
        out = [(n, t + arch.norm_offset if n.endswith("norm.weight") else t) for n, t in out]
    return out


def _write_hparams(w, c, arch: Arch, name: str, file_type) -> list:
    """general.* and the hyper-parameters, in llama.cpp's converter's words; returns the extra tensors
    the rotary scaling needs (llama3's ``rope_freqs.weight``)."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(c.num_decoder_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    w.add_key_length(c.head_dim)  # the converter writes them whenever config.json names head_dim
    w.add_value_length(c.head_dim)
    w.add_file_type(file_type)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.rotary_dim)
    scaling = dict(c.rope_scaling or {})
    kind = scaling.get("rope_type")
    extra_tensors = []
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if scaling.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(scaling["beta_fast"]))
        if scaling.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(scaling["beta_slow"]))
    elif kind == "llama3":
        extra_tensors.append(("rope_freqs.weight", llama3_rope_factors(c, scaling)))
        w.add_string(_ZENLM_ROPE_KEY, json.dumps(scaling, sort_keys=True))
    arch.write_hparams(w, c)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return extra_tensors


def _write_tokenizer(w, tok: dict) -> None:
    """tokenizer.ggml.*: the vocabulary, merges, token types, special ids and chat template."""
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    w.add_token_types(tok["types"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    if tok.get("add_space_prefix") is not None:
        w.add_add_space_prefix(bool(tok["add_space_prefix"]))
    if tok["model"] == "t5":
        w.add_remove_extra_whitespaces(False)
        if tok.get("charsmap"):
            w.add_precompiled_charsmap(tok["charsmap"])
    if tok.get("zenlm_normalizer"):
        w.add_string(_ZENLM_NORMALIZER_KEY, tok["zenlm_normalizer"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if tok.get("unk") is not None:
        w.add_unk_token_id(tok["unk"])
    if tok.get("pad") is not None:
        w.add_pad_token_id(tok["pad"])
    if tok.get("eot") is not None:
        w.add_eot_token_id(tok["eot"])
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(bool(tok["add_eos"]))
    template = tok["chat_template"]
    if template:
        w.add_chat_template(template if isinstance(template, str)
                            else [{"name": k, "template": v} for k, v in template.items()])


def _write_tensors(w, tensors: list, type: str) -> dict[str, int]:
    """Each tensor as f32, f16 or q8_0 (vectors stay f32; a matrix whose rows are not a multiple of 32
    falls back to f16); returns how many tensors each type got."""
    import gguf

    Q = gguf.GGMLQuantizationType
    counts: dict[str, int] = {}
    for gguf_name, tensor in tensors:
        data = np.asarray(tensor.numpy(), dtype=np.float32)  # the plan's tensors are float32 already: no copy
        qtype = Q.F32
        if data.ndim >= 2 and type != "f32":
            qtype = Q.F16
            if type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
                qtype = Q.Q8_0
        if qtype == Q.F32:
            w.add_tensor(gguf_name, data)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


# llama.cpp's vocabulary loader (src/llama-vocab.cpp) takes any file whose general.name contains "phi3" or
# "phi-3" for Microsoft's Phi-3 and looks these tokens up by text: without one of them the load aborts
# ("error loading model vocabulary: unordered_map::at"), whatever the architecture
_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _llamacpp_safe_name(name: str, tokens: list, warnings: list) -> str:
    """``name``, or, where llama.cpp would take it for Phi-3's and this vocabulary lacks Phi-3's tokens,
    the name with "phi3"/"phi-3" written "phi_3" (and a warning saying why)."""
    import re

    missing = [t for t in _PHI3_NAME_TOKENS if t not in set(tokens)]
    if not missing or not re.search(r"phi-?3", name, flags=re.I):
        return name
    safe = re.sub(r"(phi)-?(3)", r"\1_\2", name, flags=re.I)
    warnings.append(f"general.name {name!r} written as {safe!r}: llama.cpp takes a name containing 'phi3' for "
                    f"Phi-3's vocabulary and refuses the file when it lacks {', '.join(missing)}")
    log.warning(warnings[-1])
    return safe


def export_gguf(model: TransformerLM, tokenizer: Optional[Tokenizer], path: PathLike, type: str = "f32",
                name: Optional[str] = None, arch: Optional[str] = None, ignore_sliding_window: bool = False) -> dict:
    """Write ``model`` (and its tokenizer) as one GGUF file llama.cpp loads.

    ``type``: "f32", "f16" (matrices in half precision, norms in f32) or "q8_0" (matrices in 8-bit
    blocks of 32 with one f16 scale; a matrix whose rows are not a multiple of 32 falls back to f16,
    as in llama.cpp's converter). ``tokenizer`` defaults to ``model.tokenizer``. ``arch`` picks the
    llama.cpp architecture (default: the first of qwen3, qwen2, llama, phi3, gemma3, gemma2, gemma that
    maps). A model whose settings llama.cpp cannot compute is a ValueError naming them; a sliding window
    that the architecture's llama.cpp graph ignores (Mistral as llama) is one too, unless
    ``ignore_sliding_window`` (then a logged warning and the report's ``warnings`` say that llama.cpp
    attends to every position). Returns a small report."""
    import gguf

    if type not in TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; supported: {', '.join(TYPES)}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("a GGUF for llama.cpp carries the tokenizer: pass one (or load the model with its folder's)")
    c = model.config
    arch = arch_for(c, arch, ignore_sliding_window)
    warnings = []
    if (c.sliding_window is not None and c.sliding_window < c.max_position_embeddings
            and arch.name not in ("gemma2", "gemma3")):  # the graphs that read attention.sliding_window
        warnings.append(f"llama.cpp's {arch.name} graph attends to every position: this model's "
                        f"sliding_window={c.sliding_window} is not in the file, so llama.cpp's outputs equal "
                        f"zenlm's only while a sequence fits the window ({c.sliding_window} tokens)")
        log.warning(warnings[-1])
    tok = _tokenizer_fields(tokenizer, c)
    if tok.get("zenlm_normalizer"):
        warnings.append(f"llama.cpp does not apply the tokenizer's {tok['zenlm_normalizer']} normalizer: text it "
                        "would change tokenizes differently there (zenlm's reader applies it)")
        log.warning(warnings[-1])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        extra_tensors = _write_hparams(w, c, arch, _llamacpp_safe_name(name or c.extra.get("name") or path.stem,
                                                                        tok["tokens"], warnings), file_type)
        _write_tokenizer(w, tok)
        counts = _write_tensors(w, _tensor_plan(model, arch) + extra_tensors, type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return {"path": str(path), "architecture": arch.name, "type": type, "bytes": path.stat().st_size,
            "tensor_types": counts, "warnings": warnings}


# --------------------------------------------------------------------------- reading
# tensor types read back: plain floats, and the block formats gguf.quants dequantizes
_READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K")


def read_metadata(reader) -> dict:
    """The file's metadata keys, each value as Python (str, number, bool or list of those)."""
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _tensor_array(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (rows, cols) order; a ValueError naming a type we don't read."""
    import gguf

    kind = gguf.GGMLQuantizationType(t.tensor_type)
    if kind.name not in _READ_TYPES:
        raise ValueError(f"tensor {t.name!r} has type {kind.name}, which zenlm does not read; "
                         f"supported: {', '.join(_READ_TYPES)}")
    shape = tuple(int(n) for n in reversed(t.shape))
    if kind.name in ("F32", "F16"):
        data = np.array(t.data, dtype=np.float32)  # a copy: the reader maps the file read-only
    else:
        data = gguf.quants.dequantize(np.asarray(t.data), kind)
    return data.reshape(shape)


def _f32(value) -> float:
    """A float32 key as the shortest decimal that reads back to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _config_from_gguf(meta: dict, tensors: dict, arch: Arch) -> TransformerConfig:
    a = arch.name

    def key(name: str, default: Any = None, required: bool = True) -> Any:
        full = f"{a}.{name}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return default

    embd = tensors["token_embd.weight"]
    vocab, hidden = int(embd.shape[1]), int(embd.shape[0])
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads, required=False)
    if isinstance(kv_heads, list):
        raise ValueError(f"{a}.attention.head_count_kv varies per layer; zenlm needs one value")
    head_dim = int(key("attention.key_length", hidden // heads, required=False))
    if int(key("attention.value_length", head_dim, required=False)) != head_dim:
        raise ValueError(f"{a}.attention.value_length differs from key_length; zenlm needs them equal")
    rot = int(key("rope.dimension_count", head_dim, required=False))
    if rot != head_dim and (arch.interleaved_rope or rot % 2 or rot > head_dim):
        raise ValueError(f"{a}.rope.dimension_count={rot} differs from the head size {head_dim}: "
                         "partial rotary is not read for this architecture")
    out: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
        num_attention_heads=heads, num_key_value_heads=int(kv_heads), num_encoder_layers=0,
        num_decoder_layers=int(key("block_count")), max_position_embeddings=int(key("context_length", 2048, False)),
        pre_norm=True, norm="rmsnorm", norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        activation="swiglu", position="rotary", rope_theta=_f32(key("rope.freq_base", 10000.0, False)),
        head_size=head_dim if head_dim != hidden // heads else None,
        bias="blk.0.attn_output.bias" in tensors, tie_word_embeddings="output.weight" not in tensors,
        final_norm=True, partial_rotary_factor=rot / head_dim if rot != head_dim else 1.0)
    out["qkv_bias"] = ("blk.0.attn_q.bias" in tensors) if ("blk.0.attn_q.bias" in tensors) != out["bias"] else None
    scaling_type = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}
    elif scaling_type == "yarn":
        out["rope_scaling"] = {"rope_type": "yarn", "factor": _f32(key("rope.scaling.factor")),
                               "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        for gguf_key, ours in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if f"{a}.{gguf_key}" in meta:
                out["rope_scaling"][ours] = _f32(meta[f"{a}.{gguf_key}"])
    elif scaling_type not in ("none", None):
        raise ValueError(f"{a}.rope.scaling.type={scaling_type!r} is not supported; supported: none, linear, yarn")
    for name, field_name in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                             ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                             ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if field_name in meta and 0 <= int(meta[field_name]) < vocab:
            out[name] = int(meta[field_name])
    if "general.name" in meta:
        out["extra"] = {"name": meta["general.name"], "gguf_architecture": a}
    out.update(arch.config_from_gguf(meta, set(tensors)))
    config = TransformerConfig(**out)
    if "rope_freqs.weight" in tensors:
        config = config.replace(rope_scaling=_llama3_from_factors(meta, tensors["rope_freqs.weight"], config))
    return config


def _llama3_from_factors(meta: dict, factors_tensor, config: TransformerConfig) -> dict:
    """The llama3 rope settings behind a rope_freqs tensor: zenlm's own key when it wrote the file,
    else Meta's published settings that reproduce the tensor; a ValueError when none does."""
    factors = torch.from_numpy(_tensor_array(factors_tensor).reshape(-1).copy())
    candidates = ([json.loads(meta[_ZENLM_ROPE_KEY])] if _ZENLM_ROPE_KEY in meta else []) + \
        [{"rope_type": "llama3", **k} for k in _LLAMA3_KNOWN]
    for scaling in candidates:
        if scaling.get("rope_type") == "llama3" and torch.allclose(llama3_rope_factors(config, scaling), factors,
                                                                   rtol=1e-6, atol=0):
            return scaling
    raise ValueError("rope_freqs.weight holds per-frequency factors that match no llama3 rope setting zenlm knows "
                     "(factor 8/16/32, low 1, high 4, original 8192)")


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that replay llama.cpp's SentencePiece loop: every split (left, right) of a normal
    token into two vocabulary tokens, higher-scored tokens first (ties: the leftmost split first),
    the order transformers' SentencePiece converter gives them too."""
    ids = {}
    for i, t in enumerate(tokens):
        if types[i] in (_NORMAL, _USER_DEFINED) and t not in ids:
            ids[t] = i
    found = []
    for t, i in ids.items():
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], i, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _spm_backend(meta: dict, tokens: list[str], types: list[int], vocab: dict[str, int]):
    """A ``tokenizers`` BPE that tokenizes as llama.cpp's "llama" (SentencePiece) tokenizer: spaces as
    "▁" and one prepended when tokenizer.ggml.add_space_prefix says so (its default: yes), merges in
    score order, characters outside the vocabulary as <0xXX> byte tokens."""
    from tokenizers import models
    from tokenizers import Tokenizer as RustTokenizer

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("tokenizer.ggml.model='llama' needs tokenizer.ggml.scores, one per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, k in enumerate(types) if k == _UNKNOWN), None)
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, list(scores), types), byte_fallback=True,
                                       fuse_unk=True, unk_token=tokens[int(unk_id)] if unk_id is not None else None))
    _sentencepiece_text(backend, bool(meta.get("tokenizer.ggml.add_space_prefix", True)), byte_fallback=True)
    return backend


def _sentencepiece_text(backend, prefix: bool, byte_fallback: bool, first: Sequence = ()) -> None:
    """llama.cpp's SentencePiece text handling on a ``tokenizers`` backend: the ``first`` normalizers
    (a character map), then spaces as "▁", one "▁" prepended to each piece of text between special
    tokens when ``prefix`` (llama.cpp prefixes after each special token, and before a leading space
    too, as sentencepiece does); decoding undoes it and drops the first prepended space."""
    from tokenizers import decoders, normalizers

    steps = list(first) + ([normalizers.Prepend(_SPACE)] if prefix else []) + [normalizers.Replace(" ", _SPACE)]
    backend.normalizer = normalizers.Sequence(steps)
    out = [decoders.Replace(_SPACE, " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    backend.decoder = decoders.Sequence(out + ([decoders.Strip(" ", 1, 0)] if prefix else []))


def _unigram_backend(meta: dict, tokens: list[str], types: list[int]):
    """A ``tokenizers`` Unigram that tokenizes as llama.cpp's "t5" tokenizer: the same Viterbi over the
    scores (unknown characters -> <unk>, consecutive ones fused), spaces as "▁" with one prepended
    per piece of text when add_space_prefix says so, the file's SentencePiece character map."""
    from tokenizers import models, normalizers
    from tokenizers import Tokenizer as RustTokenizer

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("tokenizer.ggml.model='t5' needs tokenizer.ggml.scores, one per token")
    if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
        raise ValueError("tokenizer.ggml.remove_extra_whitespaces=true is not supported (zenlm reads unigram "
                         "vocabularies that keep their spaces)")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, k in enumerate(types) if k == _UNKNOWN), None)
    backend = RustTokenizer(models.Unigram([(t, float(sc)) for t, sc in zip(tokens, scores)],
                                           unk_id=None if unk_id is None else int(unk_id), byte_fallback=False))
    first = []
    if meta.get(_ZENLM_NORMALIZER_KEY) == "NFKC":
        first.append(normalizers.NFKC())
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        first.append(normalizers.Precompiled(bytes(bytearray(int(b) & 0xFF for b in charsmap))))
    _sentencepiece_text(backend, bool(meta.get("tokenizer.ggml.add_space_prefix", True)), byte_fallback=False,
                        first=first)
    return backend


def _tokenizer_from_gguf(meta: dict) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama", "t5"):
        raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                         "'llama' (SentencePiece BPE with byte fallback), 't5' (SentencePiece unigram)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2" if kind == "gpt2" else "default")
    if kind == "gpt2" and pre not in _GPT2_PRE and pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(_GPT2_PRE + tuple(PRE_TOKENIZERS))}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if kind == "llama":
        backend = _spm_backend(meta, tokens, types, vocab)
    elif kind == "t5":
        backend = _unigram_backend(meta, tokens, types)
    else:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
        if pre in PRE_TOKENIZERS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
            if pre == "qwen2":
                backend.normalizer = normalizers.NFC()
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
    # control and unknown tokens are special (llama.cpp leaves both out of decoded text), user-defined ones not
    added = [AddedToken(tokens[i], special=types[i] != _USER_DEFINED, normalized=False)
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED, _UNKNOWN)]
    special = [t for t in added if t.special]
    if special:
        backend.add_special_tokens(special)
    if len(added) > len(special):
        backend.add_tokens([t for t in added if not t.special])

    def token(field_name: str) -> Optional[str]:
        i = meta.get(field_name)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    # llama.cpp's defaults when the keys are absent: SentencePiece BPE adds BOS, unigram (t5) EOS, BPE neither
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", kind == "t5") and eos is not None
    if add_bos or add_eos:
        first, last = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} {first.replace(':0', ':1')}$B:1{last.replace(':0', ':1')}",
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(
                ([bos] if add_bos else []) + ([eos] if add_eos else []))])
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": token("tokenizer.ggml.unknown_token_id"),
                "pad_token": token("tokenizer.ggml.padding_token_id")}
    template: Any = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates") or []
    if names:
        template = {**({"default": template} if template else {}),
                    **{n: meta[f"tokenizer.chat_template.{n}"] for n in names if f"tokenizer.chat_template.{n}" in meta}}
    eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if k in meta]
    return Tokenizer(backend, pad_token=specials["pad_token"], chat_template=template or None,
                     special_tokens={k: v for k, v in specials.items() if v is not None},
                     eos_token_ids=list(dict.fromkeys(eos_ids)))


def load_gguf(path: PathLike, dtype: Optional[torch.dtype] = None) -> TransformerLM:
    """Read a GGUF file (llama, qwen2, qwen3, phi3, gemma, gemma2, gemma3) into a TransformerLM, its
    tokenizer (gpt2, llama or t5 vocabulary) as ``model.tokenizer``.

    Quantized matrices are dequantized to float32 (then cast to ``dtype`` when given). An
    architecture, tensor type, tokenizer or setting zenlm cannot compute is a ValueError naming it.
    Long because it is the checklist of those refusals, each with its own message, beside the load."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on a file that is not GGUF
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {', '.join(ARCHS)}")
    arch = ARCHS[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    config = _config_from_gguf(meta, tensors, arch)
    with torch.device("meta"):
        expected = TransformerLM(config).state_dict()

    # our name -> (GGUF names, in concatenation order)
    wanted: dict[str, tuple[str, ...]] = {}
    for ours in expected:
        if ours in _GLOBAL:
            wanted[ours] = (_GLOBAL[ours],)
            continue
        layer, _, suffix = ours[len("decoder.layers."):].partition(".")
        if suffix not in arch.layer_tensors:
            raise ValueError(f"{path}: zenlm's {ours!r} has no GGUF tensor in architecture {arch_name!r}")
        target = arch.layer_tensors[suffix]
        wanted[ours] = tuple(f"blk.{layer}.{t}" for t in (target if isinstance(target, tuple) else (target,)))
    used = {n for names in wanted.values() for n in names} | {"rope_freqs.weight"}
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"{path}: tensor {unknown[0]!r} (architecture {arch_name!r}) has no place in zenlm's model"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    state = {}
    for ours, names in wanted.items():
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensor {missing[0]!r}")
        parts = []
        for n in names:
            part = torch.from_numpy(np.ascontiguousarray(_tensor_array(tensors[n]), dtype=np.float32))
            if arch.interleaved_rope and n.split(".")[-2] in ("attn_q", "attn_k"):
                part = unpermute(part, config.num_attention_heads if ".attn_q." in n else config.num_key_value_heads)
            if arch.norm_offset and n.endswith("norm.weight"):
                part = part - arch.norm_offset
            parts.append(part)
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ValueError(f"{path}: tensor {names[0]!r} has shape {tuple(value.shape)}; the config gives "
                             f"{tuple(expected[ours].shape)}")
        state[ours] = value
    from .hf import _skip_init

    with _skip_init():  # every weight is replaced at once: skip the random initialisation
        model = TransformerLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.tokenizer = _tokenizer_from_gguf(meta)
    return model


def inspect_gguf(path: PathLike) -> dict:
    """Architecture, metadata keys and tensors (name, GGUF shape, type) of a GGUF file: what
    ``zenlm info model.gguf`` can print."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = read_metadata(reader)
    return {"architecture": meta.get("general.architecture"), "keys": sorted(meta),
            "tensors": [(t.name, tuple(int(n) for n in t.shape), gguf.GGMLQuantizationType(t.tensor_type).name)
                        for t in reader.tensors]}


__all__ = ["ARCHS", "Arch", "TYPES", "arch_for", "export_gguf", "inspect_gguf", "load_gguf", "permute", "unpermute"]
