"""The checks every open-model family goes through against transformers itself (tests/hf/test_<family>.py):
a tiny random model built from transformers' own config class and saved with save_pretrained, loaded by
zenlm; hidden states and logits on a padded batch longer than any sliding window; cached decoding against
the full forward; greedy and 4-beam tokens against generate(); export back to transformers.

Each check returns the largest |difference| it saw, so a run with -s can report them."""
from __future__ import annotations

from pathlib import Path

import torch

import zenlm
from zenlm.generation import Generator

ATOL = 1e-4
NEW = 24
VOCAB = 128
# prompts of different lengths (batches are left-padded); the longest is past the test windows (8)
PROMPTS = [[5, 17, 33, 8, 91, 40, 12, 77, 3, 9, 60, 61, 19], [64, 9, 21], [100, 3, 55, 56, 57, 23, 7, 44, 2]]
# the rules transformers' generate() is told to switch off, off on zenlm's side too
OFF = dict(forced_eos_token_id=None, forced_bos_token_id=None, bad_words_ids=(), renormalize_logits=False)


def build(transformers, config_class: str, model_class: str, folder: Path, **config):
    """A random transformers model from its own config class, saved with save_pretrained."""
    torch.manual_seed(0)
    config.setdefault("vocab_size", VOCAB)
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    hf.save_pretrained(folder)
    return hf


def padded_batch(lengths=(40, 29, 35), pad: int = 0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, left-padded to the longest (as a batch of prompts is)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    assert expected[mask].std() > 1e-2, "reference outputs are (near) constant: the comparison would prove nothing"
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=1e-4)
    return float((actual[mask] - expected[mask]).abs().max())


@torch.no_grad()
def check_forward(hf, ours, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Last hidden state and logits on real positions of a padded batch."""
    ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = ours(ids, attention_mask=mask)
    return max(_close(out.last_hidden_state, ref.hidden_states[-1], mask), _close(out.logits, ref.logits, mask))


@torch.no_grad()
def check_cache(ours, ids: torch.Tensor, prefill: int = 5) -> float:
    """Prefill, then one token at a time through the KV cache: the logits of the full forward."""
    full = ours(ids).logits
    out = ours(ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.size(1)):
        out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped, full, atol=ATOL, rtol=1e-4)
    return float((stepped - full).abs().max())


def hf_generate(hf, prompts, num_beams: int, eos, pad: int, **options) -> list[list[int]]:
    """transformers' generate() on a left-padded batch, every extra logits rule off; the new tokens
    of each sequence through its first end token."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, num_beams=num_beams, max_new_tokens=NEW,
                          min_new_tokens=0, no_repeat_ngram_size=0, repetition_penalty=1.0, forced_bos_token_id=None,
                          forced_eos_token_id=None, bad_words_ids=None, suppress_tokens=None,
                          begin_suppress_tokens=None, eos_token_id=eos, pad_token_id=pad, **options)
    stops = set(eos) if isinstance(eos, list) else {eos}
    rows = []
    for seq in out[:, width:].tolist():
        end = next((i for i, t in enumerate(seq) if t in stops), None)
        rows.append(seq if end is None else seq[:end + 1])
    return rows


def check_generate(hf, ours, prompts=PROMPTS) -> dict[str, list[list[int]]]:
    """Greedy and 4-beam search give transformers' tokens (the end tokens the folder names stop both)."""
    eos = hf.generation_config.eos_token_id
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    greedy = hf_generate(hf, prompts, 1, eos, pad)
    assert len({t for row in greedy for t in row}) > 3, "degenerate reference"
    assert Generator(ours).generate(prompts, max_new_tokens=NEW, **OFF).token_ids == greedy
    beams = dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False)
    beam = hf_generate(hf, prompts, 4, eos, pad, num_return_sequences=2, length_penalty=1.0, early_stopping=False)
    assert Generator(ours).generate(prompts, max_new_tokens=NEW, **beams, **OFF).token_ids == beam
    return {"greedy": greedy, "beam": beam}


@torch.no_grad()
def check_export(transformers, hf, ours, folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """zenlm -> HF folder -> transformers' AutoModelForCausalLM: the original model's logits."""
    zenlm.hf.save_hf(ours, folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(back) is type(hf)
    return _close(back(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                  mask)


def check_all(transformers, hf, folder: Path, tmp: Path, ids=None, mask=None, cache_length=None) -> dict[str, float]:
    """Every check; ``cache_length`` limits the cached-decoding one (dynamic RoPE changes its
    frequencies with the length, so past the original window a cache holds keys rotated the old way,
    in transformers as here)."""
    ours = zenlm.load(folder)
    if ids is None:
        ids, mask = padded_batch(pad=hf.config.pad_token_id or 0)
    diffs = dict(forward=check_forward(hf, ours, ids, mask), cache=check_cache(ours, ids[:1, :cache_length]))
    check_generate(hf, ours)
    diffs["export"] = check_export(transformers, hf, ours, tmp, ids, mask)
    return diffs
