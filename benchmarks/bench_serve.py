"""Serving throughput from batching, time to first token, and the metering cost per request.

Starts `zenlm serve` (its own process) over a `tiny`-preset decoder-only model with random weights,
then streams chat completions from C concurrent clients (C = 1, 8, 32 by default), each asking for
--max-tokens tokens (fewer when the random model emits a stop token), and prints aggregate completion tokens/s, the speed-up over C = 1 (continuous
batching's gain; target >= 6x at 32), and client-side p50/p99 time to first token. Then times the
ledger's own work per request (authenticate + reserve + settle) on SQLite and, when
ZENLM_TEST_POSTGRES_URL (or --postgres) is set, on PostgreSQL.

    python benchmarks/bench_serve.py [--levels 1 8 32] [--requests 4] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zenlm import Tokenizer, TransformerConfig, TransformerLM  # noqa: E402
from zenlm.serve.billing import Billing, Usage  # noqa: E402


def build_model(folder: Path, preset: str) -> Path:
    text = [p.read_text(errors="ignore") for p in sorted((ROOT / "zenlm").rglob("*.py"))]
    tok = Tokenizer.train(text, vocab_size=2048, kind="bpe")
    config = TransformerConfig.from_preset(preset, vocab_size=tok.vocab_size, max_position_embeddings=512)
    torch.manual_seed(0)
    model = TransformerLM(config)
    model.save_pretrained(folder, tokenizer=tok)
    return folder


def start(folder: Path, database: str, port: int, batch: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", str(folder), "--port", str(port),
                             "--database", database, "--max-batch-size", str(batch), "--hardware-price", "1.00"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def run_level(url: str, key: str, clients: int, requests: int, max_tokens: int) -> dict:
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    import json

    ttft, tokens = [], 0

    async def one_client(client, i):
        nonlocal tokens
        for j in range(requests):
            start = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": f"client {i} says hello {j}"}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}, headers={"Authorization": f"Bearer {key}"}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None \
                            and chunk["choices"][0]["delta"].get("role") is None:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            ttft.append(first if first is not None else time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, i) for i in range(clients)))
        wall = time.perf_counter() - start
    ttft.sort()
    return {"clients": clients, "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "p50": statistics.median(ttft), "p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def metering_cost(url: str, n: int = 200) -> float:
    """Milliseconds of database work per request: authenticate, reserve, settle."""
    billing = Billing.open(url)
    billing.create_plan("bench-meter", {"*": (1, 1)}, monthly_budget_micros=10 ** 12, requests_per_minute=10 ** 7,
                        tokens_per_minute=10 ** 12, replace=True)
    key = billing.create_key("bench-meter", "bench-meter")[0]
    start = time.perf_counter()
    for i in range(n):
        ctx = billing.authenticate(key)
        res = billing.reserve(ctx, f"bench-{time.time_ns()}-{i}", "m", 20, 64)
        billing.settle(res, Usage(20, 64, 1, 10), res.id, "/v1/chat/completions", {"usage": {}})
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--postgres", default=os.environ.get("ZENLM_TEST_POSTGRES_URL"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"preset {args.preset}, {args.max_tokens} new tokens per request, {args.requests} requests per client")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "m", args.preset)
        db = str(Path(tmp) / "bench.sqlite3")
        billing = Billing.open(db)
        billing.create_plan("bench", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 12,
                            requests_per_minute=10 ** 7, tokens_per_minute=10 ** 12)
        key = billing.create_key("bench", "bench")[0]
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start(folder, db, port, max(args.levels))
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_level(url, key, 2, 1, 4))  # warm-up
            results = [asyncio.run(run_level(url, key, c, args.requests, args.max_tokens)) for c in args.levels]
        finally:
            proc.terminate()
            proc.wait()
        base = results[0]["tps"]
        print(f"{'clients':>7} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x vs 1':>7} {'TTFT p50':>9} {'TTFT p99':>9}")
        for r in results:
            print(f"{r['clients']:>7} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>9.1f} {r['tps'] / base:>7.2f} "
                  f"{1000 * r['p50']:>7.0f}ms {1000 * r['p99']:>7.0f}ms")
        print(f"metering per request (authenticate + reserve + settle): SQLite {metering_cost(db):.2f} ms", end="")
        if args.postgres:
            print(f", PostgreSQL {metering_cost(args.postgres):.2f} ms")
        else:
            print(" (PostgreSQL: set ZENLM_TEST_POSTGRES_URL)")


if __name__ == "__main__":
    main()
