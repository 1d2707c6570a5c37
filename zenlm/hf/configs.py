"""config.json <-> TransformerConfig through a family's field map, and the choice of family on export.

Export checks itself: a config can be written as a family only if writing it and reading it back
gives the same config and every tensor has a counterpart (``family_for``).
"""
from __future__ import annotations

from typing import Any, Optional

from ..checkpoint import PathLike
from ..config import TransformerConfig
from .families import FAMILIES, family_of
from .families.bert import BERT
from .family import REQUIRED, Family
from .generation import generation_from_hf
from .weights import hf_names, layer_template, state_names, weight_map

TRAINING_ONLY = ("dropout", "attention_dropout", "initializer_range", "extra")  # never block an export


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
    ours = state_names(config)
    weights = weight_map(family, config)
    mapped = [n for n in ours if layer_template(n)[0] in weights]
    try:
        back = config_from_hf(config_to_hf(config, family), set(hf_names(family, mapped, config=config)))
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
