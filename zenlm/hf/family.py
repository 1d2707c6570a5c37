"""The record a Hugging Face family file fills in (``Family``), and the few checks those files share.

A family is data, as in litgpt's ``convert_hf_checkpoint.py``: a map from our config fields to
HF config keys, a map from our tensor names to HF tensor names, and the layout changes that are
not renames (fused tensors, GPT-2's transposed Conv1D weights, BART's (1, vocab) logits bias).
The code that runs these maps, both ways, is in ``weights.py`` and ``configs.py``; it never
branches on a family's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..config import ROPE_SCALINGS, TransformerConfig

Source = Union[str, tuple[str, ...]]  # one HF tensor, or several concatenated along dim 0
REQUIRED = object()  # marks an HF config key without a default


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
    # entries of ``weights`` that depend on the config (T5: one ``wi`` for a plain MLP, ``wi_0|wi_1`` for a gated one)
    weights_for: Optional[Callable[[TransformerConfig], dict[str, Source]]] = None


ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str, family: str, table: dict[str, str] = ACT_FROM_HF) -> str:
    """Our activation for an HF ``hidden_act``/``activation_function`` value."""
    if name not in table:
        raise ValueError(f"{family}: activation {name!r} is not supported; supported: {', '.join(sorted(table))}")
    return table[name]


def activation_to_hf(name: str, family: str) -> str:
    """The HF activation name for ours."""
    if name not in ACT_TO_HF:
        raise ValueError(f"{family} has no {name!r} activation; it has {', '.join(ACT_TO_HF)}")
    return ACT_TO_HF[name]


def require_equal(h: dict, family: str, *pairs: tuple[str, str]) -> None:
    """Our model shares one value between the encoder and decoder stacks."""
    for a, b in pairs:
        if b in h and a in h and h[a] != h[b]:
            raise ValueError(f"{family}: {a}={h[a]} differs from {b}={h[b]}; zenlm needs them equal")


def require_off(h: dict, family: str, *keys: str) -> None:
    """HF config switches zenlm has no counterpart for: each must be absent or false."""
    for key in keys:
        if h.get(key):
            raise ValueError(f"{family}: {key}={h[key]!r} is not supported (zenlm needs it off)")


# --------------------------------------------------------------------------- rotary settings
def rope_from_hf(h: dict, family: str, params: Optional[dict] = None, default_theta: float = 10000.0) -> dict:
    """Our rope_theta / rope_scaling / partial_rotary_factor (and, for ``dynamic``, the longer
    max_position_embeddings it extends to) from an HF config: transformers 5's ``rope_parameters``
    or the older ``rope_scaling`` + top-level ``rope_theta``. A rope type zenlm cannot compute is
    an error naming it."""
    params = dict(params if params is not None else (h.get("rope_parameters") or h.get("rope_scaling") or {}))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or h.get("rope_theta") or default_theta
    partial = params.pop("partial_rotary_factor", None) or h.get("partial_rotary_factor") or 1.0
    out: dict[str, Any] = dict(rope_theta=float(theta), partial_rotary_factor=float(partial))
    if kind == "default":
        return out
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"{family}: rope_type {kind!r} is not supported; supported: default, {', '.join(ROPE_SCALINGS)}")
    window = h.get("max_position_embeddings")
    if kind == "dynamic":  # transformers' dynamic NTK starts past max_position_embeddings and never stops;
        # zenlm extends the window by the factor (the length the factor was chosen for)
        params["original_max_position_embeddings"] = window
        out["max_position_embeddings"] = int(window * params["factor"])
    elif kind in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pretraining length beside the rope settings; transformers prefers that one
        original = h.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or window
        params["original_max_position_embeddings"] = original
    out["rope_scaling"] = {"rope_type": kind, **params}
    return out


def rope_to_hf(c: TransformerConfig, theta: Optional[float] = None, scaling: Optional[dict] = None) -> dict:
    """transformers 5's ``rope_parameters`` dict for our rotary settings (those of ``c`` unless given)."""
    theta = c.rope_theta if theta is None else theta
    scaling = dict(c.rope_scaling or {}) if scaling is None else dict(scaling)
    out: dict[str, Any] = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta}
    if out["rope_type"] == "dynamic":
        scaling.pop("original_max_position_embeddings")
    out.update(scaling)
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


def rope_window_to_hf(c: TransformerConfig) -> dict:
    """HF max_position_embeddings when dynamic scaling stretched ours (see ``rope_from_hf``)."""
    if (c.rope_scaling or {}).get("rope_type") == "dynamic":
        return {"max_position_embeddings": c.rope_scaling["original_max_position_embeddings"]}
    return {}


def end_tokens_to_hf(c: TransformerConfig) -> dict:
    """config.json's eos_token_id: the whole list when the model stops on several (Llama 3)."""
    eos = (c.extra.get("generation") or {}).get("eos_token_id")
    return {"eos_token_id": list(eos)} if isinstance(eos, (list, tuple)) else {}


def first_tokens_from_hf(h: dict) -> dict:
    """bos/eos/pad ids given as lists (Llama 3 lists several end tokens): the first is the main one;
    generation stops on all of them (generation_from_hf keeps the list)."""
    return {key: h[key][0] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if isinstance(h.get(key), list)}
