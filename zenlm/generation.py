"""Decoding: greedy, beam search and sampling over the model's preallocated KV cache.

Each logits rule (temperature, top-k, top-p, min-p, repetition penalty, n-gram
blocking, bad words, minimum length) is a small function of the scores; a
strategy composes them in Hugging Face's order, so that greedy and beam search
pick exactly the tokens ``transformers``' ``generate()`` picks for the same weights.

The engine runs a batch of prompts of different lengths at once (left padding
with positions from the mask for decoder-only models; a padded source for
encoder-decoder models, whose encoder runs once and whose cross-attention keys
and values are cached after the first step). Rows that finish leave the batch
and the cache, so they stop costing compute. ``Generator.stream`` yields text
deltas that never split a multi-byte character and never show a stop string.

This module is long (~900 lines) because the engine is one piece: the batch, its cache, the logits
rules, constraints and the three strategies share the same rows and slots.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import kernels as _kernels
from .model import KVCache

Prompt = Union[str, Sequence[int], torch.Tensor]
EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # Hugging Face's "very unlikely" score for masked beams; kept for identical tie-breaking

_FAST = threading.Lock()
_FAST_STATE = {"users": 0, "before": False}


def _device(model: torch.nn.Module) -> torch.device:
    """The model's device, read from its first parameter (or buffer): ``embed_tokens.weight`` of a
    quantized model (zenlm.quantize) dequantizes the whole table on every read, a step's worth of work."""
    first = next(model.parameters(), None)
    return (first if first is not None else next(model.buffers())).device


@contextmanager
def _fast_cpu(enabled: bool):
    """``zenlm.fast_cpu()`` while at least one decoding call wants it; the caller's own setting is
    restored when the last one ends (a counter, so concurrent calls from threads do not undo each other)."""
    if not enabled:
        yield
        return
    with _FAST:
        if _FAST_STATE["users"] == 0:
            _FAST_STATE["before"] = dict(_kernels._FAST_CPU)
            _kernels.fast_cpu(True)
        _FAST_STATE["users"] += 1
    try:
        yield
    finally:
        with _FAST:
            _FAST_STATE["users"] -= 1
            if _FAST_STATE["users"] == 0:
                _kernels._FAST_CPU.update(_FAST_STATE["before"])


# --------------------------------------------------------------------------- settings
@dataclass
class GenerationConfig:
    """What to generate and how. Defaults decode greedily; ``do_sample`` turns on sampling
    (a temperature of 0 means greedy even then)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    bad_words_ids: Sequence[Sequence[int]] = ()
    forced_bos_token_id: Optional[int] = None  # the first token (transformers' forced_bos_token_id)
    forced_eos_token_id: Optional[Union[int, Sequence[int]]] = None  # the token at max_new_tokens
    renormalize_logits: bool = False  # beam scores re-normalised after the rules (MarianMT's default)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1
    eos_token_id: Optional[Union[int, Sequence[int]]] = None  # None = the model config's eos_token_id
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: Optional[int] = None
    logprobs: bool = False  # per-token log-probabilities of the chosen tokens (model distribution)
    truncate: bool = False  # cut an over-long prompt instead of raising
    skip_special_tokens: bool = True
    # fp32 linear layers (and the LM head) through oneDNN while decoding on CPU (zenlm.fast_cpu for the
    # duration of the call): on CPUs where torch's MKL matrix-vector products are slow (AMD EPYC here) a
    # decoding step is ~1.5-3x faster; results equal to float rounding. False keeps torch's default path.
    fast_cpu: bool = True
    # batch-1 decoder-only decoding through the captured step (zenlm.decode_step: the whole step as one
    # torch.compile'd graph over a fixed-shape cache). The first call per shape compiles (tens of seconds, cached
    # on disk for later processes); same tokens as eager. Models it cannot take decode eagerly.
    compile: bool = False
    # constrained decoding (zenlm.constraints, llguidance): at most one of these; each step allows only the
    # tokens the grammar can take, stop tokens only where it is complete
    json_schema: Optional[Union[dict, str, bool]] = None  # a JSON schema (dict or its JSON text)
    regex: Optional[str] = None  # the whole output matches this regular expression
    grammar: Optional[str] = None  # a Lark grammar (or llama.cpp's GBNF)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})

    @property
    def constrained(self) -> bool:
        return (self.json_schema is not None or self.regex is not None or self.grammar is not None
                or bool(self.json_object))

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = (self.stop_token_ids,)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the value and the allowed range."""

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        integer("max_new_tokens", 1)
        integer("min_new_tokens", 0)
        integer("top_k", 0)
        integer("no_repeat_ngram_size", 0)
        integer("num_beams", 1)
        integer("num_return_sequences", 1)
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in EARLY_STOPPING or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be one of True, False, 'never'; got {self.early_stopping!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        if self.num_beams > 1 and self.sampling:
            raise ValueError(f"beam search (num_beams={self.num_beams}) with sampling is not supported; "
                             "use num_beams=1 to sample or do_sample=False for beams")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if self.num_beams == 1 and not self.sampling and self.num_return_sequences != 1:
            raise ValueError(f"greedy decoding returns 1 sequence per prompt, got num_return_sequences="
                             f"{self.num_return_sequences}; sample (do_sample=True) or use beams")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings (length >= 1), got {s!r}")
        for words in self.bad_words_ids:
            if isinstance(words, int) or not len(words):
                raise ValueError(f"bad_words_ids must be a list of non-empty token id lists, got {words!r}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            ids = [value] if isinstance(value, int) or value is None else list(value)
            if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids if t is not None) or ids == []:
                raise ValueError(f"{name} must be a token id >= 0 (or a list of them for eos), got {value!r}")
        constraints = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        constraints += ["json_object"] if self.json_object else []
        if len(constraints) > 1:
            raise ValueError(f"give one constraint at a time, got {' and '.join(constraints)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) and self.temperature > 0

    @classmethod
    def build(cls, config: Optional["GenerationConfig"] = None, **options) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")
        if config is None:
            return cls(**options)
        return cls(**{**{f.name: getattr(config, f.name) for f in fields(cls)}, **options})


@dataclass
class Generation:
    """One generated sequence: the new token ids (a final stop/eos token included, as in
    ``transformers``), its text without special tokens or the stop string, and why it ended."""

    token_ids: list[int]
    text: Optional[str] = None
    finish_reason: str = "length"  # "stop" (eos / stop token / stop string) or "length"
    logprobs: Optional[list[float]] = None
    score: Optional[float] = None  # beam search: length-normalised sum of log-probabilities
    prompt_tokens: int = 0


@dataclass
class GenerationOutput:
    """Every prompt's ``num_return_sequences`` generations, prompt-major (as ``transformers``)."""

    generations: list[Generation] = field(default_factory=list)

    @property
    def texts(self) -> list[Optional[str]]:
        return [g.text for g in self.generations]

    @property
    def token_ids(self) -> list[list[int]]:
        return [g.token_ids for g in self.generations]

    def __len__(self) -> int:
        return len(self.generations)

    def __getitem__(self, i: int) -> Generation:
        return self.generations[i]


# --------------------------------------------------------------------------- logits rules
# Each rule maps scores (N, V) to new scores (N, V). ``history`` holds each row's tokens so far
# (prompt + generated) where a rule needs them.
def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores."""
    if k <= 0 or k >= scores.size(-1):
        return scores
    kth = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[..., -1] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0:
        return scores
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, -math.inf)


def apply_repetition_penalty(scores: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already present: positive scores divided, negative multiplied."""
    if penalty == 1.0:
        return scores
    width = max(len(h) for h in history)
    # pad each row with its own first token: duplicates change nothing
    index = torch.tensor([h + h[:1] * (width - len(h)) for h in history], device=scores.device)
    picked = scores.gather(1, index)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, index, picked)


def apply_no_repeat_ngram(scores: torch.Tensor, history: list[list[int]], n: int) -> torch.Tensor:
    """Forbid any token that would repeat an n-gram already in the row."""
    if n <= 0:
        return scores
    scores = scores.clone()
    for row, tokens in enumerate(history):
        if len(tokens) + 1 < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]
        if banned:
            scores[row, banned] = -math.inf
    return scores


def apply_bad_words(scores: torch.Tensor, history: list[list[int]], bad_words_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Forbid the last token of each bad sequence when the row ends with the rest of it."""
    if not bad_words_ids:
        return scores
    scores = scores.clone()
    for words in bad_words_ids:
        words = list(words)
        head, last = words[:-1], words[-1]
        for row, tokens in enumerate(history):
            if not head or tokens[len(tokens) - len(head):] == head:
                scores[row, last] = -math.inf
    return scores


def apply_min_new_tokens(scores: torch.Tensor, generated: int, min_new_tokens: int, stop_ids: Sequence[int]) -> torch.Tensor:
    """Forbid stopping before ``min_new_tokens`` tokens."""
    if generated >= min_new_tokens or not stop_ids:
        return scores
    scores = scores.clone()
    scores[:, list(stop_ids)] = -math.inf
    return scores


def apply_forced(scores: torch.Tensor, rows: Sequence[bool], token_ids: Union[int, Sequence[int]]) -> torch.Tensor:
    """In the chosen rows, allow only ``token_ids``, each scored 0 (as transformers' ForcedBOS/EOS)."""
    if not any(rows):
        return scores
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    scores = scores.clone()
    index = torch.tensor([i for i, r in enumerate(rows) if r], device=scores.device)
    scores[index] = -math.inf
    scores[index[:, None], torch.tensor(ids, device=scores.device)[None]] = 0.0
    return scores


def process_scores(scores: torch.Tensor, history: list[list[int]], generated: int, config: GenerationConfig,
                   stop_ids: Sequence[int]) -> torch.Tensor:
    """The rules in ``transformers``' order: penalties and bans first, then the sampling warpers."""
    scores = apply_repetition_penalty(scores, history, config.repetition_penalty)
    scores = apply_no_repeat_ngram(scores, history, config.no_repeat_ngram_size)
    scores = apply_bad_words(scores, history, config.bad_words_ids)
    scores = apply_min_new_tokens(scores, generated, config.min_new_tokens, stop_ids)
    if config.forced_bos_token_id is not None:  # at the first position of the sequence (cur_len 1)
        scores = apply_forced(scores, [len(h) == 1 for h in history], config.forced_bos_token_id)
    if config.forced_eos_token_id is not None and generated + 1 == config.max_new_tokens:
        scores = apply_forced(scores, [True] * len(history), config.forced_eos_token_id)
    if config.sampling:
        if config.temperature != 1.0:
            scores = apply_temperature(scores, config.temperature)
        scores = apply_top_k(scores, config.top_k)
        scores = apply_top_p(scores, config.top_p)
        scores = apply_min_p(scores, config.min_p)
    return scores


def _forcing(config: GenerationConfig) -> bool:
    return config.forced_bos_token_id is not None or config.forced_eos_token_id is not None


# --------------------------------------------------------------------------- model state
class _DecoderOnlyState:
    """Left-padded prompts in one cache; positions count real tokens only."""

    def __init__(self, model, rows: list[list[int]], max_new_tokens: int, pad_id: int, compile: bool = False):
        self.model, n, width = model, len(rows), max(len(r) for r in rows)
        device = _device(model)
        self.ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            self.ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
        self.ids, mask = self.ids.to(device), mask.to(device)
        self.padded = not bool(mask.all())
        self.cache = KVCache(width + max_new_tokens, trim_windows=True)  # sliding-window layers keep ~2 windows
        self.captured = None  # one row: the compiled step over a fixed-shape cache (zenlm.decode_step)
        if compile and n == 1:
            from . import decode_step as _capture
            if _capture.captures(model.config) is None:
                self.captured = _capture.decode_step(model)
                limit = model.config.max_position_embeddings
                self.cache = _capture.StaticKVCache(_capture.capacity_bucket(width + max_new_tokens, limit))
        self.mask = self.positions = None
        if self.padded:
            self.mask = torch.ones((n, width + max_new_tokens), dtype=torch.bool, device=device)
            self.mask[:, :width] = mask
            self.positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefill(self) -> torch.Tensor:
        width = self.ids.size(1)
        hidden = self.model.decode(self.ids, attention_mask=self.mask[:, :width] if self.padded else None,
                                   position_ids=self.positions, cache=self.cache, name="input_ids")[0]
        if self.padded:
            self.positions = self.positions[:, -1:] + 1
        return self.model.logits(hidden[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.captured is not None:
            return self.captured(self.cache, tokens)
        if self.padded:
            hidden = self.model.decode(tokens[:, None], attention_mask=self.mask[:, :self.cache.length + 1],
                                       position_ids=self.positions, cache=self.cache, name="input_ids")[0]
            self.positions = self.positions + 1
        else:
            hidden = self.model.decode(tokens[:, None], cache=self.cache, name="input_ids")[0]
        return self.model.logits(hidden[:, -1])

    def select(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep/reorder rows: row i becomes old row index[i]."""
        self.cache.reorder(index)
        if self.padded:
            self.mask, self.positions = self.mask[index], self.positions[index]


class _Seq2SeqState:
    """The source is encoded once (per prompt, then repeated per beam); the decoder starts
    from the start token and its cross-attention keys/values are cached after step one."""

    def __init__(self, model, rows: list[list[int]], max_new_tokens: int, pad_id: int, expand: int):
        self.model, n, width = model, len(rows), max(len(r) for r in rows)
        device = _device(model)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())
        self.memory = model.encode(ids, mask if padded else None)[0]
        self.memory_mask = mask if padded else None
        # the `expand` rows (beams) of a prompt share its source: cross-attention keys/values are kept
        # once per prompt and each group's queries attend to them together (model.Attention folds them),
        # instead of copying them per beam: a quarter of the bytes read per step at 4 beams
        self.group = expand
        self.cache = KVCache(max_new_tokens + 1)
        self.start = torch.full((n * expand,), model.config.start_token_id, dtype=torch.long, device=device)

    def prefill(self) -> torch.Tensor:
        return self.step(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        # memory and its mask hold one row per prompt; model.Attention folds each prompt's beams onto it
        hidden = self.model.decode(tokens[:, None], self.memory, self.memory_mask, cache=self.cache)[0]
        return self.model.logits(hidden[:, -1])

    def select(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep/reorder rows. ``same_source``: rows only move among beams of one prompt, which share
        the source, so the cross-attention keys/values and the source mask stay as they are. Whole
        groups that stay in order keep one source each; any other selection gives every row its own."""
        self.cache.reorder(index, cross=False)
        if same_source:
            return
        g = self.group
        groups = index.view(-1, g) // g if g > 1 and index.numel() % g == 0 else None
        if groups is not None and bool((groups == groups[:, :1]).all()):
            sources = groups[:, 0]
        else:  # rows leave one by one (sampling): expand to one source per row, then select
            if g > 1:
                self._expand()
            sources = index
        self.cache.reorder_cross(sources)
        self.memory = self.memory[sources]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask[sources]

    def _expand(self) -> None:
        g, self.group = self.group, 1
        self.cache.cross = {i: (k.repeat_interleave(g, 0), v.repeat_interleave(g, 0))
                            for i, (k, v) in self.cache.cross.items()}
        self.memory = self.memory.repeat_interleave(g, dim=0)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.repeat_interleave(g, dim=0)


# --------------------------------------------------------------------------- generator
class Generator:
    """Decode from a ``TransformerLM`` (decoder-only or encoder-decoder), optionally with a
    ``Tokenizer`` for text prompts, stop strings and streaming."""

    def __init__(self, model, tokenizer=None):
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "logits"):
            raise ValueError(f"generation needs a TransformerLM (a model with an LM head), got {type(model).__name__}")
        if config.family == "encoder-only":
            raise ValueError("an encoder-only model cannot generate; use a decoder-only or encoder-decoder model")
        self.model, self.tokenizer = model, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.config = config
        # defaults a model brought along (an imported Hugging Face folder's generation_config.json)
        self.defaults = GenerationConfig.build(**(config.extra.get("generation") or {}))

    def _on_cpu(self) -> bool:
        return _device(self.model).type == "cpu"

    # ------------------------------------------------------------------ inputs
    def _rows(self, prompts) -> tuple[list[list[int]], bool]:
        """Prompts as token id lists; also whether a single prompt was given."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dtype.is_floating_point or prompts.dtype == torch.bool or prompts.dim() not in (1, 2):
                raise ValueError(f"prompt ids must be a 1-D or 2-D integer tensor, got {prompts.dtype} "
                                 f"of shape {tuple(prompts.shape)}")
            single = prompts.dim() == 1
            prompts = [prompts.tolist()] if single else prompts.tolist()
            return [self._check_ids(p) for p in prompts], single
        if isinstance(prompts, str):
            return [self._encode(prompts)], True
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompt must be a str, a list of token ids, a list of those, or a tensor; "
                             f"got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompt is empty (0 tokens, no prompts); give at least one token")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [self._check_ids(list(prompts))], True
        return [self._encode(p) if isinstance(p, str) else self._check_ids(p) for p in prompts], False

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass tokenizer=... or give token ids")
        if not text:
            raise ValueError("prompt is empty (0 characters); give at least one token")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if not ids:
            raise ValueError("prompt is empty (0 tokens); give at least one token")
        vocab = self.config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt holds token id {t!r}, outside [0, vocab_size={vocab})")
        return ids

    def _fit(self, rows: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        """Check prompt lengths against the context window; cut them only when asked."""
        window = self.config.max_position_embeddings
        if self.config.is_encoder_decoder:
            if config.max_new_tokens + 1 > window:
                raise ValueError(f"max_new_tokens={config.max_new_tokens} (+1 start token) exceeds the decoder's "
                                 f"context window of {window} positions")
            limit, keep_end, what = window, False, "source"
        else:
            limit, keep_end, what = window - config.max_new_tokens, True, "prompt"
            if limit < 1:
                raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
                                 f"context window of {window} positions")
        out = []
        for r in rows:
            if len(r) > limit:
                if not config.truncate:
                    extra = "" if self.config.is_encoder_decoder else f" + max_new_tokens {config.max_new_tokens}"
                    raise ValueError(f"{what} is {len(r)} tokens{extra}, longer than the context window of "
                                     f"{window} positions (pass truncate=True to cut it to {limit} tokens)")
                r = r[-limit:] if keep_end else r[:limit]
            out.append(r)
        return out

    def _stop_ids(self, config: GenerationConfig) -> list[int]:
        eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        ids += [t for t in config.stop_token_ids if t not in ids]
        vocab = self.config.vocab_size
        for t in ids:
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"stop/eos token id {t!r} is outside [0, vocab_size={vocab})")
        for words in config.bad_words_ids:
            for t in words:
                if not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"bad_words_ids holds token id {t!r}, outside [0, vocab_size={vocab})")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(config, name)
            for t in [value] if isinstance(value, int) else list(value or []):
                if not t < vocab:
                    raise ValueError(f"{name} holds token id {t!r}, outside [0, vocab_size={vocab})")
        return ids

    def _state(self, rows: list[list[int]], config: GenerationConfig, expand: int):
        pad = self.config.pad_token_id
        if self.config.is_encoder_decoder:
            return _Seq2SeqState(self.model, rows, config.max_new_tokens, pad, expand)
        expanded = [r for r in rows for _ in range(expand)]
        return _DecoderOnlyState(self.model, expanded, config.max_new_tokens, pad, config.compile)

    def _history(self, rows: list[list[int]], expand: int) -> list[list[int]]:
        """Per decoding row, the tokens the rules look at (as in ``transformers``: the prompt for
        decoder-only models, the decoder's start token for encoder-decoder models)."""
        if self.config.is_encoder_decoder:
            return [[self.config.start_token_id] for _ in rows for _ in range(expand)]
        return [list(r) for r in rows for _ in range(expand)]

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, config: Optional[GenerationConfig] = None, **options) -> GenerationOutput:
        """Generate for one prompt or a batch; returns every sequence with its text (when a
        tokenizer is known), finish reason and optional log-probabilities."""
        config = GenerationConfig.build(self.defaults if config is None else config, **options)
        rows, _ = self._rows(prompts)
        rows = self._fit(rows, config)
        stop_ids = self._stop_ids(config)
        if config.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to read the text; pass tokenizer=...")
        spec = self._constraint(config)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), _fast_cpu(config.fast_cpu and self._on_cpu()):
                if config.num_beams > 1:
                    gens = self._beam_search(rows, config, stop_ids, spec=spec)
                else:
                    gens = [None] * (len(rows) * config.num_return_sequences)
                    for events in self._sample(rows, config, stop_ids, spec=spec):
                        for slot, gen in events:
                            if gen is not None:
                                gens[slot] = gen
        finally:
            self.model.train(was_training)
        for gen, row in zip(gens, (r for r in rows for _ in range(config.num_return_sequences))):
            gen.prompt_tokens = len(row)
            if self.tokenizer is not None:
                gen.text = self._text(gen.token_ids, config)[0]
        return GenerationOutput(gens)

    def stream(self, prompt, config: Optional[GenerationConfig] = None, **options) -> Iterator[str]:
        """Yield text deltas for one prompt as tokens arrive (greedy or sampling). Deltas never end
        inside a multi-byte character, and text that may begin a stop string is held back."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer; pass tokenizer=...")
        if config is None:  # a stream is one sequence: the model's defaults without their beams
            config = GenerationConfig.build(self.defaults, num_beams=1, num_return_sequences=1)
        config = GenerationConfig.build(config, **options)
        rows, single = self._rows(prompt)
        if not single or len(rows) != 1:
            raise ValueError(f"stream takes one prompt, got {len(rows)}")
        if config.num_beams > 1 or config.num_return_sequences != 1:
            raise ValueError("stream decodes one sequence: num_beams and num_return_sequences must be 1")
        rows = self._fit(rows, config)
        stop_ids = self._stop_ids(config)
        spec = self._constraint(config)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=config.skip_special_tokens)
        safe, emitted = "", 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), _fast_cpu(config.fast_cpu and self._on_cpu()):
                for events in self._sample(rows, config, stop_ids, streaming=True, spec=spec):
                    for _, gen in events:
                        if gen is None:
                            continue
                        safe += decoder.push(gen.token_ids[-1] if gen.token_ids else [])
                        visible = self._visible(safe, config.stop_strings, final=gen.finish_reason != "running")
                        if len(visible) > emitted:
                            yield visible[emitted:]
                            emitted = len(visible)
        finally:
            self.model.train(was_training)

    def _constraint(self, config: GenerationConfig):
        """The compiled grammar of ``config`` (zenlm.constraints), or None when it asks for none."""
        if not config.constrained:
            return None
        if self.tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer to know each token's bytes; pass tokenizer=...")
        from .constraints import compile_constraint
        return compile_constraint(self.tokenizer, self.config.vocab_size, json_schema=config.json_schema,
                                  regex=config.regex, grammar=config.grammar, json_object=config.json_object)

    # ------------------------------------------------------------------ text helpers
    def _text(self, token_ids: list[int], config: GenerationConfig) -> tuple[str, bool]:
        """Decoded text cut before the first stop string; and whether one was found."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=config.skip_special_tokens)
        cut = _first_stop(text, config.stop_strings)
        return (text, False) if cut is None else (text[:cut], True)

    @staticmethod
    def _visible(text: str, stop_strings: Sequence[str], final: bool) -> str:
        """What a stream may show now: text before a stop string, holding back any tail that
        could still grow into one (unless the sequence is over)."""
        cut = _first_stop(text, stop_strings)
        if cut is not None:
            return text[:cut]
        if final:
            return text
        hold = 0
        for s in stop_strings:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]

    # ------------------------------------------------------------------ greedy / sampling
    def _sample(self, rows: list[list[int]], config: GenerationConfig, stop_ids: list[int], streaming: bool = False,
                spec=None):
        """Greedy or sampled decoding. Yields, per step, (slot, Generation) for rows that took a token;
        a finished row is yielded with its final Generation and then leaves the batch. One loop on
        purpose: the step's rules, constraint masks, stop checks and row removal share its state."""
        expand = config.num_return_sequences
        state = self._state(rows, config, expand)
        history = self._history(rows, expand)
        n = len(history)
        alive = list(range(n))  # slot of each row still decoding
        gens = [Generation([], logprobs=[] if config.logprobs else None, finish_reason="running") for _ in range(n)]
        stop_set = set(stop_ids)
        generator = None
        if config.sampling:  # without a seed, draw one from torch's global generator (so manual_seed governs)
            generator = torch.Generator(device=_device(self.model))
            generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(0, 2 ** 62, ())))
        rules = (config.repetition_penalty != 1.0 or config.no_repeat_ngram_size or config.bad_words_ids
                 or config.min_new_tokens or config.sampling or _forcing(config))
        constraints = [spec.new() for _ in range(n)] if spec is not None else None
        if constraints is not None:
            from .constraints import apply_masks, prefetch_masks
        logits = state.prefill()
        for step in range(config.max_new_tokens):
            scores = logits.float()
            if constraints is not None:  # the grammar's allowed tokens, before every other rule
                scores = apply_masks(scores, [constraints[s] for s in alive], stop_ids)
                allowed = scores
            if rules:
                scores = process_scores(scores, [history[s] for s in alive], step, config, stop_ids)
                if constraints is not None:  # a rule that banned every allowed token gives way to the grammar
                    empty = scores.amax(dim=-1) == float("-inf")  # (a quarter of isfinite().any()'s time)
                    if bool(empty.any()):
                        scores = torch.where(empty[:, None], allowed, scores)
            if config.sampling:
                tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                tokens = scores.argmax(dim=-1)
            token_list = tokens.tolist()
            chosen_lp = None
            if config.logprobs:
                chosen_lp = logits.float().log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1).tolist()
            last = step + 1 == config.max_new_tokens
            keep, events = [], []
            for i, (slot, tok) in enumerate(zip(alive, token_list)):
                gen = gens[slot]
                gen.token_ids.append(tok)
                history[slot].append(tok)
                if chosen_lp is not None:
                    gen.logprobs.append(chosen_lp[i])
                done = tok in stop_set
                if not done and constraints is not None:  # complete grammar: the sequence is over
                    constraint = constraints[slot]
                    constraint.advance(tok)
                    done = constraint.done
                if not done and config.stop_strings:
                    done = self._text(gen.token_ids, config)[1]
                if done:
                    gen.finish_reason = "stop"
                elif last:
                    gen.finish_reason = "length"
                else:
                    keep.append(i)
                if streaming or done or last:
                    events.append((slot, gen))
            yield events
            if not keep:
                break
            if len(keep) < len(alive):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=tokens.device)
                state.select(index)
                tokens = tokens[index]
                alive = [alive[i] for i in keep]
            if constraints is not None:  # the next masks are computed while the forward runs
                prefetch_masks([constraints[s] for s in alive])
            logits = state.step(tokens)

    # ------------------------------------------------------------------ beam search
    def _beam_search(self, rows: list[list[int]], config: GenerationConfig, stop_ids: list[int],
                     spec=None) -> list[Generation]:
        """Beam search scored as ``transformers`` does: the best ``num_beams`` finished hypotheses per
        prompt, each scored sum(log p) / length**length_penalty, with the same stopping heuristic.
        A prompt whose result can no longer change leaves the batch. Long because it is transformers'
        algorithm step by step (select, finish, keep, stop) over a batch of prompts, kept in one place so
        that it can be read against theirs; the parity tests (tests/hf/test_generate_parity.py) hold it there."""
        nb, max_new, lp_pow = config.num_beams, config.max_new_tokens, config.length_penalty
        state = self._state(rows, config, nb)
        history = self._history(rows, nb)
        device = _device(self.model)
        vocab = self.config.vocab_size
        keep_k = max(2, 1 + len(stop_ids)) * nb
        stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device)
        items = list(range(len(rows)))  # prompt of each active beam group
        generated: list[list[int]] = [[] for _ in range(len(rows) * nb)]
        logps: list[list[float]] = [[] for _ in range(len(rows) * nb)]
        running = torch.zeros((len(rows), nb), device=device)
        running[:, 1:] = NEG
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in rows]
        unsatisfied = [True] * len(rows)
        results: list[Optional[list[Generation]]] = [None] * len(rows)
        # constrained decoding: each beam its own grammar state, copied when a beam forks; a beam whose grammar
        # is complete may take only a stop token next, so it finishes as a hypothesis the usual way
        constraints = [spec.new() for _ in range(len(rows) * nb)] if spec is not None else None
        if constraints is not None:
            from .constraints import apply_masks
            stop_set = set(stop_ids)
        logits = state.prefill()
        for step in range(max_new):
            groups = len(items)
            raw = logits.float().log_softmax(dim=-1)
            scores = raw
            if constraints is not None:
                scores = apply_masks(raw, constraints, stop_ids)
            if (config.repetition_penalty != 1.0 or config.no_repeat_ngram_size or config.bad_words_ids
                    or config.min_new_tokens or _forcing(config)):
                scores = process_scores(scores, history, step, config, stop_ids)
                if config.renormalize_logits:
                    scores = scores.log_softmax(dim=-1)
            scores = (scores.view(groups, nb, vocab) + running[:, :, None]).view(groups, nb * vocab)
            top_lp, top_idx = scores.topk(keep_k, dim=1)
            src_beam, tokens = top_idx // vocab, top_idx % vocab
            hits = torch.isin(tokens, stop_tensor) if stop_ids else torch.zeros_like(tokens, dtype=torch.bool)
            if step + 1 >= max_new:
                hits = torch.ones_like(hits)
            elif config.stop_strings:
                hits = hits | self._stop_string_hits(generated, src_beam, tokens, nb, config)
            # the next running beams: the best candidates that did not just finish
            masked = top_lp + hits.float() * NEG
            pick = masked.topk(nb, dim=1).indices
            running = masked.gather(1, pick)
            next_src = src_beam.gather(1, pick)
            next_tok = tokens.gather(1, pick)
            # finished hypotheses: only the top nb candidates may enter, as in transformers
            normed = (top_lp / ((step + 1) ** lp_pow)).tolist()
            hits_l, src_l, tok_l = hits[:, :nb].tolist(), src_beam[:, :nb].tolist(), tokens[:, :nb].tolist()
            raw_tok = None
            if config.logprobs:
                raw_tok = raw.view(groups, nb, vocab)
            for g, item in enumerate(items):
                hyps = finished[item]
                if not unsatisfied[item] or (config.early_stopping is True and len(hyps) == nb):
                    continue
                for j in range(nb):
                    if hits_l[g][j]:
                        row = g * nb + src_l[g][j]
                        lps = None
                        if raw_tok is not None:
                            lps = logps[row] + [float(raw_tok[g, src_l[g][j], tok_l[g][j]])]
                        hyps.append((normed[g][j], generated[row] + [tok_l[g][j]], lps))
                hyps.sort(key=lambda h: -h[0])
                del hyps[nb:]
            # stopping heuristic, per prompt (transformers' _check_early_stop_heuristic)
            length = max_new if (config.early_stopping == "never" and lp_pow > 0) else step + 1
            best = (running[:, :1] / (length ** lp_pow)).squeeze(1).tolist()
            done = []
            for g, item in enumerate(items):
                hyps = finished[item]
                if len(hyps) == nb:
                    unsatisfied[item] = unsatisfied[item] and best[g] > min(h[0] for h in hyps)
                if (not unsatisfied[item] or (config.early_stopping is True and len(hyps) == nb)
                        or step + 1 >= max_new):
                    done.append(g)
            # the running beams' tokens (and log-probs) for the next step
            src_rows = [g * nb + s for g, srcs in enumerate(next_src.tolist()) for s in srcs]
            next_tokens = next_tok.reshape(-1)
            tok_flat = next_tokens.tolist()
            new_generated = [generated[r] + [t] for r, t in zip(src_rows, tok_flat)]
            new_history = [history[r] + [t] for r, t in zip(src_rows, tok_flat)]
            new_constraints = None
            if constraints is not None:
                new_constraints = [constraints[r].copy() for r in src_rows]
                for c, t in zip(new_constraints, tok_flat):
                    if t not in stop_set:
                        c.advance(t)
            if config.logprobs:
                vals = raw[torch.tensor(src_rows, device=device), next_tokens].tolist()
                logps = [logps[r] + [v] for r, v in zip(src_rows, vals)]
            for g in done:
                results[items[g]] = self._beam_results(finished[items[g]], config, set(stop_ids))
            if len(done) == groups:
                break
            if done:
                keep_groups = [g for g in range(groups) if g not in set(done)]
                keep_rows = [g * nb + j for g in keep_groups for j in range(nb)]
                index = torch.tensor([src_rows[r] for r in keep_rows], device=device)
                state.select(index)
                running = running[torch.tensor(keep_groups, device=device)]
                next_tokens = next_tokens[torch.tensor(keep_rows, device=device)]
                new_generated = [new_generated[r] for r in keep_rows]
                new_history = [new_history[r] for r in keep_rows]
                if new_constraints is not None:
                    new_constraints = [new_constraints[r] for r in keep_rows]
                if config.logprobs:
                    logps = [logps[r] for r in keep_rows]
                items = [items[g] for g in keep_groups]
            else:
                state.select(torch.tensor(src_rows, device=device), same_source=True)
            generated, history, constraints = new_generated, new_history, new_constraints
            logits = state.step(next_tokens)
        return [gen for group in results for gen in group]

    def _stop_string_hits(self, generated, src_beam, tokens, nb, config) -> torch.Tensor:
        hits = torch.zeros_like(tokens, dtype=torch.bool)
        for g, (srcs, toks) in enumerate(zip(src_beam.tolist(), tokens.tolist())):
            for j, (s, t) in enumerate(zip(srcs, toks)):
                hits[g, j] = self._text(generated[g * nb + s] + [t], config)[1]
        return hits

    def _beam_results(self, hyps, config: GenerationConfig, stop_set: set) -> list[Generation]:
        out = []
        for score, tokens, lps in hyps[:config.num_return_sequences]:
            stopped = bool(tokens) and tokens[-1] in stop_set
            if not stopped and config.stop_strings and self.tokenizer is not None:
                stopped = self._text(tokens, config)[1]
            out.append(Generation(list(tokens), finish_reason="stop" if stopped else "length", logprobs=lps,
                                  score=score))
        return out


def _first_stop(text: str, stop_strings: Sequence[str]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found) if found else None


# --------------------------------------------------------------------------- convenience
def generate(model, prompt, tokenizer=None, config: Optional[GenerationConfig] = None, return_output: bool = False,
             **options):
    """One call from Python: a str prompt gives a str (a list of them for several return
    sequences), a list of str gives a list, token ids give token id lists.
    ``return_output=True`` gives the full ``GenerationOutput`` (finish reasons, log-probs)."""
    gen = Generator(model, tokenizer)
    out = gen.generate(prompt, config, **options)
    if return_output:
        return out
    per = GenerationConfig.build(config, **options).num_return_sequences
    text_input = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                             and all(isinstance(p, str) for p in prompt))
    values = out.texts if text_input and gen.tokenizer is not None else out.token_ids
    single = isinstance(prompt, str) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1) or (
        isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, int) for p in prompt))
    if single:
        return values[0] if per == 1 else values
    return values
