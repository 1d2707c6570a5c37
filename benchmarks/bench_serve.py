"""Serving throughput from batching, time to first token, and the metering cost per request.

Starts `zenlm serve` (its own process) over a `tiny`-preset decoder-only model with random weights,
then streams chat completions from C concurrent clients (C = 1, 8, 32 by default), each asking for
--max-tokens tokens (fewer when the random model emits a stop token), and prints aggregate
completion tokens/s, the speed-up over C = 1 (continuous batching's gain; target >= 6x at 32),
client-side p50/p99 time to first token, and from the server's /metrics the mean rows per decoding
step and the mean step time. The clients count tokens from each stream's final usage chunk; the
run fails unless the ledger holds exactly those tokens, one completed row per request. The load
generator is a minimal HTTP/1.1 event-stream reader on asyncio (it shares the cores with the
server, so it must cost little per token). Then the same levels through the BatchEngine in this
process, no HTTP (the ceiling), and the ledger's own work per request (authenticate + reserve +
settle) on SQLite and, when ZENLM_TEST_POSTGRES_URL (or --postgres) is set, on PostgreSQL.

Flood latency (issue 22): key A floods the server from --flood-clients connections, each sending
/v1/completions requests of --flood-prompts prompts x --max-tokens tokens back to back (a refused
one, 429 or 503, is sent again 50 ms later), while key B sends --flood-probes 4-token chat requests
one after another; prints p50/p99 of B's latency with and without the flood, and how many of B's
requests were refused. Fair admission should keep B's latency near one decoding wave of A's, not
behind A's whole backlog.

    python benchmarks/bench_serve.py [--levels 1 8 32] [--requests 4] [--max-tokens 64] [--no-engine-alone]
    python benchmarks/bench_serve.py --flood-only [--flood-clients 8] [--flood-prompts 32] [--flood-probes 30]

Before/after a change: the tokenizer is trained on the tree's own zenlm/*.py, so run both trees
with one --corpus (e.g. --corpus ../zenlm-before/zenlm, a worktree of the old commit); otherwise the random model says other things
and time to first visible token differs for that reason alone.
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


def build_model(folder: Path, preset: str, corpus: Path = ROOT / "zenlm") -> Path:
    """A random-weight model whose tokenizer is trained on the .py files under ``corpus``. The
    model's output (how many tokens, when the first visible text comes) follows from that
    vocabulary, so comparing two trees of the code needs one corpus for both (--corpus)."""
    tok = train_tokenizer(2048, corpus)
    random_lm(preset, tok, 512).save_pretrained(folder, tokenizer=tok)
    return folder


def train_tokenizer(vocab: int, corpus: Path = ROOT / "zenlm") -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on the .py files under ``corpus``."""
    text = [p.read_text(errors="ignore") for p in sorted(Path(corpus).rglob("*.py"))]
    return Tokenizer.train(text, vocab_size=vocab, kind="bpe")


def random_lm(preset: str, tok: Tokenizer, max_positions: int) -> TransformerLM:
    """The preset's shape with this tokenizer's vocabulary and special ids (gpt2-small's are 50256), random
    weights from seed 0."""
    config = TransformerConfig.from_preset(preset, vocab_size=tok.vocab_size, max_position_embeddings=max_positions,
                                           pad_token_id=tok.pad_id or 0, bos_token_id=tok.bos_id or 0,
                                           eos_token_id=tok.eos_id or 0)
    torch.manual_seed(0)
    return TransformerLM(config)


def bench_keys_and_port(database: str, customers: tuple = ("bench",)) -> tuple[list[str], int]:
    """A generous plan "bench" in ``database``, one key per customer, and a free loopback port."""
    import socket

    billing = Billing.open(database)
    billing.create_plan("bench", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 12,
                        requests_per_minute=10 ** 7, tokens_per_minute=10 ** 12)
    keys = [billing.create_key(customer, "bench")[0] for customer in customers]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return keys, s.getsockname()[1]


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


class _Connection:
    """One keep-alive HTTP/1.1 connection (opened by the subclass); ``close`` ends it."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def stream(self, host: str, port: int, path: str, payload: dict, key: str):
        """POST ``payload`` as a streaming request on this connection (opened on first use, kept alive) and
        yield the events of its chunked event stream as they arrive; closes when the server says so."""
        import json

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(host, port)
        body = json.dumps(payload).encode()
        headers = await post_head(self, f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                                  f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                                  f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n", body)
        if headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"expected a chunked event stream, got headers {headers}")
        async for events in chunked_events(self.reader):
            for event in events:
                yield event
        if headers.get("connection") == "close":
            await self.close()


async def post_head(conn: _Connection, head: str, body: bytes) -> dict[str, str]:
    """Writes one request (``head`` ends with the blank line) on ``conn``'s open connection, reads the status
    line and headers (lower-cased names), and raises unless the status is 200."""
    conn.writer.write(head.encode() + body)
    reader = conn.reader
    status = await reader.readline()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{status.decode().strip()}: {await reader.read(2000)!r}")
    return headers


async def chunked_events(reader: asyncio.StreamReader):
    """Yields, chunk by chunk, the list of complete blank-line-separated events of a chunked event stream."""
    buffer = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()  # the blank line after the last chunk (no trailers)
            return
        buffer += (await reader.readexactly(size + 2))[:-2]
        *events, buffer = buffer.split(b"\n\n")
        yield events


class SSEClient(_Connection):
    """A minimal HTTP/1.1 client for one keep-alive connection that streams server-sent events.

    The load generator shares the 2 cores with the server, so it must cost far less per token than
    the server does: it reads the chunked body with asyncio streams, splits events on blank lines,
    and JSON-parses only the final usage chunk (tokens are counted from it, as a billing client
    would). httpx spent more CPU parsing the SSE lines than the server spent producing them."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, payload: dict, key: str) -> tuple[float, int]:
        """POST ``payload``; returns (seconds to the first token chunk, completion tokens from usage)."""
        import json

        start = time.perf_counter()
        first, usage, done = None, None, False
        async for event in self.stream(self.host, self.port, path, payload, key):
            if first is None and b'"content":"' in event and b'"role":"assistant"' not in event:
                first = time.perf_counter() - start
            elif b'"usage":{' in event:
                usage = json.loads(event[6:])["usage"]
            elif event == b"data: [DONE]":
                done = True
        if usage is None or not done:
            raise RuntimeError(f"the stream ended without {'a usage chunk' if usage is None else 'data: [DONE]'}")
        return (first if first is not None else time.perf_counter() - start), usage["completion_tokens"]


async def run_level(port: int, key: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttft, tokens = [], 0

    async def one_client(i):
        nonlocal tokens
        client = SSEClient("127.0.0.1", port)
        try:
            for j in range(requests):
                first, n = await client.post_stream("/v1/chat/completions", {
                    "model": "m", "messages": [{"role": "user", "content": f"client {i} says hello {j}"}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}, key)
                ttft.append(first)
                tokens += n
        finally:
            await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    ttft.sort()
    return {"clients": clients, "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "p50": statistics.median(ttft), "p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


class JSONClient(_Connection):
    """One keep-alive HTTP/1.1 connection for small JSON requests: (status, seconds, body)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict, key: str) -> tuple[int, float, bytes]:
        import json

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        start = time.perf_counter()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {key}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            await self.close()
        return status, time.perf_counter() - start, data


async def flood_latency(port: int, key_a: str, key_b: str, clients: int, prompts: int, max_tokens: int,
                        probes: int) -> dict:
    """p50/p99 of key B's 4-token requests, alone and while key A floods; B's refusals; A's tokens."""
    probe = {"model": "m", "messages": [{"role": "user", "content": "a short question"}], "max_tokens": 4,
             "temperature": 0}

    async def probe_latencies(n: int) -> tuple[list[float], dict]:
        client, times, refused = JSONClient("127.0.0.1", port), [], {}
        try:
            for _ in range(n):
                status, seconds, body = await client.post("/v1/chat/completions", probe, key_b)
                if status == 200:
                    times.append(seconds)
                else:
                    refused[status] = refused.get(status, 0) + 1
        finally:
            await client.close()
        return sorted(times), refused

    alone, _ = await probe_latencies(max(5, probes // 3))
    stop, counts = asyncio.Event(), {"requests": 0, "refused": 0, "tokens": 0}

    async def flooder(i: int) -> None:
        client = JSONClient("127.0.0.1", port)
        body = {"model": "m", "prompt": [f"flood {i} line {j}" for j in range(prompts)], "max_tokens": max_tokens,
                "temperature": 0}
        try:
            while not stop.is_set():
                status, _, reply = await client.post("/v1/completions", body, key_a)
                counts["requests" if status == 200 else "refused"] += 1
                if status == 200:
                    counts["tokens"] += json.loads(reply)["usage"]["completion_tokens"]
                if status != 200:
                    await asyncio.sleep(0.05)
        finally:
            await client.close()

    import json

    started = time.perf_counter()
    tasks = [asyncio.create_task(flooder(i)) for i in range(clients)]
    await asyncio.sleep(2.0)  # let the backlog build
    flooded, refused = await probe_latencies(probes)
    stop.set()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"alone_p50": pct(alone, 0.5), "alone_p99": pct(alone, 0.99), "p50": pct(flooded, 0.5),
            "p99": pct(flooded, 0.99), "ok": len(flooded), "refused": refused, "a_requests": counts["requests"],
            "a_refused": counts["refused"], "a_tps": counts["tokens"] / seconds}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_steps(port: int) -> tuple[float, float, float]:
    """(decoding steps, rows summed over them, seconds in them) from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        name = line.split("{")[0]
        if name in ("zenlm_batch_size_count", "zenlm_batch_size_sum", "zenlm_step_seconds_sum"):
            values[name] = float(line.rsplit(" ", 1)[1])
    return (values.get("zenlm_batch_size_count", 0.0), values.get("zenlm_batch_size_sum", 0.0),
            values.get("zenlm_step_seconds_sum", 0.0))


def engine_alone(folder: Path, clients: int, requests: int, max_tokens: int) -> float:
    """Completion tokens/s of the BatchEngine in this process, no HTTP: the ceiling the server can reach."""
    import threading

    from zenlm.serve.catalog import load_generator
    from zenlm.serve.engine import EngineRequest, SamplingParams

    served = load_generator(str(folder), max_batch_size=clients)
    engine = served.engine.start()
    count, lock = [0], threading.Lock()

    def one_client(i: int) -> None:
        for j in range(requests):
            done = threading.Event()

            def on_event(ev, done=done):
                if ev.finish_reason is not None:
                    done.set()
            prompt = served.encode_chat([{"role": "user", "content": f"client {i} says hello {j}"}])
            req = engine.submit(EngineRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     stop_token_ids=served.stop_token_ids), on_event))
            done.wait()
            with lock:
                count[0] += len(req.token_ids)

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return count[0] / (time.perf_counter() - start)
    finally:
        engine.stop()


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
    ap.add_argument("--no-engine-alone", dest="engine_alone", action="store_false",
                    help="skip the in-process engine figure (the ceiling without HTTP)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "zenlm",
                    help="folder whose .py files train the tokenizer (default: this tree's zenlm/); give two "
                         "trees being compared the same one")
    ap.add_argument("--postgres", default=os.environ.get("ZENLM_TEST_POSTGRES_URL"))
    ap.add_argument("--flood-only", action="store_true", help="run only the flood-latency measurement")
    ap.add_argument("--flood-clients", type=int, default=8, help="key A's concurrent connections")
    ap.add_argument("--flood-prompts", type=int, default=32, help="prompts in each of key A's requests")
    ap.add_argument("--flood-probes", type=int, default=30, help="key B's 4-token requests during the flood")
    args = ap.parse_args()
    if args.flood_only:
        return flood_main(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"preset {args.preset}, {args.max_tokens} new tokens per request, {args.requests} requests per client")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "m", args.preset, args.corpus)
        db = str(Path(tmp) / "bench.sqlite3")
        (key,), port = bench_keys_and_port(db)
        proc = start(folder, db, port, max(args.levels))
        try:
            # warm-up at every level's shape, so no level pays first-call costs (allocations, caches) alone
            warm = [asyncio.run(run_level(port, key, c, 1, args.max_tokens)) for c in args.levels]
            results = []
            for c in args.levels:
                before = engine_steps(port)
                results.append(asyncio.run(run_level(port, key, c, args.requests, args.max_tokens)))
                after = engine_steps(port)
                steps, rows, seconds = (a - b for a, b in zip(after, before))
                results[-1].update(rows=rows / max(steps, 1), step_ms=1000 * seconds / max(steps, 1))
        finally:
            proc.terminate()
            proc.wait()
        # the clients' token count (from the usage chunks) must be exactly what the ledger metered
        rows = Billing.open(db).ledger()
        sent = sum(r["tokens"] for r in warm + results)
        metered = sum(r["completion_tokens"] for r in rows)
        expected = sum(c * (1 + args.requests) for c in args.levels)
        if metered != sent or len(rows) != expected or any(r["status"] != "completed" for r in rows):
            raise SystemExit(f"ledger mismatch: clients received {sent} tokens in {expected} requests, the ledger "
                             f"holds {metered} in {len(rows)} rows")
        base = results[0]["tps"]
        print(f"ledger: {len(rows)} rows, {metered} completion tokens = what the clients received")
        print(f"{'clients':>7} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x vs 1':>7} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'rows/step':>9} {'step ms':>8}")
        for r in results:
            print(f"{r['clients']:>7} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>9.1f} {r['tps'] / base:>7.2f} "
                  f"{1000 * r['p50']:>7.0f}ms {1000 * r['p99']:>7.0f}ms {r['rows']:>9.1f} {r['step_ms']:>8.2f}")
        if args.engine_alone:
            alone = {c: engine_alone(folder, c, args.requests, args.max_tokens) for c in args.levels}
            first = alone[args.levels[0]]
            print("engine alone (BatchEngine in this process, no HTTP): " + ", ".join(
                f"{c} -> {tps:.1f} tokens/s ({tps / first:.2f}x)" for c, tps in alone.items()))
        print(f"metering per request (authenticate + reserve + settle): SQLite {metering_cost(db):.2f} ms", end="")
        if args.postgres:
            print(f", PostgreSQL {metering_cost(args.postgres):.2f} ms")
        else:
            print(" (PostgreSQL: set ZENLM_TEST_POSTGRES_URL)")


def flood_main(args) -> None:
    """Key B's small-request latency while key A floods, on a default `zenlm serve` (batch 32, queue 256)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "m", args.preset, args.corpus)
        db = str(Path(tmp) / "bench.sqlite3")
        (key_a, key_b), port = bench_keys_and_port(db, ("a", "b"))
        proc = start(folder, db, port, 32)
        try:
            r = asyncio.run(flood_latency(port, key_a, key_b, args.flood_clients, args.flood_prompts,
                                          args.max_tokens, args.flood_probes))
        finally:
            proc.terminate()
            proc.wait()
    print(f"flood: key A {args.flood_clients} connections x {args.flood_prompts} prompts x {args.max_tokens} tokens "
          f"({r['a_requests']} requests served, {r['a_refused']} refused, {r['a_tps']:.0f} completion tokens/s); "
          f"key B 4-token chat requests")
    print(f"key B alone:        p50 {1000 * r['alone_p50']:.0f} ms, p99 {1000 * r['alone_p99']:.0f} ms")
    print(f"key B under flood:  p50 {1000 * r['p50']:.0f} ms, p99 {1000 * r['p99']:.0f} ms, {r['ok']} answered, "
          f"refused {r['refused'] or 'none'}")


if __name__ == "__main__":
    main()
