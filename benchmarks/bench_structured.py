"""Structured output cost (issue 18): tokens/s with and without a JSON-schema constraint, and mask time.

(a) Library: ``Generator.generate`` with sampling, free vs ``json_schema=...``, at batch 1 and 8, on the
    ``tiny`` preset and a gpt2-small-shaped model (random weights), both over one byte-level BPE trained
    with ``zenlm.Tokenizer.train`` on this tree's zenlm/*.py. Free and constrained runs alternate, best of
    --reps each; every row makes exactly --new-tokens tokens (min_new_tokens for the free rows, a schema
    whose one string field needs 2000 characters for the constrained ones), so the ratio is per token.
(b) Mask time per step along random valid walks, for 1 and 32 rows per step (each row its own matcher):
    ``zenlm.constraints.apply_masks`` (every row's bitmask in one llguidance call, one torch op on the
    logits) and, for comparison, the per-row way (``Constraint.mask`` per row, then the rows laid on).
(c) Serving: bench_serve's server (``zenlm serve`` over a random ``tiny`` model) and its event-stream
    client, 32 concurrent clients streaming chat completions, alternately with and without
    ``response_format`` {"type": "json_schema", ...}; aggregate completion tokens/s and the ratio.

Goal of the issue: constrained tokens/s within 10% of free. The load average is printed before and after,
because other work on a shared machine moves these figures; so each ratio is given twice: by wall time
and by CPU time (the library process's, the server process's), which other work moves much less.

    python benchmarks/bench_structured.py                       # default, ~3 minutes on 2 cores
    python benchmarks/bench_structured.py --new-tokens 64 --reps 3 --requests 4 --max-tokens 64   # longer
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serve  # noqa: E402
from bench_serve import (SSEClient, bench_keys_and_port, build_model, engine_steps, random_lm, start,  # noqa: E402
                         train_tokenizer)

from zenlm import Tokenizer, TransformerLM  # noqa: E402
from zenlm.generation import Generator  # noqa: E402

# one string field that needs 2000 characters: no constrained row can end before the token budget
LONG_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
               "required": ["text"], "additionalProperties": False}
# a schema with some structure, for the mask walks
WALK_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "other"]}, "minItems": 1, "maxItems": 5},
    "pos": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"], "additionalProperties": False},
    "note": {"type": "string", "minLength": 2000}},
    "required": ["name", "age", "tags", "pos", "note"], "additionalProperties": False}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_model(preset: str, tok: Tokenizer) -> TransformerLM:
    return random_lm(preset, tok, 1024).eval()


def library(gen: Generator, batch: int, new_tokens: int, reps: int) -> tuple[float, float, float, float]:
    """Best-of-``reps`` tokens/s by wall time (free, json_schema) and by CPU time (free, json_schema), runs
    alternating."""
    prompts = [f"Request {i}: answer in JSON." for i in range(batch)]
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0)
    gen.generate(prompts, max_new_tokens=4, do_sample=True, seed=0)  # warm-up (allocations, the vocabulary once)
    gen.generate(prompts, max_new_tokens=4, do_sample=True, seed=0, json_schema=LONG_SCHEMA)
    best = {False: 0.0, True: 0.0}
    cpu = {False: 0.0, True: 0.0}
    for r in range(reps):
        for constrained in (False, True) if r % 2 == 0 else (True, False):
            extra = {"json_schema": LONG_SCHEMA} if constrained else {}
            t, c = time.perf_counter(), time.process_time()
            out = gen.generate(prompts, seed=r, **common, **extra)
            seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
            tokens = sum(len(o.token_ids) for o in out)
            best[constrained] = max(best[constrained], tokens / seconds)
            cpu[constrained] = max(cpu[constrained], tokens / cpu_seconds)
    return best[False], best[True], cpu[False], cpu[True]


def mask_times(tok: Tokenizer, vocab_size: int, rows: int, steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds per step to mask ``rows`` rows of logits, along random valid walks of ``steps`` tokens:
    ``batched`` (apply_masks: one llguidance call for the rows, one torch op) and ``per row`` (each row's
    Constraint.mask, then the rows laid on the logits), alternating within each step."""
    from zenlm.constraints import apply_masks, compile_constraint

    rng = random.Random(seed)
    spec = compile_constraint(tok, vocab_size, json_schema=WALK_SCHEMA)
    stop = [tok.eos_id] if tok.eos_id is not None else []
    cons = [spec.new() for _ in range(rows)]
    logits = torch.randn(rows, vocab_size)
    times: dict[str, list[float]] = {"batched": [], "per row": []}
    for step in range(steps):
        for way in ("batched", "per row") if step % 2 == 0 else ("per row", "batched"):
            t = time.perf_counter()
            if way == "batched":
                scores = apply_masks(logits, cons, stop)
            else:
                allowed = torch.stack([c.mask(stop) for c in cons])
                scores = logits.masked_fill(~allowed, float("-inf"))
            times[way].append(1000 * (time.perf_counter() - t))
        for c, row in zip(cons, scores):
            c.advance(rng.choice(torch.isfinite(row).nonzero().flatten().tolist()))
        cons = [c if not c.done else spec.new() for c in cons]
    return times


class FormattedClient(SSEClient):
    """bench_serve's event-stream client with ``extra`` merged into every request body (the
    response_format); installed as bench_serve.SSEClient so that its run_level drives the clients."""
    extra: dict = {}

    async def post_stream(self, path: str, payload: dict, key: str) -> tuple[float, int]:
        return await super().post_stream(path, {**payload, **self.extra}, key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads), from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_level(port: int, key: str, clients: int, requests: int, max_tokens: int, extra: dict) -> tuple[int, float]:
    """(completion tokens, wall seconds) for ``clients`` concurrent streaming chat clients."""
    FormattedClient.extra = extra
    bench_serve.SSEClient = FormattedClient
    r = asyncio.run(bench_serve.run_level(port, key, clients, requests, max_tokens))
    return r["tokens"], r["wall"]


def serving(args) -> None:
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": LONG_SCHEMA}}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "m", args.serve_preset)
        db = str(Path(tmp) / "bench.sqlite3")
        (key,), port = bench_keys_and_port(db)
        proc = start(folder, db, port, args.clients)
        try:
            for extra in ({}, fmt):  # warm-up at the full shape, both ways
                serve_level(port, key, args.clients, 1, args.max_tokens, extra)
            runs = {False: [], True: []}
            for r in range(args.serve_reps):
                for constrained in (False, True) if r % 2 == 0 else (True, False):
                    before, cpu = engine_steps(port), cpu_seconds(proc.pid)
                    tokens, wall = serve_level(port, key, args.clients, args.requests, args.max_tokens,
                                               fmt if constrained else {})
                    cpu = cpu_seconds(proc.pid) - cpu
                    steps, rows, seconds = (a - b for a, b in zip(engine_steps(port), before))
                    runs[constrained].append((tokens / wall, tokens, rows / max(steps, 1),
                                              1000 * seconds / max(steps, 1), tokens / max(cpu, 1e-9)))
        finally:
            proc.terminate()
            proc.wait()
    print(f"(c) serving: preset {args.serve_preset}, {args.clients} clients x {args.requests} streamed chat requests "
          f"x max {args.max_tokens} tokens, temperature 0, best of {args.serve_reps} alternating runs")
    best = {c: max(v) for c, v in runs.items()}
    for c, label in ((False, "free"), (True, "response_format json_schema")):
        tps, tokens, rows, step, per_cpu = best[c]
        print(f"    {label:<28} {tps:8.1f} completion tokens/s  ({tokens} tokens, {rows:.1f} rows/step, "
              f"{step:.2f} ms/step, {max(x[4] for x in runs[c]):.0f} tokens per server CPU-second)  all runs: "
              + ", ".join(f"{x[0]:.0f}" for x in runs[c]))
    ratio = best[True][0] / best[False][0]
    by_cpu = max(x[4] for x in runs[True]) / max(x[4] for x in runs[False])
    by_step = min(x[3] for x in runs[False]) / min(x[3] for x in runs[True])
    print(f"    constrained / free = {ratio:.3f} by wall time (overhead {100 * (1 - ratio):.1f}%), {by_cpu:.3f} by the "
          f"server's CPU time ({100 * (1 - by_cpu):.1f}%), {by_step:.3f} by engine step time ({100 * (1 - by_step):.1f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "gpt2-small"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per row in the library runs")
    ap.add_argument("--reps", type=int, default=2, help="alternating free/constrained library runs, best taken")
    ap.add_argument("--vocab", type=int, default=16000, help="BPE vocabulary trained for the library runs")
    ap.add_argument("--mask-steps", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the serving run")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per serving request")
    ap.add_argument("--serve-preset", default="tiny")
    ap.add_argument("--serve-reps", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["library", "mask", "serve"])
    args = ap.parse_args()

    from zenlm.cpu import cpu_info
    print(cpu_info().describe())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {load()} (start)")
    import llguidance
    print(f"llguidance {getattr(llguidance, '__version__', '?')}")

    tok = None
    if "library" not in args.skip or "mask" not in args.skip:
        t = time.perf_counter()
        tok = train_tokenizer(args.vocab)
        print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on zenlm/*.py in "
              f"{time.perf_counter() - t:.1f} s")
    if "library" not in args.skip:
        print(f"(a) library: Generator.generate, sampling, {args.new_tokens} new tokens per row, best of {args.reps} "
              f"alternating runs")
        print(f"    {'model':<12} {'params':>7} {'batch':>5} {'free tok/s':>10} {'schema tok/s':>12} {'ratio':>6} "
              f"{'overhead':>8} | by CPU time: {'free':>7} {'schema':>7} {'overhead':>8}")
        for preset in args.presets:
            model = make_model(preset, tok)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            gen = Generator(model, tok)
            for batch in args.batches:
                free, con, free_cpu, con_cpu = library(gen, batch, args.new_tokens, args.reps)
                print(f"    {preset:<12} {params:>6.1f}M {batch:>5} {free:>10.1f} {con:>12.1f} {con / free:>6.3f} "
                      f"{100 * (1 - con / free):>7.1f}% |              {free_cpu:>7.1f} {con_cpu:>7.1f} "
                      f"{100 * (1 - con_cpu / free_cpu):>7.1f}%", flush=True)
            del gen, model
    if "mask" not in args.skip:
        print(f"(b) masking the logits per step, {args.mask_steps} steps of a random valid walk, vocabulary "
              f"{tok.vocab_size}: apply_masks (batched) vs Constraint.mask row by row")
        for rows in (1, 8, 32):
            for way, ms in mask_times(tok, tok.vocab_size, rows, args.mask_steps).items():
                ms = sorted(ms)
                print(f"    {rows:>2} rows, {way:<7}: median {statistics.median(ms):.3f} ms, p90 "
                      f"{ms[int(0.9 * len(ms))]:.3f} ms, max {ms[-1]:.3f} ms per step "
                      f"({statistics.median(ms) / rows:.3f} ms per row)")
    if "serve" not in args.skip:
        serving(args)
    print(load() + " (end)")


if __name__ == "__main__":
    main()
