"""The gateway's own cost (issue 19): what `zenlm serve --upstream` adds in front of a fast upstream.

Starts, as separate processes, a minimal fast OpenAI-compatible upstream written here (raw asyncio;
one process, several ports = replicas) and `zenlm serve --upstream` over it with an SQLite ledger, then
measures from this process:

1. Added latency per request: the same small chat completion (16 tokens, JSON) sent one at a time on a
   keep-alive connection straight to the upstream and through the gateway (authenticate, reserve,
   forward, settle), alternating the two, --requests each; p50/p99 of each and the difference, and
   how much of it is the ledger's three transactions (bench_serve.metering_cost, in this process).
2. Throughput ceiling at 32 and 128 concurrent streams (64 tokens each, the upstream emitting as fast
   as it can), directly and through the gateway, alternating; aggregate completion tokens/s.
3. Aggregate tokens/s through the gateway with 1 vs 2 replicas of an upstream that behaves like a
   batching engine (each replica runs at most --batch streams at once, one token per stream every
   --step-ms), at 128 concurrent streams.
Every gateway run is checked: the tokens the clients received (content events) = the tokens the
upstream sent = the usage the clients were told = the ledger's completion tokens, one completed row
per request; the run fails otherwise.

    python benchmarks/bench_gateway.py [--requests 300] [--streams 32 128] [--tokens 64] [--rounds 2]

The CPU line comes first; the load average is printed before and after (other work on the cores
moves every figure; the alternation keeps the two sides of each ratio under the same load).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORD = "tok "


# --------------------------------------------------------------------------- the fast upstream
class Replica:
    """One port of the fake upstream: ``batch`` streams at once, one token every ``step_s`` each
    (0: as fast as the socket takes them); counts the tokens it sent."""

    def __init__(self, batch: int, step_s: float):
        self.slots = asyncio.Semaphore(batch) if batch else None
        self.step_s, self.sent = step_s, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if method == "GET":
                    out = json.dumps({"sent": self.sent} if path == "/stats" else {"status": "ok"}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(out), out))
                    await writer.drain()
                    continue
                await self.answer(body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def answer(self, body: dict, writer: asyncio.StreamWriter) -> None:
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n}
        base = {"id": "chatcmpl-fast", "created": 1, "model": body.get("model", "fast")}
        if not body.get("stream"):
            out = json.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": WORD * n}, "finish_reason": "length"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(out), out))
            self.sent += n
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

        def event(payload: dict) -> bytes:
            data = b"data: " + json.dumps(payload).encode() + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        chunk = {**base, "object": "chat.completion.chunk"}
        token = event({**chunk, "choices": [{"index": 0, "delta": {"content": WORD}, "finish_reason": None}]})
        if self.slots is not None:
            await self.slots.acquire()
        try:
            for _ in range(n):
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                writer.write(token)
                self.sent += 1
                await writer.drain()
        finally:
            if self.slots is not None:
                self.slots.release()
        writer.write(event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            writer.write(event({**chunk, "choices": [], "usage": usage}))
        data = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        await writer.drain()


def fake_main(specs: list[str]) -> None:
    """``PORT:BATCH:STEP_MS`` per replica, all in this process."""
    async def run():
        servers = []
        for spec in specs:
            port, batch, step_ms = spec.split(":")
            replica = Replica(int(batch), float(step_ms) / 1000)
            servers.append(await asyncio.start_server(replica.handle, "127.0.0.1", int(port), backlog=1024))
        await asyncio.gather(*(s.serve_forever() for s in servers))

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run())


# --------------------------------------------------------------------------- clients
async def stream_once(client, path: str, payload: dict, key: str) -> tuple[int, int]:
    """One streamed request on a keep-alive connection: (content events received, usage completion tokens)."""
    received, usage = 0, None
    async for e in client.stream(client.host, client.port, path, payload, key):
        if b'"content": "' in e or b'"content":"' in e:
            received += 1
        elif b'"usage":' in e and b'"usage": null' not in e and b'"usage":null' not in e:
            usage = json.loads(e[6:])["usage"]["completion_tokens"]
    if usage is None:
        raise RuntimeError("a stream ended without its usage chunk")
    return received, usage


async def streams(port: int, key: str, clients: int, per_client: int, tokens: int, model: str) -> dict:
    from bench_serve import JSONClient

    got = {"received": 0, "usage": 0, "requests": 0}

    async def one():
        client = JSONClient("127.0.0.1", port)
        try:
            for _ in range(per_client):
                r, u = await stream_once(client, "/v1/chat/completions", {
                    "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens,
                    "stream": True, "stream_options": {"include_usage": True}}, key)
                got["received"] += r
                got["usage"] += u
                got["requests"] += 1
        finally:
            await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {**got, "wall": wall, "tps": got["received"] / wall}


async def latencies(ports: dict, key: str, n: int, model: str) -> dict:
    """Alternate one request straight to the upstream and one through the gateway, n times."""
    from bench_serve import JSONClient

    clients = {side: JSONClient("127.0.0.1", port) for side, port in ports.items()}
    times = {side: [] for side in ports}
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    try:
        for i in range(n + 20):
            for side, client in clients.items():
                status, seconds, body = await client.post("/v1/chat/completions", payload, key)
                if status != 200:
                    raise RuntimeError(f"{side}: {status} {body[:300]!r}")
                if i >= 20:  # warm-up excluded
                    times[side].append(seconds * 1000)
    finally:
        for c in clients.values():
            await c.close()
    return {side: sorted(t) for side, t in times.items()}


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def sent(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())["sent"]


def wait_for(port: int, path: str = "/health", proc: subprocess.Popen | None = None) -> None:
    for _ in range(600):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


# --------------------------------------------------------------------------- the run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per side for the latency")
    ap.add_argument("--streams", type=int, nargs="+", default=[32, 128], help="concurrent streams")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--per-client", type=int, default=3, help="streams per client, one after another")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of direct and gateway for each level")
    ap.add_argument("--batch", type=int, default=16, help="streams a batching replica runs at once")
    ap.add_argument("--step-ms", type=float, default=10.0, help="a batching replica's time per token")
    ap.add_argument("--fake-upstream", nargs="+", metavar="PORT:BATCH:STEP_MS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fake_upstream:
        return fake_main(args.fake_upstream)

    from bench_serve import bench_keys_and_port, cpu_seconds, metering_cost

    from zenlm.kernels import system_summary
    from zenlm.serve.billing import Billing

    print(system_summary())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "gw.sqlite3")
        (key,), gw_port = bench_keys_and_port(db)
        fast, step1, step2 = (bench_keys_and_port(str(Path(tmp) / f"p{i}.sqlite3"), ())[1] for i in range(3))
        fake = subprocess.Popen([sys.executable, __file__, "--fake-upstream", f"{fast}:0:0",
                                 f"{step1}:{args.batch}:{args.step_ms}", f"{step2}:{args.batch}:{args.step_ms}"])
        spec = ";concurrency=100000;timeout=60"
        gw = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", "--port", str(gw_port), "--database", db,
                               "--upstream", f"fast=http://127.0.0.1:{fast}{spec}",
                               "--upstream", f"one=http://127.0.0.1:{step1}{spec}",
                               "--upstream", f"two=http://127.0.0.1:{step1},http://127.0.0.1:{step2}{spec}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for port in (fast, step1, step2):
                wait_for(port, proc=fake)
            wait_for(gw_port, proc=gw)
            billing = Billing.open(db)
            checked = {"requests": 0, "tokens": 0}

            def check(result: dict, before_sent: int, after_sent: int) -> None:
                upstream = after_sent - before_sent
                if not result["received"] == result["usage"] == upstream:
                    raise RuntimeError(f"tokens lost or counted twice: received {result['received']}, usage "
                                       f"{result['usage']}, upstream sent {upstream}")
                checked["requests"] += result["requests"]
                checked["tokens"] += result["received"]

            # 1. added latency
            cpu_before = cpu_seconds(gw.pid)
            lat = asyncio.run(latencies({"direct": fast, "gateway": gw_port}, key, args.requests, "fast"))
            gw_cpu_ms = 1000 * (cpu_seconds(gw.pid) - cpu_before) / (args.requests + 20)
            d, g = lat["direct"], lat["gateway"]
            print(f"\nlatency of a 16-token JSON chat completion, {args.requests} each, alternating (ms):")
            print(f"  direct   p50 {pct(d, .5):6.2f}  p99 {pct(d, .99):6.2f}")
            print(f"  gateway  p50 {pct(g, .5):6.2f}  p99 {pct(g, .99):6.2f}")
            print(f"  added    p50 {pct(g, .5) - pct(d, .5):6.2f}  p99 {pct(g, .99) - pct(d, .99):6.2f}  "
                  f"(goal: < 2 ms p50)")
            meter = metering_cost(str(Path(tmp) / "meter.sqlite3"), args.requests)
            print(f"  the ledger's three transactions alone (authenticate + reserve + settle on SQLite, timed in "
                  f"this process right after): {meter:.2f} ms per request")
            print(f"  the gateway process's CPU time per request: {gw_cpu_ms:.2f} ms (what it adds on an idle core, "
                  f"whatever the load; /proc, 10 ms ticks over {args.requests + 20} requests)")
            checked["requests"] += args.requests + 20
            checked["tokens"] += 16 * (args.requests + 20)

            # 2. throughput ceiling, direct and through the gateway, alternating
            print(f"\nthroughput ceiling, {args.tokens} tokens per stream, {args.per_client} streams per client, "
                  f"fast upstream (tokens/s, {args.rounds} rounds alternating):")
            for level in args.streams:
                rates = {"direct": [], "gateway": []}
                for _ in range(args.rounds):
                    for side, port in (("direct", fast), ("gateway", gw_port)):
                        before = sent(fast)
                        r = asyncio.run(streams(port, key, level, args.per_client, args.tokens, "fast"))
                        if side == "gateway":
                            check(r, before, sent(fast))
                        rates[side].append(r["tps"])
                dm, gm = statistics.median(rates["direct"]), statistics.median(rates["gateway"])
                print(f"  {level:4d} streams: direct {dm:8.0f}  gateway {gm:8.0f}  gateway/direct {gm / dm:.2f}x  "
                      f"(runs: {' '.join(f'{x:.0f}' for x in rates['direct'])} / "
                      f"{' '.join(f'{x:.0f}' for x in rates['gateway'])})")

            # 3. one vs two replicas of a batching upstream
            level = max(args.streams)
            cap = args.batch / (args.step_ms / 1000)
            print(f"\nreplicas ({args.batch} streams at once, {args.step_ms:g} ms per token each: at most {cap:.0f} "
                  f"tokens/s per replica), {level} streams through the gateway (tokens/s, {args.rounds} rounds):")
            rates = {"one": [], "two": []}
            for _ in range(args.rounds):
                for model in ("one", "two"):
                    before = sent(step1) + sent(step2)
                    r = asyncio.run(streams(gw_port, key, level, args.per_client, args.tokens, model))
                    check(r, before, sent(step1) + sent(step2))
                    rates[model].append(r["tps"])
            one, two = statistics.median(rates["one"]), statistics.median(rates["two"])
            print(f"  1 replica {one:8.0f}   2 replicas {two:8.0f}   {two / one:.2f}x")

            # the ledger: one completed row per request, its completion tokens = what the clients received
            time.sleep(0.5)
            rows = billing.ledger()
            ledger_tokens = sum(r["completion_tokens"] for r in rows)
            ok = (len(rows) == checked["requests"] and ledger_tokens == checked["tokens"]
                  and all(r["status"] == "completed" for r in rows))
            print(f"\nledger: {len(rows)} rows for {checked['requests']} requests, {ledger_tokens} completion tokens "
                  f"for {checked['tokens']} received: {'exact' if ok else 'MISMATCH'}")
            if not ok:
                raise SystemExit(1)
        finally:
            for p in (gw, fake):
                p.terminate()
                p.wait(timeout=30)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
