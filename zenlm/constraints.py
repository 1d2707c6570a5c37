"""Constrained decoding: a grammar turned into an allowed-token mask at every step.

A constraint comes from a JSON schema, from ``{"type": "json_object"}`` (any JSON object), from a
regular expression or from a Lark/GBNF grammar, and is compiled by llguidance (chosen by measurement,
see benchmarks/RESULTS.md: ~10 us per mask on a 32k byte-level BPE vocabulary on CPU, every JSON-schema
feature tried, 7.6 MB with no dependencies). llguidance is imported only here, and only when a
constraint is built, so ``import zenlm`` stays light.

``compile_constraint`` gives a ``ConstraintSpec`` (the compiled grammar, shared); each decoded sequence
takes its own ``Constraint`` from ``spec.new()``: ``mask(stop_ids)`` says which tokens may come next
(the stop tokens only where the grammar is complete), ``advance(token)`` moves it on, ``done`` says the
grammar can take nothing more (the sequence ends with finish reason "stop"). A decoding loop masks a
whole batch with ``apply_masks`` (one llguidance call, one torch op) and may start the next step's masks
with ``prefetch_masks`` before the model's forward, which they then overlap.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
SPEC_CACHE = 64  # compiled grammars kept per tokenizer, least recently used dropped


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
    """llguidance's view of the vocabulary, built once per tokenizer and vocabulary size (~0.1 s at 32k),
    and the grammars compiled over it (``compile_constraint``'s cache)."""
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
        per[vocab_size] = (llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos), OrderedDict())
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
    """A compiled grammar over one tokenizer's vocabulary; ``new()`` gives each sequence its own state, a
    copy of one matcher built here (a copy takes ~1 us, building a matcher 0.5-2 ms: per request, that
    was the engine's largest constraint cost on short requests)."""

    def __init__(self, grammar: str, ll_tokenizer, vocab_size: int, kind: str = "grammar"):
        self.grammar, self.ll_tokenizer, self.vocab_size, self.kind = grammar, ll_tokenizer, vocab_size, kind
        self.eos = ll_tokenizer.eos_token
        # compiled now: a bad grammar fails here, before any decoding
        self._start = _llguidance().LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._start.is_error():
            raise ConstraintError(f"invalid {kind}: {self._start.get_error()}")

    def new(self) -> "Constraint":
        return Constraint(self._start.deep_copy(), self.vocab_size, self.eos, (self.ll_tokenizer.vocab_size + 31) // 32)


class Constraint:
    """One sequence's place in the grammar. Its next mask may be computing on the mask thread
    (``prefetch_masks``): every use of the matcher waits for that first, since llguidance computes
    without the GIL and a matcher must not be read and moved at once."""

    def __init__(self, matcher, vocab_size: int, eos: int, words: int):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.words = words  # int32 words of its bitmask (llguidance's vocabulary may be the wider one)
        self._ahead: Optional[tuple] = None  # (future, bitmask rows, row) of a mask computed ahead

    def _settle(self) -> None:
        if self._ahead is not None:
            if self._ahead[0].cancelled():
                self._ahead = None
            else:
                self._ahead[0].result()

    @property
    def done(self) -> bool:
        """The grammar is complete and can take no further token."""
        self._settle()
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        self._settle()
        return self.matcher.is_accepting()

    def mask(self, stop_ids: Sequence[int] = ()) -> torch.Tensor:
        """Bool (vocab_size,): True where the token may come next. Stop tokens are allowed only where
        the grammar is complete; with none to stop on, the grammar's own end token stands in."""
        return torch.from_numpy(allowed_tokens([self], stop_ids, self.vocab_size)[0].copy())

    def advance(self, token: int) -> bool:
        """Consume a chosen token; False if the grammar refused it (the matcher is then in error)."""
        self._settle()
        self._ahead = None
        return bool(self.matcher.consume_token(int(token)))

    def copy(self) -> "Constraint":
        self._settle()
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.eos, self.words)


# ---------------------------------------------------------------------------------------------- masks
# Each constrained row's bitmask is written by llguidance straight into one shared int32 array, which is
# unpacked with one numpy call and laid on the logits with one torch op: per-row Python (a bool row each,
# a full bool tensor filled row by row) was most of a constrained step's extra cost on small models
# (benchmarks/RESULTS.md, issue 18). In line, each matcher fills its row in the calling thread (~6 us a
# row; llguidance's thread pool costs milliseconds at p90 to hand work over on a busy CPU). Ahead of time
# (``prefetch_masks``), the mask thread hands the rows to llguidance's LLExecutor, which computes them
# without the GIL while the model's forward runs; the per-matcher call keeps the GIL, so it would not overlap.
_THREAD = None
_EXECUTOR = None
PREFETCH_ROWS = 4  # fewer rows: a thread hand-off costs more than computing their masks in line


def _fill(matchers: list, bits: np.ndarray, rows: Optional[list[int]] = None) -> np.ndarray:
    """Bitmask rows of ``matchers`` into ``bits`` (int32, C-contiguous): row ``rows[i]`` (default i) for
    matcher i, in this thread."""
    base, stride = bits.ctypes.data, bits.shape[1] * 4
    for i, m in zip(rows if rows is not None else range(len(matchers)), matchers):
        m.unsafe_compute_mask_ptr(base + i * stride, stride)
    return bits


def _fill_apart(matchers: list, bits: np.ndarray) -> np.ndarray:
    """``_fill`` by llguidance's executor, which lets go of the GIL (run on the mask thread)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    _EXECUTOR.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.ctypes.data,
                                      bits.shape[1] * 4, bits.shape[0])
    return bits


def prefetch_masks(constraints: Sequence[Optional["Constraint"]]) -> None:
    """Start computing these constraints' next masks on the mask thread, so that they are ready when
    the model's next forward (which runs meanwhile) ends; ``allowed_tokens`` takes them then (or, if the
    thread has not started on them, computes them itself). Fewer than ``PREFETCH_ROWS`` rows: nothing
    (in line is cheaper)."""
    todo = [c for c in constraints if c is not None and c._ahead is None]
    if len(todo) < PREFETCH_ROWS or any(c.words != todo[0].words for c in todo):
        return
    global _THREAD
    if _THREAD is None:
        from concurrent.futures import ThreadPoolExecutor
        _THREAD = ThreadPoolExecutor(1, thread_name_prefix="zenlm-masks")
    bits = np.empty((len(todo), todo[0].words), dtype=np.int32)
    future = _THREAD.submit(_fill_apart, [c.matcher for c in todo], bits)
    for i, c in enumerate(todo):
        c._ahead = (future, bits, i)


def allowed_tokens(constraints: Sequence[Optional["Constraint"]], stop_ids: Union[Sequence[int], Sequence[Sequence[int]]],
                   vocab_size: int) -> Optional[np.ndarray]:
    """Bool (rows, vocab_size): True where row i's grammar allows the token next (every token for a row
    without a constraint); None when no row has one. ``stop_ids``: one list for all rows, or one per row.
    A stop token is allowed where the grammar is complete (llguidance's end-token bit says so; that token
    itself is then no longer allowed unless it is a stop token); a row whose grammar allows nothing (an
    error) may only stop."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    words = max(constraints[i].words for i in rows)
    n = len(constraints)
    bits = np.full((n, words), -1, dtype=np.int32)  # a row without a constraint: every bit set
    now, ahead = [], {}
    for i in rows:
        c = constraints[i]
        if c._ahead is None:
            now.append(i)
        else:
            ahead.setdefault(id(c._ahead[0]), []).append(i)
    for members in ahead.values():  # masks computed ahead: one wait per batch of them
        future, source, _ = constraints[members[0]]._ahead
        # not started yet (a busy CPU): computing them here is quicker than waiting for the thread
        if source.shape[1] == words and not future.cancel():
            future.result()
            bits[members] = source[[constraints[i]._ahead[2] for i in members]]
        else:
            constraints[members[0]]._settle()
            now.extend(members)
        for i in members:  # the row is taken: the next use of the matcher need not wait for anything
            constraints[i]._ahead = None
    if now:
        _fill([constraints[i].matcher for i in now], bits, now)
    stuck = np.flatnonzero(~bits.any(axis=1))  # the grammar cannot continue (an error): the row may only end
    flat = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
    per_row = len(stop_ids) > 0 and not isinstance(stop_ids[0], (int, np.integer))
    eos = constraints[rows[0]].eos
    if not per_row and all(constraints[i].eos == eos for i in rows):  # the usual case: one group
        groups = {(eos, tuple(stop_ids)): rows}
    else:
        groups = {}
        for i in rows:
            groups.setdefault((constraints[i].eos, tuple(stop_ids[i]) if per_row else tuple(stop_ids)), []).append(i)
    for (eos, stops), members in groups.items():
        if not stops:
            continue
        at = slice(None) if len(members) == n else members  # every row alike (the usual case): a view, no copy
        complete = flat[at, eos].copy()  # the grammar's end-token bit: set exactly where it is complete
        flat[at, eos] = 0
        for t in stops:
            if t < flat.shape[1]:
                flat[at, t] = complete
    allowed = flat.view(np.bool_)
    if allowed.shape[1] != vocab_size:  # contiguous rows: torch.where over a strided view costs twice as much
        width = min(vocab_size, allowed.shape[1])
        allowed = np.concatenate([allowed[:, :width], np.zeros((n, vocab_size - width), np.bool_)], 1)
        stuck = np.flatnonzero(~allowed.any(axis=1))  # (an end token past the model's vocabulary)
    for i in stuck:
        stops = (stop_ids[i] if per_row else stop_ids) or [constraints[i].eos]
        allowed[i, [t for t in stops if t < vocab_size]] = True
    return allowed


def apply_masks(scores: torch.Tensor, constraints: Sequence[Optional["Constraint"]],
                stop_ids: Union[Sequence[int], Sequence[Sequence[int]]]) -> torch.Tensor:
    """``scores`` with -inf on every token row i's grammar does not allow (rows without a constraint
    unchanged); one llguidance call for all rows and one torch op."""
    allowed = allowed_tokens(constraints, stop_ids, scores.size(-1))
    if allowed is None:
        return scores
    keep = torch.from_numpy(allowed)
    return torch.where(keep if scores.device.type == "cpu" else keep.to(scores.device), scores, float("-inf"))


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
    ll_tokenizer, compiled = _ll_tokenizer(tokenizer, vocab_size)
    # the same grammar again (a server's clients send the same schema): the compiled one, whose new()
    # copies a matcher, instead of building one again (1-3 ms holding the GIL, which the engine waits for)
    with _LOCK:
        spec = compiled.get(source)
        if spec is not None:
            compiled.move_to_end(source)
            return spec
    spec = ConstraintSpec(source, ll_tokenizer, vocab_size, kind)
    with _LOCK:
        compiled[source] = spec
        while len(compiled) > SPEC_CACHE:
            compiled.popitem(last=False)
    return spec
