"""Python code completion: sample completions and measure how many ``ast.parse`` accepts.

A completion runs until the next top-level statement begins (a stop string such as
``\\ndef `` or ``\\nclass ``), so each sample is one whole definition; the share of
prompt + completion texts that parse is the syntactic-validity figure reported
next to validation perplexity for the ``stdlib-code`` recipe.
"""
from __future__ import annotations

import ast
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..generation import Generation

TOP_LEVEL_STOPS = ("\ndef ", "\nclass ", "\n@", "\nif __name__", "\n# file:")


def parses(source: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences etc. are warnings, not failures
        try:
            ast.parse(source)
        except (SyntaxError, ValueError):
            return False
    return True


def sample_definitions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
                       temperature: float = 0.8, top_p: float = 0.95, seed: int | None = 0,
                       stop_strings: Sequence[str] = TOP_LEVEL_STOPS) -> list[Generation]:
    """One sampled completion per prompt (a ``Generation``), cut at the next top-level statement.
    ``finish_reason`` tells a completed definition ("stop") from one cut by the token budget
    ("length"), which cannot parse however good the code so far is."""
    from ..generation import Generator

    generator = Generator(model, tokenizer)
    return [generator.generate(prompt, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                               temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                               seed=None if seed is None else seed + i, stop_strings=list(stop_strings),
                               truncate=True)[0]
            for i, prompt in enumerate(prompts)]


def complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int | None = 0, stop_strings: Sequence[str] = TOP_LEVEL_STOPS) -> list[str]:
    """One sampled completion text per prompt, cut at the next top-level statement."""
    return [g.text for g in sample_definitions(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed,
                                               stop_strings)]


def parse_share(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Share of prompt + completion texts that ``ast.parse`` accepts."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many completions as prompts (> 0), got {len(prompts)} and {len(completions)}")
    return sum(parses(p + c) for p, c in zip(prompts, completions)) / len(prompts)


def definition_prompts(source: str, limit: int = 50) -> list[str]:
    """Prompts from real code: each top-level function's signature line and docstring opening,
    e.g. ``def name(args):\\n`` taken from held-out files."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    prompts = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            header = "".join(lines[node.lineno - 1: node.body[0].lineno - 1])
            if header.rstrip().endswith(":"):
                prompts.append(header)
        if len(prompts) >= limit:
            break
    return prompts


__all__ = ["TOP_LEVEL_STOPS", "complete", "definition_prompts", "parse_share", "parses", "sample_definitions"]
