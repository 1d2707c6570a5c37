"""Constrained decoding: a grammar turned into an allowed-token mask at every step.

A constraint comes from a JSON schema, from ``{"type": "json_object"}`` (any JSON object), from a
regular expression or from a Lark/GBNF grammar, and is compiled by llguidance (chosen by measurement,
see benchmarks/RESULTS.md: ~10 us per mask on a 32k byte-level BPE vocabulary on CPU, every JSON-schema
feature tried, 7.6 MB with no dependencies). llguidance is imported only here, and only when a
constraint is built, so ``import zenlm`` stays light.

``compile_constraint`` gives a ``ConstraintSpec`` (the compiled grammar, shared); each decoded sequence
takes its own ``Constraint`` from ``spec.new()``: ``mask(stop_ids)`` says which tokens may come next
(the stop tokens only where the grammar is complete), ``advance(token)`` moves it on, ``done`` says the
grammar can take nothing more (the sequence ends with finish reason "stop").
"""
from __future__ import annotations

import json
import weakref
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be compiled (the message names what is wrong)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("constrained decoding (json_schema, regex, grammar, response_format) needs llguidance: "
                          "pip install 'zenlm[structured]'") from e
    return llguidance


def _backend(tokenizer) -> Any:
    """The Hugging Face ``tokenizers`` object behind a zenlm Tokenizer (or that object itself)."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if not hasattr(backend, "to_str"):
        raise ValueError(f"constrained decoding needs a tokenizer backed by Hugging Face tokenizers, got "
                         f"{type(tokenizer).__name__}")
    return backend


def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of the vocabulary, built once per tokenizer and vocabulary size (~0.1 s at 32k)."""
    llg = _llguidance()
    per = _TOKENIZERS.get(tokenizer)
    if per is None:
        per = {}
        try:
            _TOKENIZERS[tokenizer] = per
        except TypeError:  # not weak-referenceable: no cache
            pass
    if vocab_size not in per:
        backend = _backend(tokenizer)
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            eos = 0
        n_vocab = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        per[vocab_size] = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)
    return per[vocab_size]


def grammar_source(json_schema: Union[dict, str, None] = None, regex: Optional[str] = None,
                   grammar: Optional[str] = None, json_object: bool = False) -> Optional[str]:
    """llguidance's grammar text for exactly one of the four kinds; None when none is given."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                  ("json_object", json_object or None)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give one constraint at a time, got {' and '.join(given)}")
    llg = _llguidance()
    M = llg.LLMatcher
    options = {"whitespace_flexible": False}  # compact JSON: fewer tokens, no runaway whitespace
    if json_object:
        return M.grammar_from_json_schema({"type": "object"}, defaults=options)
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if isinstance(json_schema, bool):
            json_schema = {} if json_schema else {"not": {}}
        if not isinstance(json_schema, dict):
            raise ConstraintError(f"json_schema must be a JSON object (a dict), got {type(json_schema).__name__}")
        try:
            return M.grammar_from_json_schema(json_schema, defaults=options)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid json_schema: {e}") from None
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError(f"regex must be a string, got {type(regex).__name__}")
        return M.grammar_from_regex(regex)
    if not isinstance(grammar, str):
        raise ConstraintError(f"grammar must be a string (Lark or GBNF), got {type(grammar).__name__}")
    if "::=" in grammar:  # GBNF (llama.cpp's grammars)
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            grammar = gbnf_to_lark(grammar)
        except Exception as e:
            raise ConstraintError(f"invalid GBNF grammar: {e}") from None
    return M.grammar_from_lark(grammar)


class ConstraintSpec:
    """A compiled grammar over one tokenizer's vocabulary; ``new()`` gives each sequence its own state."""

    def __init__(self, grammar: str, ll_tokenizer, vocab_size: int, kind: str = "grammar"):
        self.grammar, self.ll_tokenizer, self.vocab_size, self.kind = grammar, ll_tokenizer, vocab_size, kind
        self.eos = ll_tokenizer.eos_token
        first = self.new()  # compile now: a bad grammar fails here, before any decoding
        self._first: Optional[Constraint] = first

    def new(self) -> "Constraint":
        first = getattr(self, "_first", None)
        if first is not None:
            self._first = None
            return first
        llg = _llguidance()
        matcher = llg.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {self.kind}: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.eos)


class Constraint:
    """One sequence's place in the grammar."""

    def __init__(self, matcher, vocab_size: int, eos: int):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos

    @property
    def done(self) -> bool:
        """The grammar is complete and can take no further token."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def mask(self, stop_ids: Sequence[int] = ()) -> torch.Tensor:
        """Bool (vocab_size,): True where the token may come next. Stop tokens are allowed only where
        the grammar is complete; with none to stop on, the grammar's own end token stands in."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        if len(allowed) < self.vocab_size:
            allowed = np.concatenate([allowed, np.zeros(self.vocab_size - len(allowed), dtype=bool)])
        if stop_ids:
            if self.eos < self.vocab_size:
                allowed[self.eos] = False
            ok = self.matcher.is_accepting()
            for t in stop_ids:
                if t < self.vocab_size:
                    allowed[t] = ok
        if not allowed.any():  # the grammar cannot continue (an error): let the sequence end
            for t in list(stop_ids) or [self.eos]:
                if t < self.vocab_size:
                    allowed[t] = True
        return torch.from_numpy(allowed)

    def advance(self, token: int) -> bool:
        """Consume a chosen token; False if the grammar refused it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(int(token)))

    def copy(self) -> "Constraint":
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.eos)


def compile_constraint(tokenizer, vocab_size: int, json_schema: Union[dict, str, None] = None,
                       regex: Optional[str] = None, grammar: Optional[str] = None,
                       json_object: bool = False) -> Optional[ConstraintSpec]:
    """The compiled constraint for these options (None when none is given); ConstraintError names a
    schema, regex or grammar that cannot be compiled."""
    source = grammar_source(json_schema, regex, grammar, json_object)
    if source is None:
        return None
    if tokenizer is None:
        raise ValueError("constrained decoding needs a tokenizer to know each token's bytes; pass tokenizer=...")
    kind = ("json_schema" if json_schema is not None else "regex" if regex is not None
            else "grammar" if grammar is not None else "json_object")
    return ConstraintSpec(source, _ll_tokenizer(tokenizer, vocab_size), vocab_size, kind)


def apply_mask(scores: torch.Tensor, masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """-inf on every disallowed token of the rows that have a mask (None: the row is free)."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    if not rows:
        return scores
    allowed = torch.ones(scores.shape, dtype=torch.bool)
    for i in rows:
        allowed[i] = masks[i]
    return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
