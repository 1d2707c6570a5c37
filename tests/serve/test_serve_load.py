"""Load, concurrency and crashes: budgets hold, the ledger matches what clients received, a killed
server leaves nothing half-charged; two server processes on one PostgreSQL share one budget."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import openai
import pytest

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from zenlm.serve.billing import Billing

from .conftest import ADMIN, free_port, fresh_postgres, postgres_url, spawn_server, start_server, wait_healthy

CHAT = [{"role": "user", "content": "hello"}]


@pytest.mark.slow
def test_64_streaming_clients_ledger_equals_what_they_received(tmp_path, model_dir):
    running = start_server(tmp_path, [model_dir], max_batch_size=64)
    try:
        key = running.key()
        received = []

        async def client_run(client, i):
            for j in range(5):
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"client {i} request {j}"}], max_tokens=8,
                    temperature=0.7, seed=i * 10 + j, stream=True, stream_options={"include_usage": True})
                text, usage = "", None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                    if chunk.usage is not None:
                        usage = chunk.usage
                received.append((text, usage))

        async def main():
            client = openai.AsyncOpenAI(base_url=running.base_url, api_key=key, max_retries=0, timeout=120,
                                        http_client=None)
            await asyncio.gather(*(client_run(client, i) for i in range(64)))

        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
        assert len(received) == 320 and all(u is not None for _, u in received)
        rows = running.billing.ledger()
        assert len(rows) == 320 and all(r["status"] == "completed" for r in rows)
        assert sum(r["completion_tokens"] for r in rows) == sum(u.completion_tokens for _, u in received)
        assert sum(r["prompt_tokens"] for r in rows) == sum(u.prompt_tokens for _, u in received)
        assert sum(r["revenue_micros"] for r in rows) == sum(u.cost_micros for _, u in received)
        month = running.billing.key_month(key[:11])
        assert month["reserved_micros"] == 0 and month["spent_micros"] == sum(r["revenue_micros"] for r in rows)
        metrics = httpx.get(running.url + "/metrics", timeout=60).text
        batch_counts = [line for line in metrics.splitlines() if line.startswith('zenlm_batch_size_bucket{le="8.0"')]
        total = [line for line in metrics.splitlines() if line.startswith("zenlm_batch_size_count")]
        assert float(batch_counts[0].split()[-1]) < float(total[0].split()[-1])  # some steps had > 8 rows
        print(f"\n320 streamed requests from 64 clients in {elapsed:.1f}s")
    finally:
        running.stop()


def test_parallel_http_requests_never_pass_the_budget(tmp_path, model_dir):
    running = start_server(tmp_path, [model_dir])
    try:
        # each request may cost up to prompt + 2 * 20 micros; the budget fits 4 of them, 16 race for it
        key = running.key("race", monthly_budget_micros=4 * (5 + 40) + 10, requests_per_minute=1000,
                          tokens_per_minute=10 ** 6)
        statuses = []
        barrier = threading.Barrier(16)

        def call():
            barrier.wait()
            r = httpx.post(running.base_url + "/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                           json={"model": "tiny", "messages": CHAT, "max_tokens": 20})
            statuses.append((r.status_code, r.json()))

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [b for s, b in statuses if s == 200]
        refused = [b for s, b in statuses if s == 429]
        # at most 4 worst cases fit at once; a request that ends early gives back what it did not use,
        # so more than 4 may succeed in all, but never more money than the budget
        assert len(ok) + len(refused) == 16 and ok and refused
        assert all(b["error"]["code"] == "insufficient_quota" for b in refused)
        month = running.billing.key_month(key[:11])
        assert month["spent_micros"] == sum(b["usage"]["cost_micros"] for b in ok) <= 4 * (5 + 40) + 10
        assert month["reserved_micros"] == 0
    finally:
        running.stop()


@pytest.mark.slow
def test_sigkill_under_load_leaves_a_consistent_ledger(tmp_path, model_dir):
    db = str(tmp_path / "crash.sqlite3")
    billing = Billing.open(db)
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9,
                        requests_per_minute=10 ** 5, tokens_per_minute=10 ** 9)
    key = billing.create_key("acme", "basic")[0]
    port = free_port()
    proc = spawn_server(model_dir, db, port, "--lease", "1")
    completed, stop = [], threading.Event()

    def client(i):
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "tiny", "messages": CHAT, "max_tokens": 40, "stream": True,
                                        "stream_options": {"include_usage": True}}) as r:
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                if lines and lines[-1] == "data: [DONE]":
                    completed.append(json.loads(lines[-2][6:]))
            except (httpx.HTTPError, OSError):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(completed) < 10 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-request: several streams are cut
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert completed, "no request completed before the kill"
    proc = spawn_server(model_dir, db, port, "--lease", "1")  # restart; its sweep frees the dead leases
    try:
        deadline = time.time() + 15
        while billing.key_month(key[:11])["reserved_micros"] and time.time() < deadline:
            time.sleep(0.2)
        month = billing.key_month(key[:11])
        rows = billing.ledger()
        assert month["reserved_micros"] == 0 and month["free_tokens_reserved"] == 0
        assert month["spent_micros"] == sum(r["revenue_micros"] for r in rows)
        # every response that completed has its row, with the tokens the client was told; and rows of
        # responses that did not complete can only be the few that were settled in the instant before the
        # kill (at most one in flight per client thread), retrievable again by Idempotency-Key
        assert len(completed) <= len(rows) <= len(completed) + len(threads)
        by_id = {r["request_id"][4:]: r for r in rows}
        for usage_chunk in completed:
            row = by_id[usage_chunk["id"].split("-", 1)[1]]
            assert row["completion_tokens"] == usage_chunk["usage"]["completion_tokens"]
            assert row["revenue_micros"] == usage_chunk["usage"]["cost_micros"]
        # and the restarted server serves
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "tiny", "messages": CHAT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_server_processes_on_one_postgres_share_a_budget(model_dir):
    url = fresh_postgres(postgres_url())
    billing = Billing.open(url)
    # up to 5 + 2 * 30 = 65 micros per request; the budget fits 6 whatever server they hit
    billing.create_plan("shared", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=6 * 65 + 20,
                        requests_per_minute=10 ** 4, tokens_per_minute=10 ** 7)
    key = billing.create_key("acme", "shared")[0]
    ports = [free_port(), free_port()]
    procs = [spawn_server(model_dir, url, p, wait=False) for p in ports]  # both start at once
    for proc, port in zip(procs, ports):
        wait_healthy(proc, port)
    try:
        statuses = []
        barrier = threading.Barrier(24)

        def call(i):
            barrier.wait()
            r = httpx.post(f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions", timeout=60,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "tiny", "messages": CHAT, "max_tokens": 30})
            statuses.append((i % 2, r.status_code, r.json()))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [b for _, s, b in statuses if s == 200]
        refused = [b for _, s, b in statuses if s == 429]
        # both servers admitted work, at most 6 worst cases fit at once, and together they never spent
        # more than the budget (early finishers give back what they did not use, so more may succeed)
        assert len(ok) + len(refused) == 24 and ok and refused
        # every refusal is the shared budget's (whichever server happened to reserve first, the other
        # refuses once the budget is taken: with per-server budgets up to 12 would have succeeded)
        assert all(b["error"]["code"] == "insufficient_quota" for b in refused), refused[:1]
        assert {i for i, _, _ in statuses} == {0, 1}
        month = billing.key_month(key[:11])
        assert month["reserved_micros"] == 0
        assert month["spent_micros"] == sum(b["usage"]["cost_micros"] for b in ok) <= 6 * 65 + 20
        assert len(billing.ledger()) == len(ok)
        # keys are shared too: revoked through one server's admin API, refused by the other
        httpx.delete(f"http://127.0.0.1:{ports[0]}/admin/keys/{key[:11]}", headers={"Authorization": f"Bearer {ADMIN}"},
                     timeout=60)
        r = httpx.post(f"http://127.0.0.1:{ports[1]}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "tiny", "messages": CHAT, "max_tokens": 1}, timeout=60)
        assert r.status_code == 401
    finally:
        for p in procs:
            p.kill()
            p.wait()
