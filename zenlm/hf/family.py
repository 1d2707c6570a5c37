"""The record a Hugging Face family file fills in (``Family``), and the few checks those files share.

A family is data, as in litgpt's ``convert_hf_checkpoint.py``: a map from our config fields to
HF config keys, a map from our tensor names to HF tensor names, and the layout changes that are
not renames (fused tensors, GPT-2's transposed Conv1D weights, BART's (1, vocab) logits bias).
The code that runs these maps, both ways, is in ``weights.py`` and ``configs.py``; it never
branches on a family's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ..config import TransformerConfig

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
