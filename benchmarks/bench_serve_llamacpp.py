"""The 32-client serving cell of issue 23: `zenlm serve` vs llama.cpp's own `llama-server -np 32` (continuous
batching) on the same model, same machine, alternating.

One Hugging Face folder (bench_llamacpp.make_folder: SmolLM-135M-shaped Llama, random weights) is widened to
f32 safetensors; (a) `zenlm serve FOLDER` (its own process, SQLite ledger and key, bench_serve.start) loads it
at f32, (b) llama-server -np N -t T (llamacpp_peer.serving) loads the f32 GGUF llama.cpp's own converter made
of that folder. Both get the same requests on /v1/completions: a --prompt-token id prompt, max_tokens --new,
temperature 0, streamed with usage, "ignore_eos": true (llama-server honours it; zenlm ignores the field and
has no such option, so a random-weight model stops early only if it draws its end token). Tokens/s are
counted from the completion tokens each server reported in its final usage chunk. Levels: --clients
concurrent clients (--requests each, back to back) and one client alone; rounds alternate zenlm and
llama.cpp (--rounds), best of each. Per level: aggregate completion tokens/s, p50 time to the first non-empty
text (not a TTFT here: most of a random model's ids are past its small tokenizer and show no text), each request's own
tokens/s (tokens / its latency: what one client sees while the others stream, vs alone), and for zenlm the
engine's rows per decoding step and ms per step from /metrics (what bounds it); for llama-server its own
per-request decode tokens/s (the timings of its final chunk). Each level also gives tokens per CPU-second
of the server process (/proc utime+stime): on a shared machine the figure load moves least.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_serve_llamacpp.py [--clients 32] [--new 64] [--prompt 32]
        [--requests 1] [--rounds 2] [--threads 2] [--work DIR]
(--threads: llama-server -t/-tb and the zenlm serve process's OMP_NUM_THREADS)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import llamacpp_peer as peer  # noqa: E402
from bench_llamacpp import load, make_folder  # noqa: E402
from bench_open_models import SHAPES, prompt_ids  # noqa: E402
from bench_serve import _Connection, bench_keys_and_port, cpu_seconds, engine_steps, start  # noqa: E402


def f32_folder(src: Path, dst: Path) -> Path:
    """A copy of the folder with its weights widened to f32 (zenlm loads a folder in its stored dtype)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.to(torch.float32) for k, v in load_file(src / "model.safetensors").items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst


class CompletionStream(_Connection):
    """One keep-alive HTTP/1.1 connection streaming /v1/completions (chunked event stream, as bench_serve's
    SSEClient); only the event carrying usage is parsed."""

    def __init__(self, port: int, key: str = ""):
        self.port, self.key = port, key

    async def post(self, payload: dict) -> dict:
        start_t = time.perf_counter()
        first, final = None, None
        async for event in self.stream("127.0.0.1", self.port, "/v1/completions", payload, self.key):
            if first is None and b'"text":"' in event and b'"text":""' not in event:
                first = time.perf_counter() - start_t
            if b'"usage":{' in event:
                final = json.loads(event[event.index(b"{"):])
        wall = time.perf_counter() - start_t
        if final is None:
            raise RuntimeError("the stream ended without a usage chunk")
        timings = final.get("timings") or {}
        return {"tokens": final["usage"]["completion_tokens"], "wall": wall,
                "first": first if first is not None else wall, "server_decode_tps": timings.get("predicted_per_second")}


async def run_level(port: int, key: str, model: str, clients: int, requests: int, new: int, prompt_len: int,
                    vocab: int) -> dict:
    done = []

    async def client(i: int) -> None:
        conn = CompletionStream(port, key)
        try:
            for j in range(requests):
                ids = prompt_ids(vocab, prompt_len + 1 + i * requests + j)[-prompt_len:]  # a prompt per request
                done.append(await conn.post({"model": model, "prompt": ids, "max_tokens": new, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True},
                                             "ignore_eos": True, "cache_prompt": False}))
        finally:
            await conn.close()

    start_t = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start_t
    tokens = sum(r["tokens"] for r in done)
    server_tps = [r["server_decode_tps"] for r in done if r["server_decode_tps"]]
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "ttft": statistics.median(r["first"] for r in done),
            "per_request_tps": statistics.mean(r["tokens"] / r["wall"] for r in done),
            "server_decode_tps": statistics.mean(server_tps) if server_tps else None,
            "short": sum(r["tokens"] < new for r in done)}


def measure(side: dict, levels: list[int], args, vocab: int) -> None:
    for c in levels:
        before = engine_steps(side["port"]) if side["name"] == "zenlm" else None
        cpu = cpu_seconds(side["pid"])
        r = asyncio.run(run_level(side["port"], side["key"], side["model"], c, args.requests, args.new, args.prompt,
                                  vocab))
        if before is not None:
            steps, rows, seconds = (a - b for a, b in zip(engine_steps(side["port"]), before))
            r.update(rows=rows / max(steps, 1), step_ms=1000 * seconds / max(steps, 1))
        r["load"] = os.getloadavg()[0]
        r["cpu_tps"] = r["tokens"] / max(cpu_seconds(side["pid"]) - cpu, 1e-9)  # per CPU-second of the server
        print(f"  {side['name']:>9} {c:>2} clients: {r['tokens']} tokens in {r['wall']:.2f} s = {r['tps']:.1f} "
              f"tokens/s, {r['cpu_tps']:.1f} per server CPU-second ({r['short']} short), {load()}", flush=True)
        best = side["best"].get(c)
        if best is None or r["tps"] > best["tps"]:
            side["best"][c] = r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--requests", type=int, default=1, help="requests per client per level")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2,
                    help="llama-server -t/-tb, and OMP_NUM_THREADS of the zenlm serve process")
    ap.add_argument("--work", type=Path, default=None, help="folder for the model and GGUF (kept; default a temp dir)")
    args = ap.parse_args()

    from zenlm.kernels import system_summary

    print(system_summary(), flush=True)
    skip = peer.missing("llama-server", "converter")
    if skip:
        print(f"llama.cpp: {skip}")
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    src = work / args.shape
    make_folder(args.shape, src)
    folder = f32_folder(src, work / f"{args.shape}-f32")
    vocab = SHAPES[args.shape][2]["vocab_size"]
    levels = [args.clients, 1]
    print(f"{args.shape} f32, {args.clients} clients x {args.requests} requests x {args.new} tokens "
          f"(prompt {args.prompt} tokens) and 1 client alone; {args.rounds} rounds alternating; {load()}", flush=True)

    db = str(work / "bench.sqlite3")
    if os.path.exists(db):
        os.remove(db)
    (key,), port = bench_keys_and_port(db)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the zenlm serve child's torch threads
    proc = start(folder, db, port, args.clients)
    sides = [{"name": "zenlm", "port": port, "key": key, "best": {}, "model": None, "pid": proc.pid}]
    server = None
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        sides[0]["model"] = json.load(urllib.request.urlopen(req))["data"][0]["id"]
        if not skip:
            gguf = peer.model_file(folder, "f32", work)
            server = peer.start_server(gguf["path"], parallel=args.clients, threads=args.threads,
                                       ctx_per_slot=max(256, 2 * (args.prompt + args.new)))
            sides.append({"name": "llama.cpp", "port": server["port"], "key": "", "model": "m", "best": {},
                          "pid": server["pid"]})
        for side in sides:  # warm-up: every level's shape once
            for c in levels:
                asyncio.run(run_level(side["port"], side["key"], side["model"], c, 1, args.new, args.prompt, vocab))
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}", flush=True)
            for side in (sides if rnd % 2 == 0 else sides[::-1]):
                measure(side, levels, args, vocab)
    finally:
        proc.terminate()
        proc.wait()
        if server is not None:
            peer.stop_server(server)

    print(f"\nbest of {args.rounds} rounds; completion tokens as each server's usage reported them")
    print(f"{'server':>10} {'clients':>7} {'tokens':>7} {'tokens/s':>9} {'per CPU-s':>9} {'1st text':>9} "
          f"{'1 request tok/s':>15} {'server decode tok/s':>19} {'rows/step':>9} {'step ms':>8}")
    for side in sides:
        for c in levels:
            r = side["best"][c]
            sd = f"{r['server_decode_tps']:.1f}" if r["server_decode_tps"] else "-"
            rows = f"{r['rows']:.1f}" if "rows" in r else "-"
            step = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
            print(f"{side['name']:>10} {c:>7} {r['tokens']:>7} {r['tps']:>9.1f} {r['cpu_tps']:>9.1f} "
                  f"{1000 * r['ttft']:>7.0f}ms "
                  f"{r['per_request_tps']:>15.1f} {sd:>19} {rows:>9} {step:>8}")
    if len(sides) == 2:
        z, l = sides[0]["best"], sides[1]["best"]
        print("zenlm / llama.cpp: " + ", ".join(f"{c} clients {z[c]['tps'] / l[c]['tps']:.2f}x" for c in levels)
              + "; by server CPU time: " + ", ".join(f"{c} clients {z[c]['cpu_tps'] / l[c]['cpu_tps']:.2f}x"
                                                     for c in levels))
        zb = z[args.clients]
        print(f"one client while {args.clients - 1} others stream vs alone (tokens / request latency): zenlm "
              f"{zb['per_request_tps']:.1f} vs {z[1]['per_request_tps']:.1f}, llama.cpp "
              f"{l[args.clients]['per_request_tps']:.1f} vs {l[1]['per_request_tps']:.1f}")
        if zb.get("rows"):
            print(f"zenlm at {args.clients} clients: {zb['rows']:.1f} rows per step x 1000 / {zb['step_ms']:.1f} ms "
                  f"per step = {1000 * zb['rows'] / zb['step_ms']:.1f} tokens/s of engine ceiling "
                  f"(served {zb['tps']:.1f})")
    print(load())
    tmp.cleanup()


if __name__ == "__main__":
    main()
