"""Retrieval-augmented answers: search the index, put the best passages in the prompt,
generate, and say which passages the answer rests on.

The prompt numbers nothing: each passage is shown under its own id in brackets, and the
model is asked to cite those ids. ``Answer.citations`` lists the passages the model
was given (the answer is conditioned on all of them); ``Answer.cited`` those whose
ids the generated text actually names. Passages are shortened, last ones first, so that
prompt plus answer fit the generator's context window; nothing is cut silently — the
answer records how many passage tokens were dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .index import Hit, Index

INSTRUCTION = ("Answer the question using only the passages below. "
               "Cite the passages you use by their id in square brackets.")


@dataclass
class Answer:
    question: str
    text: str
    citations: list[str]
    cited: list[str] = field(default_factory=list)
    passages: list[Hit] = field(default_factory=list)
    dropped_tokens: int = 0
    prompt: str = ""


def build_prompt(question: str, hits: list[Hit], tokenizer, budget: int) -> tuple[str, list[Hit], int]:
    """The prompt, the passages it holds, and how many passage tokens did not fit in ``budget``."""
    def render(parts: list[tuple[Hit, str]]) -> str:
        body = "\n\n".join(f"[{h.id}] {text}" for h, text in parts)
        return f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question.strip()}\nAnswer:"

    parts = [(h, h.text if not h.title else f"{h.title}. {h.text}") for h in hits]
    dropped = 0
    while True:
        prompt = render(parts)
        over = len(tokenizer.encode(prompt, add_special_tokens=True)) - budget
        if over <= 0:
            return prompt, [h for h, _ in parts], dropped
        if not parts:
            raise ValueError(f"the question alone is {over + budget} tokens, more than the {budget} the "
                             "generator's context leaves for a prompt")
        hit, text = parts[-1]
        ids = tokenizer.encode(text)
        keep = len(ids) - over - 8  # a little slack: re-tokenising a cut text can differ slightly
        if keep < 16:
            dropped += len(ids)
            parts.pop()
        else:
            dropped += len(ids) - keep
            parts[-1] = (hit, tokenizer.decode(ids[:keep]) + " …")


def ask(index: Index, generator, question: str, k: int = 3, mode: str = "hybrid", tokenizer=None,
        max_new_tokens: int = 128, **generation) -> Answer:
    """Answer ``question`` from the ``k`` best passages of ``index`` with ``generator``
    (a ``TransformerLM``; its tokenizer from ``tokenizer`` or ``generator.tokenizer``)."""
    from ..generate import generate

    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    tokenizer = tokenizer if tokenizer is not None else getattr(generator, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the generator needs a tokenizer: pass tokenizer=... (zenlm.load_tokenizer(folder))")
    hits = index.search(question, k=k, mode=mode)
    window = generator.config.max_position_embeddings
    budget = window if generator.config.is_encoder_decoder else window - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the generator's "
                         f"context window of {window} positions")
    prompt, used, dropped = build_prompt(question, hits, tokenizer, budget)
    text = generate(generator, prompt, tokenizer, max_new_tokens=max_new_tokens, **generation).strip()
    ids = [h.id for h in used]
    named = set(re.findall(r"\[([^\[\]]+)\]", text))
    return Answer(question, text, ids, [i for i in ids if i in named], used, dropped, prompt)
