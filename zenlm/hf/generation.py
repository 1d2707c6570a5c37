"""Generation settings in and out: generation_config.json <-> ``config.extra["generation"]``.

The settings that change which tokens ``generate()`` picks (MarianMT's ``bad_words_ids=[[pad]]``
and ``forced_eos_token_id``, beam count, length limits) are read from generation_config.json (else
config.json, as transformers does); zenlm's ``Generator`` takes them as its defaults.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..checkpoint import PathLike
from ..config import TransformerConfig

log = logging.getLogger(__name__)

GENERATION_NAME = "generation_config.json"

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
    from ..generation import GenerationConfig

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
