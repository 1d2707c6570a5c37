"""Continuous batching: many requests decode together, joining and leaving between steps.

One thread owns the model. Each loop it (1) admits waiting requests up to ``max_batch_size``:
their prompt is prefilled alone into a fresh ``KVCache`` and the row is merged into the running
batch cache, right-aligned, with a padding mask and its own positions; (2) runs one decoding step
for every row at once; (3) picks each row's next token with the logits rules of
``zenlm.generation`` (plus OpenAI's presence/frequency penalties) and that row's own seeded
generator; (4) drops finished or cancelled rows from the cache. A cancelled request (its client
left) leaves at the next step boundary, so its slot is free at once.

Admission is bounded and fair. A request's sequences (its prompts x n) are queued together or
not at all: ``submit_all`` raises ``Overloaded`` (503 with Retry-After) when they would take the
engine past ``max_batch_size + max_queue`` sequences, and ``RateLimited`` (429) when one owner (an
API key) would hold more than its share, ``max_batch_size + max_queue // 2``, so another owner's
request always finds room. Free batch slots go round-robin over the owners with waiting sequences:
one key's backlog never makes another key's small request wait behind all of it.
Each row is charged its share of every step's wall time (a step's time divided by the rows in
it, plus its own prefill), which the ledger turns into a compute cost.
"""
from __future__ import annotations

import collections
import logging
import math
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..generation import Generator, GenerationConfig, _first_stop, process_scores
from ..model import KVCache
from .errors import Overloaded, RateLimited

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- what a request asks for
@dataclass
class SamplingParams:
    """Per-request decoding settings, OpenAI's names and defaults (temperature 1 samples; 0 is greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    # a compiled grammar (zenlm.constraints.ConstraintSpec, from response_format): each sequence takes its
    # own state of it, which masks the row's logits at every step and ends the row when complete
    constraint: Optional[object] = None

    def rules(self) -> GenerationConfig:
        """The same settings as ``zenlm.generation``'s config, whose rules pick the tokens (validated there)."""
        return GenerationConfig(max_new_tokens=self.max_tokens, do_sample=self.temperature > 0,
                                temperature=self.temperature if self.temperature > 0 else 1.0, top_p=self.top_p,
                                stop_strings=tuple(self.stop), seed=self.seed)


def apply_presence_frequency(scores: torch.Tensor, generated: list[int], presence: float, frequency: float
                             ) -> torch.Tensor:
    """OpenAI's penalties: subtract ``presence`` once from every token already generated and
    ``frequency`` times its count."""
    if not generated or (presence == 0 and frequency == 0):
        return scores
    ids, counts = torch.tensor(generated, device=scores.device).unique(return_counts=True)
    scores = scores.clone()
    scores[..., ids] -= presence + frequency * counts.to(scores.dtype)
    return scores


@dataclass
class TokenEvent:
    """What a request receives after each of its tokens: the new visible text and, at the end, why it stopped."""

    text: str
    token_id: Optional[int]
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None  # None while running; "stop", "length" or "cancelled" at the end


class EngineRequest:
    """One sequence being decoded. ``on_event`` is called from the engine thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None],
                 request_id: str = ""):
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.config = params.rules()
        self.on_event = on_event
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.owner = None  # who queued it (an API key id): free slots go round-robin over owners
        self._counted = False  # whether it still counts against its owner's share
        self.started: Optional[float] = None
        self.first_token: Optional[float] = None
        self.compute_s = 0.0
        self.text = ""  # visible text so far (stop strings cut)
        self._decoder = None
        self._safe = ""
        self.generator: Optional[random.Random] = None  # this request's own sampling RNG (its seed)
        self.constraint = params.constraint.new() if params.constraint is not None else None

    def cancel(self) -> None:
        """The client went away: stop decoding at the next step and free the slot."""
        self.cancelled = True

    @property
    def queue_ms(self) -> int:
        return int(1000 * ((self.started or time.perf_counter()) - self.submitted))

    @property
    def compute_ms(self) -> int:
        return int(math.ceil(1000 * self.compute_s))


# --------------------------------------------------------------------------- the engine
class BatchEngine:
    """Decodes every admitted request in one batch over one ``TransformerLM``: decoder-only rows hold
    their prompt in the self-attention cache; encoder-decoder rows hold their encoded source as
    cross-attention keys/values (computed once at admission, padded to the batch's longest source)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_queue: int = 256,
                 on_step: Optional[Callable[[int, float], None]] = None):
        if model.config.family == "encoder-only":
            raise ValueError("an encoder-only model cannot generate; serve it for embeddings")
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.window = model.config.max_position_embeddings
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.on_step = on_step
        self.device = model.embed_tokens.weight.device
        # encoder-decoder rows carry their source: cross-attention keys/values live in cache.cross,
        # padded to the longest source in the batch, with this mask over them
        self.seq2seq = model.config.is_encoder_decoder
        self.memory_mask: Optional[torch.Tensor] = None
        # waiting sequences per owner, in rotation order: the owner served next is the first key
        self.waiting: dict[object, collections.deque[EngineRequest]] = {}
        self._queued = 0
        self._in_flight: dict[object, int] = collections.defaultdict(int)  # waiting + running, per owner
        self.running: list[EngineRequest] = []
        self.cache: Optional[KVCache] = None
        self.mask: Optional[torch.Tensor] = None  # (B, L) True on real cache columns
        self.positions: Optional[torch.Tensor] = None  # (B,) next position of each row
        self.pending: Optional[torch.Tensor] = None  # (B,) each row's last token, fed at the next step
        self._wake = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    # ------------------------------------------------------------------ control
    def start(self) -> "BatchEngine":
        if self._thread is None:
            with torch.inference_mode():  # pay torch's first-call costs now, not in the first request
                ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
                memory = self.model.encode(ids)[0] if self.seq2seq else None
                self.model.logits(self.model.decode(ids, memory, cache=KVCache(2),
                                                    name="decoder_input_ids" if self.seq2seq else "input_ids")[0])
            self._thread = threading.Thread(target=self._loop, name="zenlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def capacity(self) -> int:
        """Sequences the engine holds at most, running and waiting."""
        return self.max_batch_size + self.max_queue

    @property
    def share(self) -> int:
        """Sequences one owner may hold at once: a full batch plus half the queue."""
        return self.max_batch_size + self.max_queue // 2

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def submit(self, request: EngineRequest, owner=None) -> EngineRequest:
        """Queue one sequence; see ``submit_all``."""
        self.submit_all([request], owner)
        return request

    def submit_all(self, requests: list[EngineRequest], owner=None) -> None:
        """Queue a request's sequences together or none of them: Overloaded (503) when they do not
        fit now, RateLimited (429) when ``owner`` would pass its share. Bad settings raise ValueError."""
        for request in requests:
            self._check(request)
        with self._wake:
            self.check_room(len(requests), owner)
            queue = self.waiting.setdefault(owner, collections.deque())
            for request in requests:
                request.owner, request._counted = owner, True
                queue.append(request)
            self._queued += len(requests)
            self._in_flight[owner] += len(requests)
            self._wake.notify()

    def check_room(self, sequences: int, owner=None) -> None:
        """Raise unless ``sequences`` more from ``owner`` fit now (a request is refused as a whole)."""
        held = len(self.running) + self._queued
        if sequences > self.capacity:
            raise Overloaded(f"this request needs {sequences} sequences at once and the server is at capacity "
                             f"with {self.capacity} ({self.max_batch_size} running + {self.max_queue} queued); "
                             f"send fewer prompts or a smaller n per request", headers={"retry-after": "1"})
        if held + sequences > self.capacity:
            raise Overloaded(f"the server is at capacity ({len(self.running)} running, {self._queued} queued, "
                             f"{self.capacity} at most; this request needs {sequences}); retry shortly",
                             headers={"retry-after": "1"})
        mine = self._in_flight.get(owner, 0)
        if owner is not None and mine + sequences > self.share:
            raise RateLimited(f"this key has {mine} sequences running or queued and this request needs {sequences}; "
                              f"one key may hold at most {self.share} at once so that others get a turn; retry "
                              f"when some have finished", type="requests", headers={"retry-after": "1"})

    def _check(self, request: EngineRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("prompt is empty (0 tokens)")
        if self.seq2seq:
            if len(request.prompt_ids) > self.window or request.params.max_tokens + 1 > self.window:
                raise ValueError(f"source of {len(request.prompt_ids)} tokens or max_tokens "
                                 f"{request.params.max_tokens} (+1 start token) exceeds the context window of "
                                 f"{self.window} tokens")
        elif len(request.prompt_ids) + request.params.max_tokens > self.window:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens + max_tokens {request.params.max_tokens} "
                             f"exceeds the context window of {self.window} tokens")

    def _next_waiting(self) -> EngineRequest:
        """The first waiting sequence of the owner whose turn it is; that owner goes to the back."""
        owner = next(iter(self.waiting))
        queue = self.waiting.pop(owner)
        request = queue.popleft()
        if queue:
            self.waiting[owner] = queue
        self._queued -= 1
        return request

    def _all_waiting(self) -> list[EngineRequest]:
        return [r for queue in self.waiting.values() for r in queue]

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self.running:
                        self._wake.wait(timeout=1.0)
                    if self._stop:
                        break
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except Exception:  # a bug must not leave clients hanging: end every request, keep serving
                    log.exception("engine step failed; ending the running requests")
                    with self._wake:
                        ended, self.running, self.waiting, self._queued = (
                            list(self.running) + self._all_waiting(), [], {}, 0)
                    for req in ended:
                        self._emit(req, TokenEvent("", None, finish_reason="error"))
                    self.cache = self.mask = self.positions = self.pending = self.memory_mask = None
        with self._wake:
            ended, self.running, self.waiting, self._queued = list(self.running) + self._all_waiting(), [], {}, 0
        for req in ended:
            self._emit(req, TokenEvent("", None, finish_reason="cancelled"))

    def _admit(self) -> None:
        """Prefill every waiting request that fits, together (left-padded), and merge them into the batch."""
        reqs = []
        with self._wake:
            cancelled = []
            while self.waiting and len(self.running) + len(reqs) < self.max_batch_size:
                req = self._next_waiting()
                (cancelled if req.cancelled else reqs).append(req)
        for req in cancelled:
            self._emit(req, TokenEvent("", None, finish_reason="cancelled"))
        if not reqs:
            return
        start = time.perf_counter()
        for req in reqs:
            req.started = start
        if self.seq2seq:
            logits, cache, mask, memory_mask = self._prefill_seq2seq(reqs)
            self._merge(reqs, cache, mask, memory_mask)
            share = (time.perf_counter() - start) / len(reqs)
            for req in reqs:
                req.compute_s += share
            self._take(reqs, logits)
            return
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.bool)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = KVCache(width + 1, trim_windows=True)  # sliding-window layers keep ~2 windows of keys
        if bool(mask.all()):
            hidden = self.model.decode(ids, cache=cache, name="input_ids")[0]
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = self.model.decode(ids, attention_mask=mask, position_ids=positions, cache=cache,
                                       name="input_ids")[0]
        logits = self.model.logits(hidden[:, -1]).float()
        self._merge(reqs, cache, mask)
        share = (time.perf_counter() - start) / len(reqs)
        for req in reqs:
            req.compute_s += share
        self._take(reqs, logits)

    def _prefill_seq2seq(self, reqs: list[EngineRequest]):
        """Encode the sources once (right-padded) and run the start token: the cross-attention
        keys/values land in the cache, where every later step reads them."""
        width = max(len(r.prompt_ids) for r in reqs)
        pad = self.model.config.pad_token_id
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        memory_mask = torch.zeros((len(reqs), width), dtype=torch.bool)
        for i, r in enumerate(reqs):
            ids[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids, dtype=torch.long)
            memory_mask[i, :len(r.prompt_ids)] = True
        ids, memory_mask = ids.to(self.device), memory_mask.to(self.device)
        padded = not bool(memory_mask.all())
        memory = self.model.encode(ids, memory_mask if padded else None)[0]
        start = torch.full((len(reqs), 1), self.model.config.start_token_id, dtype=torch.long, device=self.device)
        cache = KVCache(2)
        hidden = self.model.decode(start, memory, memory_mask if padded else None, cache=cache)[0]
        logits = self.model.logits(hidden[:, -1]).float()
        return logits, cache, torch.ones((len(reqs), 1), dtype=torch.bool, device=self.device), memory_mask

    def _step(self) -> None:
        start = time.perf_counter()
        rows = len(self.running)
        width = self.cache.length
        mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        if self.seq2seq:
            memory_mask = None if bool(self.memory_mask.all()) else self.memory_mask
            hidden = self.model.decode(self.pending[:, None], None, memory_mask,
                                       attention_mask=None if bool(mask.all()) else mask,
                                       position_ids=self.positions[:, None], cache=self.cache)[0]
        else:
            hidden = self.model.decode(self.pending[:, None], attention_mask=None if bool(mask.all()) else mask,
                                       position_ids=self.positions[:, None], cache=self.cache, name="input_ids")[0]
        self.mask = mask
        self.positions = self.positions + 1
        assert self.cache.length == width + 1
        logits = self.model.logits(hidden[:, -1]).float()
        self._take(list(self.running), logits, step_start=start)
        self.steps += 1

    # ------------------------------------------------------------------ tokens
    def _take(self, reqs: list[EngineRequest], logits: torch.Tensor, step_start: Optional[float] = None) -> None:
        """Pick each row's next token, tell its client, and drop rows that are done."""
        tokens, logprobs, tops = self._pick(reqs, logits)
        if step_start is not None:  # the batch shares the step's time
            share = (time.perf_counter() - step_start) / max(1, len(reqs))
            for req in reqs:
                req.compute_s += share
            if self.on_step is not None:
                self.on_step(len(reqs), time.perf_counter() - step_start)
        for req, tok, lp, top in zip(reqs, tokens, logprobs, tops):
            self._advance(req, tok, lp, top)
        # every row's latest token is what the next step feeds it (new rows got a placeholder in _merge)
        index = {id(r): i for i, r in enumerate(self.running)}
        rows = torch.tensor([index[id(r)] for r in reqs], dtype=torch.long, device=self.device)
        self.pending[rows] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None and not r.cancelled]
        for r in self.running:
            if r.finish_reason is None and r.cancelled:
                r.finish_reason = "cancelled"
                self._emit(r, TokenEvent("", None, finish_reason="cancelled"))
        if len(keep) < len(self.running):
            self._select(keep)
        if any(r.constraint is not None for r in self.running):  # next masks computed while the forward runs
            from ..constraints import prefetch_masks
            prefetch_masks([r.constraint for r in self.running])

    def _pick(self, reqs: list[EngineRequest], logits: torch.Tensor) -> tuple[list[int], list, list]:
        """Next tokens for all rows at once. Rows that sample share one call of ``zenlm.generation``'s
        rules per distinct (temperature, top_p), then draw by inverse CDF with their own seeded RNG,
        so a row's tokens never depend on who else is in the batch."""
        scores = logits
        if any(req.constraint is not None for req in reqs):  # each constrained row: its grammar's tokens only
            from ..constraints import apply_masks
            scores = apply_masks(scores, [req.constraint for req in reqs], [req.params.stop_token_ids for req in reqs])
        for i, req in enumerate(reqs):
            p = req.params
            if p.presence_penalty or p.frequency_penalty:
                scores = scores.clone() if scores is logits else scores
                scores[i] = apply_presence_frequency(scores[i:i + 1], req.token_ids, p.presence_penalty,
                                                     p.frequency_penalty)[0]
        tokens = scores.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            if req.config.sampling:
                groups.setdefault((req.config.temperature, req.config.top_p), []).append(i)
        for rows in groups.values():
            index = torch.tensor(rows, dtype=torch.long, device=scores.device)
            config = reqs[rows[0]].config
            warped = process_scores(scores[index], [[] for _ in rows], 0, config, [])
            cdf = warped.softmax(dim=-1).cumsum(dim=-1)
            draws = []
            for i in rows:
                req = reqs[i]
                if req.generator is None:
                    req.generator = random.Random(req.params.seed if req.params.seed is not None
                                                  else secrets.randbits(63))
                draws.append(req.generator.random())
            u = torch.tensor(draws, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
            tokens[index] = torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.size(1) - 1)
        token_list = tokens.tolist()
        lps: list = [None] * len(reqs)
        tops: list = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs]
        if want:
            logp = logits[want].log_softmax(dim=-1)
            for j, i in enumerate(want):
                lps[i] = float(logp[j, token_list[i]])
                k = reqs[i].params.top_logprobs
                if k:
                    values, ids = logp[j].topk(k)
                    tops[i] = list(zip(ids.tolist(), values.tolist()))
        return token_list, lps, tops

    def _advance(self, req: EngineRequest, tok: int, lp, top) -> None:
        if req.first_token is None:
            req.first_token = time.perf_counter()
        req.token_ids.append(tok)
        if req._decoder is None:
            req._decoder = self.tokenizer.stream_decoder()
        req._safe += req._decoder.push(tok)
        stop_strings = req.params.stop
        finish = None
        if tok in req.params.stop_token_ids:
            finish = "stop"
        elif stop_strings and _first_stop(req._safe, stop_strings) is not None:
            finish = "stop"
        elif req.constraint is not None and self._constrain(req, tok):
            finish = "stop"  # the grammar is complete: nothing more may follow
        elif len(req.token_ids) >= req.params.max_tokens or self._used(req) >= self.window:
            finish = "length"
        if finish is not None:  # flush bytes held back for a character that will never complete
            req._safe = self.tokenizer.decode(req.token_ids)
        visible = Generator._visible(req._safe, stop_strings, final=finish is not None)
        delta = visible[len(req.text):]
        req.text = visible
        req.finish_reason = finish
        self._emit(req, TokenEvent(delta, tok, lp, top, finish_reason=finish))

    @staticmethod
    def _constrain(req: EngineRequest, tok: int) -> bool:
        """Move the row's grammar past its new token; whether the grammar is now complete."""
        req.constraint.advance(tok)
        return req.constraint.done

    def _used(self, req: EngineRequest) -> int:
        """Decoder positions the row has taken."""
        return 1 + len(req.token_ids) if self.seq2seq else len(req.prompt_ids) + len(req.token_ids)

    def _emit(self, req: EngineRequest, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            if req.finish_reason is None:
                req.finish_reason = event.finish_reason
            if req._counted:  # it no longer counts against its owner's share
                with self._wake:
                    req._counted = False
                    self._in_flight[req.owner] -= 1
                    if not self._in_flight[req.owner]:
                        del self._in_flight[req.owner]
        try:
            req.on_event(event)
        except Exception:  # a listener that went away must not stop the batch
            log.debug("request %s listener failed", req.id, exc_info=True)

    # ------------------------------------------------------------------ the batch cache
    def _merge(self, reqs: list[EngineRequest], cache: KVCache, mask: torch.Tensor,
               memory_mask: Optional[torch.Tensor] = None) -> None:
        """Add prefilled rows to the batch. Rows are right-aligned in the cache: every row's newest
        token sits in the last column, older columns of shorter rows are masked padding."""
        positions = mask.sum(dim=1)
        placeholder = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.running = cache, list(reqs)
            self.mask, self.positions, self.pending = mask, positions, placeholder
            self.memory_mask = memory_mask
            return
        if self.seq2seq:  # sources of different lengths: pad the cross keys/values and their mask
            s_old, s_new = self.memory_mask.size(1), memory_mask.size(1)
            s = max(s_old, s_new)
            grow = lambda t, n: torch.cat([t, t.new_zeros(t.size(0), t.size(1), s - n, t.size(3))], dim=2)
            self.cache.cross = {i: (torch.cat([grow(k, s_old), grow(cache.cross[i][0], s_new)]),
                                    torch.cat([grow(v, s_old), grow(cache.cross[i][1], s_new)]))
                                for i, (k, v) in self.cache.cross.items()}
            self.memory_mask = torch.cat([torch.nn.functional.pad(self.memory_mask, (0, s - s_old)),
                                          torch.nn.functional.pad(memory_mask, (0, s - s_new))])
        old, n = self.cache.length, cache.length
        width = max(old, n)
        keys, values, starts, config = [], [], [], self.model.config
        for layer, (k_old, v_old, k_new, v_new) in enumerate(zip(self.cache.keys, self.cache.values,
                                                                  cache.keys, cache.values)):
            # a sliding-window layer may hold only its columns from ``start`` on (KVCache.update trimmed the
            # rest, which no later query can see); merged, it keeps the columns both caches still hold
            held = [0 if c.start(layer) == 0 else width - c.length + c.start(layer) for c in (self.cache, cache)]
            start = max(held)
            if config.is_sliding(layer):  # a fresh prompt's cache holds keys no later query can see: drop them
                start = max(start, width - config.sliding_window + 1)
            b, h, _, d = k_old.shape
            room = width - start + 64  # columns for the next steps before the buffer must grow (or trim)
            if config.is_sliding(layer):  # KVCache's own bound for a window: about two of them
                room = max(width - start + 1, min(room, 2 * config.sliding_window))
            k = k_old.new_zeros((b + len(reqs), h, room, d))
            v = v_old.new_zeros(k.shape)
            for rows, c, (k_src, v_src) in ((slice(0, b), self.cache, (k_old, v_old)),
                                            (slice(b, None), cache, (k_new, v_new))):
                first = width - c.length + c.start(layer)  # merged column of the buffer's first key
                skip = max(0, start - first)
                at = max(first, start) - start
                k[rows, :, at:width - start] = k_src[:, :, skip:c.length - c.start(layer)]
                v[rows, :, at:width - start] = v_src[:, :, skip:c.length - c.start(layer)]
            keys.append(k)
            values.append(v)
            starts.append(start)
        merged = torch.zeros((len(self.running) + len(reqs), width), dtype=torch.bool, device=self.device)
        merged[:len(self.running), width - old:] = self.mask
        merged[len(self.running):, width - n:] = mask
        self.cache.keys, self.cache.values, self.cache.starts, self.cache.length = keys, values, starts, width
        self.mask = merged
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, placeholder])
        self.running.extend(reqs)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows, then cut the columns no remaining row uses."""
        if not keep:
            self.running, self.cache = [], None
            self.mask = self.positions = self.pending = self.memory_mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.reorder(index)
        self.running = [self.running[i] for i in keep]
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask[index]
        used = int(self.mask.sum(dim=1).max())
        cut = self.mask.size(1) - used
        if cut > 0:  # a layer whose keys start at column s (a trimmed window) loses only the cut columns it holds
            drop = [max(0, cut - self.cache.start(layer)) for layer in range(len(self.cache.keys))]
            self.cache.keys = [k[:, :, n:] for k, n in zip(self.cache.keys, drop)]
            self.cache.values = [v[:, :, n:] for v, n in zip(self.cache.values, drop)]
            self.cache.starts = [max(0, self.cache.start(layer) - cut) for layer in range(len(self.cache.keys))]
            self.cache.length -= cut
            self.mask = self.mask[:, cut:]
