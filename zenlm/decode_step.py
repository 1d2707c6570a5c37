"""A captured decode step: one token per row through every layer as one compiled call.

An eager decode step of a 30-layer model is a few hundred small torch calls, each with its Python
and dispatch cost; at batch 1 those costs are a large share of a step whose real work is one read of
the weights. Here the step (embedding → blocks → final norm → head) is compiled by ``torch.compile``
over a cache of fixed shape, so the shapes never change between steps and the compiled graph runs
every step:

* ``StaticKVCache`` keeps keys/values in (B, H_kv, capacity, D) buffers; a step writes its one new
  column with ``index_copy_`` at a column given as a tensor, and attends to the buffer's first columns,
  as many as the next multiple of ``SPAN`` (64) past the newest one, under a mask (padding and columns
  not written yet masked out). That count is a symbol of the compiled graph (a dynamic size), so one
  graph serves every length, and a step reads the keys written so far rather than the whole capacity
  (SmolLM-135M shape, int4: 12.0 ms a step at capacity 1024 before, 7.1 after). Capacities come in
  buckets (powers of two from 256), batch sizes in buckets (1, 2, 4, 8, 16, 32), so a handful of
  graphs serve every request.
* The blocks are the model's own modules (``zenlm.model.Block``): no second copy of the attention.
* Compiled code is cached on disk (``TORCHINDUCTOR_CACHE_DIR``, the FX graph cache) under
  ``~/.cache/zenlm/inductor``, so a second process pays only the tracing, not the C++ compile.
* Per-step costs outside the kernels are cut where a step is a few milliseconds: the graph calls its
  kernels from C++ (inductor's ``cpp_wrapper``), and once a shape's graph is known, later steps of that
  shape call its code without dynamo's guard check (~5,000 guards over the model and the cache: ~1 ms a
  step); ``decode_step(model)`` rebuilds the step when the model's tensors change, which is what those
  guards would have caught. Weight-only int8 models also freeze their weights into the graph, so that
  inductor can use its own C++ GEMM template for their matmuls (``compile_options``).
* If compiling fails (no C++ compiler, an op inductor cannot take), the step falls back to the eager
  path with one warning; ``DecodeStep.compiled`` says which one runs.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .model import KVCache

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_CAPACITY = 256
SPAN = 64  # a step attends to the cache's columns in multiples of this (llama.cpp pads its used cells to 32 or 256)


def bucket(n: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``n`` rows (ValueError past the largest)."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"batch of {n} rows exceeds the largest decode-step bucket {buckets[-1]}")


def capacity_bucket(n: int, limit: int) -> int:
    """The smallest power of two ≥ max(n, 256) positions, at most ``limit`` (the model's context)."""
    if n > limit:
        raise ValueError(f"{n} positions exceed the model's context of {limit}")
    c = MIN_CAPACITY
    while c < n:
        c *= 2
    return min(c, limit)


def compile_cache_dir() -> Path:
    """Where compiled steps are kept between processes: ``$XDG_CACHE_HOME/zenlm/inductor``
    (``~/.cache/zenlm/inductor``), unless ``TORCHINDUCTOR_CACHE_DIR`` already says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zenlm" / "inductor"


def _use_disk_cache() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    # one graph per (model, batch bucket, capacity bucket): more than dynamo's default of 8 per function
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)


def captures(config) -> Optional[str]:
    """Why a model with this config cannot take the captured step (None when it can): it handles
    decoder-only models with rotary (not length-dependent), learned or no positions, without token
    types or sliding windows (their masks depend on the step)."""
    if config.family != "decoder-only":
        return f"a {config.family} model (the captured step is for decoder-only models)"
    if config.position not in ("rotary", "learned", "none"):
        return f"position scheme {config.position!r}"
    kind = (config.rope_scaling or {}).get("rope_type")
    if config.position == "rotary" and kind in ("dynamic", "longrope"):
        return f"rotary scaling {kind!r} (its frequencies change with the sequence length)"
    if config.type_vocab_size:
        return "token type embeddings"
    if config.sliding_window is not None and any(config.is_sliding(i) for i in range(config.num_decoder_layers)):
        return "sliding-window layers"
    return None


def compile_options(model) -> dict:
    """Inductor options for this model's step. Always the C++ wrapper: a step is a few hundred kernel
    calls, and made from Python they cost ~2 ms of a 7-25 ms step (SmolLM-135M shape, 2 threads: f32 +8%,
    int4 +22% tokens/s). A model with weight-only int8 layers (``zenlm.quantize``) also freezes its weights
    into the graph with ``max_autotune``, so that inductor may take its C++ GEMM template for those matmuls,
    which multiplies int8 weights without first widening each to float: int8 decode 1.55x (the cold compile
    takes ~2 minutes on 2 cores, then comes from the disk cache). Not for int4 (the template did not beat
    torch's int4 kernel: 6.93 vs 6.91 ms a step) nor float models (+2%, for a second packed copy of every
    weight, and weights that go stale when they train)."""
    from .quantize import QuantizedLinear

    options = {"cpp_wrapper": True}
    if any(isinstance(m, QuantizedLinear) and m.spec.scheme == "int8" for m in model.modules()):
        options.update(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    return options


def tensor_versions(model) -> tuple:
    """Which tensors the model holds and how often each was written in place: a compiled step (frozen
    weights, unguarded calls) is valid only while this stays the same."""
    marks = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        try:
            version = t._version
        except RuntimeError:  # an inference tensor keeps no version counter: it cannot change in place
            version = -1
        marks.append((t.data_ptr(), tuple(t.shape), t.dtype, version))
    return tuple(marks)


class StaticKVCache(KVCache):
    """A ``KVCache`` whose buffers never change shape once filled: (B, H_kv, capacity, D) per layer.

    The prefill (several tokens, eager) writes through ``KVCache.update`` into buffers allocated at
    ``capacity``; a captured step (``stepping``) writes its one new column with ``index_copy_`` at
    ``column`` (a one-element long tensor, so the compiled graph does not change with it) and attends
    to the first ``span.size(0)`` columns, those not written yet hidden by the step's mask."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.column = torch.zeros(1, dtype=torch.long)
        self.stepping = False
        # the columns a step attends to: the first span.size(0) (a multiple of SPAN past the newest column), a
        # size the compiled graph takes as a symbol, so that one graph serves every length without reading
        # the buffer's unwritten columns
        self.span = torch.empty(SPAN)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.stepping:
            return super().update(layer, k, v, window)
        self.keys[layer].index_copy_(2, self.column, k)
        self.values[layer].index_copy_(2, self.column, v)
        n = self.span.size(0)
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]


def step_function(model, cache: StaticKVCache, tokens: torch.Tensor, positions: Optional[torch.Tensor],
                  pad: Optional[torch.Tensor]) -> torch.Tensor:
    """One decode step: tokens (B,) at positions (B,) (None: every row at ``cache.column``), written at
    ``cache.column``; ``pad`` (B, capacity) bool is False on padding columns (None: no padding). Returns
    logits (B, vocab). The same code runs eagerly and compiled; the blocks are the model's own."""
    config, stack = model.config, model.decoder
    positions = (cache.column.expand(tokens.size(0)) if positions is None else positions)[:, None]
    x = model._token_embeddings(tokens[:, None])
    rotary = None
    if config.position == "learned":
        x = x + stack.positions(positions + config.position_offset)
    elif config.position == "rotary":
        rotary = stack.rotary(positions, x.dtype)
    if config.embedding_norm:
        x = stack.embed_norm(x)
    n = cache.span.size(0)
    valid = torch.arange(n, device=tokens.device)[None, :] <= cache.column
    if pad is not None:
        valid = valid & pad[:, :n]
    mask = valid[:, None, None, :]
    for i, block in enumerate(stack.layers):
        x, _, _ = block(x, mask, False, rotary, None, None, cache, i, False)
    if config.final_norm:
        x = stack.final_norm(x)
    return model.logits(x[:, -1])


@dataclass
class CompileReport:
    """What one (batch, capacity) graph cost to build: seconds of the first call (tracing and, without
    a disk-cache hit, the C++ compile), whether the compiled code ran, the best seconds of a compiled and
    of an eager step timed side by side right after, and whether the compiled one is used (it won)."""

    batch: int
    capacity: int
    seconds: float
    compiled: bool
    compiled_step_s: float = 0.0
    eager_step_s: float = 0.0
    used: bool = True


class DecodeStep:
    """The decode step of one model, compiled once per (batch, capacity) shape.

    ``step(cache, tokens, positions)`` writes the tokens' keys/values at ``cache.length``, advances the
    cache by one and returns the logits. Compiled (``torch.compile``, full graph, static shapes) unless
    ``compile=False``; a compile that fails logs one warning and this step runs eagerly from then on
    (``compiled`` turns False). Right after a shape compiles, its compiled and eager steps are timed side by
    side and the faster one serves that shape (``choose_faster``), so the captured step is never the slower
    one. ``reports`` holds what each shape's first call cost. Use ``decode_step(model)`` for the one instance
    a model shares between callers.
    """

    def __init__(self, model, compile: bool = True, choose_faster: bool = True):
        reason = captures(model.config)
        if reason is not None:
            raise ValueError(f"the captured decode step does not take {reason}")
        self.model = model
        self.compiled = compile
        self.choose_faster = choose_faster  # False: the compiled step whatever the timing (tests of its numerics)
        self.reports: list[CompileReport] = []
        self._seen: dict[tuple, bool] = {}  # shape -> whether its compiled step is used
        self._direct: dict[tuple, types.FunctionType] = {}  # shape -> its compiled code, called unguarded
        self._spans: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._fn = step_function
        self.versions = tensor_versions(model)
        if compile:
            _use_disk_cache()
            self._fn = torch.compile(step_function, fullgraph=True, dynamic=False)

    def __call__(self, cache: StaticKVCache, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                 pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not cache.keys or cache.length >= cache.keys[0].size(2):
            raise ValueError(f"the static cache holds {cache.keys[0].size(2) if cache.keys else 0} positions and "
                             f"{cache.length} are used: prefill it first, with room for the step")
        key = (tokens.size(0), cache.keys[0].size(2), pad is not None, positions is not None, len(cache.keys),
               cache.keys[0].dtype)
        cache.column.fill_(cache.length)
        cache.span = self._span(min(cache.keys[0].size(2), (cache.length // SPAN + 1) * SPAN))
        cache.stepping = True
        try:
            if not self.compiled or key in self._seen:
                fn = self._direct.get(key) or (self._fn if self._seen.get(key, True) else step_function)
                logits = fn(self.model, cache, tokens, positions, pad)
            else:
                logits = self._first(key, cache, tokens, positions, pad)
        finally:
            cache.stepping = False
        cache.advance(1)
        return logits

    def _span(self, n: int) -> torch.Tensor:
        """A tensor of n elements whose size the compiled graph reads as a symbol (one per n, kept)."""
        span = self._spans.get(n)
        if span is None:
            span = self._spans[n] = torch.empty(n)
            torch._dynamo.mark_dynamic(span, 0)
        return span

    def _first(self, key, cache, tokens, positions, pad) -> torch.Tensor:
        """The first call of a shape compiles it (one thread at a time); a failure falls back to eager."""
        with self._lock:
            if key in self._seen:  # another thread built it meanwhile
                return (self._fn if self._seen[key] else step_function)(self.model, cache, tokens, positions, pad)
            start = time.perf_counter()
            try:
                # inductor reads some options (freezing) outside torch.compile(options=...): set them while it compiles
                import torch._inductor.config as inductor

                with inductor.patch(compile_options(self.model) if self.compiled else {}):
                    logits = self._fn(self.model, cache, tokens, positions, pad)
            except Exception as e:  # noqa: BLE001 - any compile failure: the eager step computes the same
                if self.compiled:
                    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    logger.warning("compiling the decode step failed (%s: %s); decoding eagerly",
                                   type(e).__name__, message[:200])
                self.compiled, self._fn = False, step_function
                return step_function(self.model, cache, tokens, positions, pad)
            report = CompileReport(key[0], key[1], time.perf_counter() - start, self.compiled)
            # never slower than eager: time both on this very step (writing the same column again is harmless)
            # and keep the faster for this shape
            args = (self.model, cache, tokens, positions, pad)
            report.compiled_step_s, report.eager_step_s = _best_seconds((self._fn, step_function), args)
            report.used = report.compiled_step_s <= report.eager_step_s or not self.choose_faster
            self._seen[key] = report.used
            self.reports.append(report)
            if report.used:
                direct = _unguarded(args)
                if direct is not None:
                    self._direct[key] = direct
            if not report.used:
                logger.info("decode step %s: eager %.2f ms beat compiled %.2f ms; decoding eagerly at this shape",
                            key[:2], 1e3 * report.eager_step_s, 1e3 * report.compiled_step_s)
            return (self._fn if report.used else step_function)(*args)


def _unguarded(args: tuple) -> Optional[types.FunctionType]:
    """The code dynamo compiled for these very arguments, as a plain function: calling it skips the guard
    check of every call (~5,000 guards, ~1 ms). Safe while the shape key, the model's tensors
    (``tensor_versions``) and the cache's layout stay the same, which ``DecodeStep`` and ``decode_step`` see to.
    None when this torch does not expose its compiled entries (the guarded call is then used)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        frame = dict(zip(step_function.__code__.co_varnames, args))
        for entry in _debug_get_cache_entry_list(step_function.__code__):
            if entry.guard_manager.check(frame):
                return types.FunctionType(entry.code, step_function.__globals__)
    except Exception:  # noqa: BLE001 - a private torch API: without it, the guarded call is right, only slower
        logger.debug("no unguarded entry for the decode step", exc_info=True)
    return None


def _best_seconds(fns: tuple, args: tuple, reps: int = 5) -> list[float]:
    """Best seconds of each function on the same arguments, called in turn ``reps`` times (alternating,
    so that load from other processes hits each alike)."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(*args)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STEPS_LOCK = threading.Lock()


def decode_step(model) -> DecodeStep:
    """The compiled ``DecodeStep`` this model shares between generators (built on first use, and built again
    when the model's tensors changed since: trained, merged or loaded into, its compiled graphs are stale)."""
    with _STEPS_LOCK:
        step = _STEPS.get(model)
        if step is None or step.versions != tensor_versions(model):
            step = _STEPS[model] = DecodeStep(model)
        return step
