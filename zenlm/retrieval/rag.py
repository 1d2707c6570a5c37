"""Retrieval-augmented answers: search the index, put the best passages in the prompt,
generate, and say which passages the answer rests on.

The prompt numbers nothing: each passage is shown under its own id in brackets, and the
model is asked to cite those ids. ``Answer.citations`` lists the passages the model
was given (the answer is conditioned on all of them); ``Answer.cited`` those whose
ids the generated text actually names. Passages are shortened, last ones first, so that
prompt plus answer fit the generator's context window; nothing is cut silently — the
answer records how many passage tokens were dropped.

A generator whose tokenizer carries a chat template (an imported instruct model) is asked
through it: the instruction, passages and question are the user's message, formatted by
``zenlm.data.encode_chat`` with the assistant prompt (the same path as ``zenlm chat`` and the
server), and the answer stops at the template's end tokens. Without a template the prompt is
plain text ending in ``Answer:``, as before (``chat=True`` formats it with zenlm's ``<|role|>``
template instead, for a model fine-tuned on chats).
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


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The ids the generator reads for ``prompt``: as the user's message of a chat (the model's
    template, with the assistant prompt) when ``chat``, else the plain text."""
    if chat:
        from ..data import encode_chat

        return encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    return tokenizer.encode(prompt, add_special_tokens=True)


def build_prompt(question: str, hits: list[Hit], tokenizer, budget: int, chat: bool = False
                 ) -> tuple[str, list[Hit], int]:
    """The prompt, the passages it holds, and how many passage tokens did not fit in ``budget``
    (counted as the generator reads it: inside the chat template when ``chat``)."""
    def render(parts: list[tuple[Hit, str]]) -> str:
        body = "\n\n".join(f"[{h.id}] {text}" for h, text in parts)
        if chat:
            return f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question.strip()}"
        return f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question.strip()}\nAnswer:"

    parts = [(h, h.text if not h.title else f"{h.title}. {h.text}") for h in hits]
    dropped = 0
    while True:
        prompt = render(parts)
        over = len(prompt_ids(tokenizer, prompt, chat)) - budget
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
        max_new_tokens: int = 128, chat: bool | None = None, **generation) -> Answer:
    """Answer ``question`` from the ``k`` best passages of ``index`` with ``generator``
    (a ``TransformerLM``; its tokenizer from ``tokenizer`` or ``generator.tokenizer``).
    ``chat``: ask through the chat template (default: when the tokenizer carries a model's own)."""
    from ..generation import generate

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
    chat = tokenizer.has_chat_template if chat is None else chat
    prompt, used, dropped = build_prompt(question, hits, tokenizer, budget, chat)
    if chat:  # the rendered conversation, its ids, and every end token the model names
        from ..tasks.chat import stop_token_ids

        ids = prompt_ids(tokenizer, prompt, chat=True)
        stops = list(generation.pop("stop_token_ids", ()))
        generation["stop_token_ids"] = stops + [i for i in stop_token_ids(tokenizer, generator) if i not in stops]
        # what the generator read, as text
        prompt = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        out = generate(generator, ids, tokenizer, return_output=True, max_new_tokens=max_new_tokens, **generation)
        text = out.texts[0].strip()
    else:
        text = generate(generator, prompt, tokenizer, max_new_tokens=max_new_tokens, **generation).strip()
    ids = [h.id for h in used]
    named = set(re.findall(r"\[([^\[\]]+)\]", text))
    return Answer(question, text, ids, [i for i in ids if i in named], used, dropped, prompt)
