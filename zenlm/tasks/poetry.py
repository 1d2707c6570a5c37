"""Classical Chinese poems in a fixed form (絕句 / 律詩: four or eight lines of five or seven characters).

A language model trained on the 全唐诗 (recipe ``tang-poems.yaml``) writes poems
freely; the form is enforced while decoding, line by line, by the generation
engine's own rules: every line is exactly ``chars`` new tokens (``min_new_tokens``
= ``max_new_tokens``, so it can neither stop early nor run on), and every token
that is not a single Chinese character is a bad word for that line. The line then
ends with the couplet's punctuation (，after the first half, 。after the second)
and a newline, the layout the recipe trains on (see ``prepare.poem_text``).
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from ..tokenizer import Tokenizer

FORMS = {"wujue": (4, 5), "qijue": (4, 7), "wulv": (8, 5), "qilv": (8, 7)}  # 五絕 七絕 五律 七律
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def is_hanzi(text: str) -> bool:
    return len(text) == 1 and bool(_HAN.fullmatch(text))


@lru_cache(maxsize=8)
def _banned(tokenizer: Tokenizer) -> tuple:
    """Every token id whose text is not exactly one Chinese character (as one-token bad words)."""
    banned = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if not is_hanzi(unicodedata.normalize("NFC", text)):
            banned.append((i,))
    return tuple(banned)


def write_poem(model, tokenizer: Tokenizer, title: str, lines: int = 4, chars: int = 5,
               seed: int | None = None, temperature: float = 0.8, top_k: int = 50) -> str:
    """A poem of ``lines`` lines of ``chars`` characters after ``title``, one line per call
    to the generator, each constrained to the form; returns the poem without the title."""
    from ..generation import Generator

    if not isinstance(lines, int) or lines < 1 or not isinstance(chars, int) or chars < 1:
        raise ValueError(f"lines and chars must be integers >= 1, got lines={lines!r}, chars={chars!r}")
    if not title.strip():
        raise ValueError("title is empty")
    banned = _banned(tokenizer)
    if len(banned) >= tokenizer.vocab_size:
        raise ValueError("the tokenizer has no single-character Chinese tokens; train one on Chinese text")
    generator = Generator(model, tokenizer)
    sample = temperature > 0
    poem = ""
    for i in range(lines):
        ids = tokenizer.encode(f"{title.strip()}\n{poem}")
        out = generator.generate(ids, max_new_tokens=chars, min_new_tokens=chars, bad_words_ids=banned,
                                 do_sample=sample, temperature=temperature if sample else 1.0,
                                 top_k=top_k if sample else 0, seed=None if seed is None else seed + i,
                                 truncate=True)
        poem += out[0].text + ("，" if i % 2 == 0 else "。") + "\n"
    return poem


def check_form(poem: str, lines: int, chars: int) -> bool:
    """True when the poem is ``lines`` lines of ``chars`` Chinese characters, each ending in
    the couplet's punctuation."""
    rows = poem.strip("\n").split("\n")
    if len(rows) != lines:
        return False
    for i, row in enumerate(rows):
        body, mark = row[:-1], row[-1:]
        if len(body) != chars or not all(is_hanzi(c) for c in body) or mark != ("，" if i % 2 == 0 else "。"):
            return False
    return True


__all__ = ["FORMS", "check_form", "is_hanzi", "write_poem"]
