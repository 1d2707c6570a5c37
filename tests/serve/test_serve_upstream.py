"""The gateway (zenlm/serve/upstream.py): zenlm serve with --upstream in front of small fake
OpenAI-compatible servers on 127.0.0.1, driven by the official openai client. Replies pass through
(whole and streamed), the ledger row holds the upstream's usage and the key pays the plan's price;
an upstream without usage is counted here and marked; a replica refusing connections is skipped; a
replica dying mid-stream ends the stream with an error and the customer pays for what it got; a
bad key never reaches an upstream."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .conftest import free_port, leave_stream, start_server, wait_for_ledger_row

WORDS = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta "]
PROMPT_TOKENS = 7


class Fake:
    """A tiny OpenAI-compatible server: replies with ``words`` words, one per stream chunk."""

    def __init__(self, usage: bool = True, die_after: int | None = None, hold: bool = False, delay: float = 0.0,
                 status: int = 200, port: int | None = None, stall_after: int | None = None):
        self.usage, self.die_after, self.calls, self.hold, self.delay = usage, die_after, 0, hold, delay
        self.status, self.stall_after = status, stall_after
        self.holding = 0
        self.bodies: list[dict] = []
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.calls += 1
            self.bodies.append(body)
            if self.status != 200:
                return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}},
                                    status_code=self.status)
            if body.get("max_tokens") == 999:
                return JSONResponse({"error": {"message": "max_tokens 999 is not allowed here", "type":
                                               "invalid_request_error", "param": "max_tokens", "code": None}},
                                    status_code=400)
            if self.hold:  # answer only once the test lets go (at most 3 s)
                self.holding += 1
                deadline = time.time() + 3
                while self.hold and time.time() < deadline:
                    await asyncio.sleep(0.01)
                self.holding -= 1
            n = min(len(WORDS), body.get("max_tokens") or len(WORDS))
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
            base = {"id": "chatcmpl-fake", "created": 1764300000, "model": body["model"]}
            if not body.get("stream"):
                out = {**base, "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(WORDS[:n])},
                     "finish_reason": "length", "logprobs": None}]}
                if self.usage:
                    out["usage"] = usage
                return JSONResponse(out)

            async def events():
                chunk = {**base, "object": "chat.completion.chunk"}
                yield "data: " + json.dumps({**chunk, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}) + "\n\n"
                for i in range(n):
                    await asyncio.sleep(self.delay)
                    if i == self.die_after:
                        raise RuntimeError("replica died")  # uvicorn cuts the connection mid-body
                    if i == self.stall_after:  # alive, connected, silent
                        await asyncio.sleep(30)
                    yield "data: " + json.dumps({**chunk, "choices": [
                        {"index": 0, "delta": {"content": WORDS[i]}, "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({**chunk, "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "length"}]}) + "\n\n"
                if self.usage and (body.get("stream_options") or {}).get("include_usage"):
                    yield "data: " + json.dumps({**chunk, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.calls += 1
            n = min(len(WORDS), body.get("max_tokens") or len(WORDS))
            out = {"id": "cmpl-fake", "object": "text_completion", "created": 1764300000, "model": body["model"],
                   "choices": [{"index": 0, "text": "".join(WORDS[:n]), "finish_reason": "length", "logprobs": None}]}
            if self.usage:
                out["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n,
                                "total_tokens": PROMPT_TOKENS + n}
            return JSONResponse(out)

        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "fake upstream did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_dir):
    from zenlm.serve.upstream import parse_upstream

    good, bare, dying, held = Fake(), Fake(usage=False), Fake(die_after=2), Fake(hold=True)
    trickle, held2, broken = Fake(delay=0.2), Fake(hold=True), Fake(status=503)
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ups = [parse_upstream(f"up={good.url}"),
           parse_upstream(f"pair={refused},{good.url}"),
           parse_upstream(f"bare={bare.url};price=3.60", {"bare": str(model_dir)}),
           parse_upstream(f"bytes={bare.url}"),
           parse_upstream(f"dies={dying.url};timeout=5"),
           parse_upstream(f"slow={held.url};timeout=0.5;eject=0"),
           parse_upstream(f"capped={held.url};concurrency=1;timeout=10"),
           parse_upstream(f"trickle={trickle.url}"),
           parse_upstream(f"waits={held.url};timeout=10"),
           parse_upstream(f"lb={held.url},{held2.url};timeout=10"),
           parse_upstream(f"flaky={broken.url},{good.url}")]
    gw = start_server(tmp_path_factory.mktemp("gateway"), [], upstreams=ups, admin_token="admin")
    yield dict(url=gw.url, billing=gw.billing, good=good, bare=bare, dying=dying, held=held,
               upstreams=gw.app.app.state.upstreams, refused=refused, held2=held2, broken=broken)
    gw.stop()
    held.hold = False
    held2.hold = False
    for f in (good, bare, dying, held, trickle, held2, broken):
        f.stop()


def _client(gw, key):
    import openai

    return openai.OpenAI(base_url=gw["url"] + "/v1", api_key=key, max_retries=0, timeout=20)


def _row(billing, request_id):
    rows = [r for r in billing.ledger() if r["request_id"] == request_id]
    assert len(rows) == 1, rows
    return rows[0]


def _spent(billing, key):
    return billing.key_month(key[:11])["spent_micros"]


def test_plain_and_streamed_pass_through_with_upstream_usage(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    raw = client.chat.completions.with_raw_response.create(model="up", max_tokens=4,
                                                          messages=[{"role": "user", "content": "hi"}])
    reply = raw.parse()
    assert reply.choices[0].message.content == "".join(WORDS[:4])
    assert reply.usage.prompt_tokens == PROMPT_TOKENS and reply.usage.completion_tokens == 4
    row = _row(billing, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["counted"]) == (PROMPT_TOKENS, 4, None)
    assert row["model"] == "up" and row["upstream"] == "up " + gateway["good"].url
    price = PROMPT_TOKENS * 1 + 4 * 2  # micros at 1 and 2 units per million
    assert row["revenue_micros"] == price and _spent(billing, key) == price

    stream = client.chat.completions.with_raw_response.create(
        model="up", max_tokens=5, stream=True, messages=[{"role": "user", "content": "hi"}],
        stream_options={"include_usage": True})
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS[:5])
    assert chunks[-1].usage.completion_tokens == 5
    row = _row(billing, stream.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (PROMPT_TOKENS, 5, "completed")
    assert _spent(billing, key) == price + PROMPT_TOKENS + 10
    # the upstream was asked for its usage
    assert gateway["good"].bodies[-1]["stream_options"] == {"include_usage": True}

    models = {m.id for m in client.models.list().data}
    assert {"up", "pair", "bare", "dies"} <= models


def test_no_usage_is_counted_locally_and_marked(gateway, model_dir):
    from zenlm import load_tokenizer

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    raw = client.chat.completions.with_raw_response.create(model="bare", max_tokens=3,
                                                          messages=[{"role": "user", "content": "hello world"}])
    tok = load_tokenizer(model_dir)
    row = _row(billing, raw.headers["x-request-id"])
    assert row["counted"] == "local-tokenizer"
    assert row["prompt_tokens"] == len(tok.encode("hello world"))
    assert row["completion_tokens"] == len(tok.encode("".join(WORDS[:3])))
    assert row["upstream"].startswith("bare ")
    assert row["compute_cost_micros"] == row["compute_ms"]  # price=3.60 per hour = 1 micro per busy ms

    stream = client.chat.completions.with_raw_response.create(model="bytes", max_tokens=3, stream=True,
                                                             messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices) == "".join(WORDS[:3])
    row = _row(billing, stream.headers["x-request-id"])
    assert row["counted"] == "local-chunks" and row["completion_tokens"] == 3


def test_refused_replica_is_skipped(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    before = gateway["good"].calls
    for stream in (False, True):
        reply = client.chat.completions.create(model="pair", max_tokens=2, stream=stream,
                                               messages=[{"role": "user", "content": "hi"}])
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices) == "".join(WORDS[:2])
        else:
            assert reply.choices[0].message.content == "".join(WORDS[:2])
    assert gateway["good"].calls == before + 2


def test_5xx_before_the_first_byte_moves_on_and_charges_once(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    broken, flaky = gateway["broken"], gateway["upstreams"]["flaky"]
    for stream in (False, True):
        flaky.replicas[0].down_until = 0.0  # admitted again, so it is tried first (fewest in flight, first given)
        calls = broken.calls
        reply = client.chat.completions.create(model="flaky", max_tokens=2, stream=stream,
                                               messages=[{"role": "user", "content": "hi"}])
        text = ("".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream
                else reply.choices[0].message.content)
        assert text == "".join(WORDS[:2]) and broken.calls == calls + 1
    assert _spent(billing, key) == 2 * (PROMPT_TOKENS + 4)
    assert flaky.replicas[0].failures >= 1  # set aside (the health check may have let it back since)


def test_replica_dying_mid_stream_charges_what_was_delivered(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    raw = client.chat.completions.with_raw_response.create(model="dies", max_tokens=5, stream=True,
                                                          messages=[{"role": "user", "content": "hi"}])
    got = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for c in raw.parse():
            if c.choices:
                got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "".join(WORDS[:2])
    row = _row(billing, raw.headers["x-request-id"])
    assert row["status"] == "upstream_error" and row["completion_tokens"] == 2
    assert row["revenue_micros"] == row["prompt_tokens"] * 1 + 2 * 2


def test_client_leaving_mid_stream_pays_for_what_it_got(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    raw = _client(gateway, key).chat.completions.with_raw_response.create(
        model="trickle", max_tokens=6, stream=True, messages=[{"role": "user", "content": "hi"}])
    leave_stream(raw)
    wait_for_ledger_row(billing, lambda r: r["request_id"] == raw.headers["x-request-id"],
                        "the stream the client left")
    row = _row(billing, raw.headers["x-request-id"])
    assert row["status"] == "disconnected" and row["counted"] == "local-chunks"
    assert 2 <= row["completion_tokens"] <= 3  # what was written to the client's connection
    assert row["revenue_micros"] == row["prompt_tokens"] + 2 * row["completion_tokens"]
    assert billing.key_month(key[:11])["reserved_micros"] == 0


def test_bad_key_never_reaches_the_upstream(gateway):
    import openai

    before = gateway["good"].calls
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, "zk-wrong-key").chat.completions.create(
            model="up", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert gateway["good"].calls == before


def test_upstream_4xx_passes_on_and_timeouts_answer_504_uncharged(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    rows = len(billing.ledger())
    with pytest.raises(openai.BadRequestError, match="999 is not allowed"):
        client.chat.completions.create(model="up", max_tokens=999, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="999 is not allowed"):
        client.chat.completions.create(model="up", max_tokens=999, stream=True,
                                       messages=[{"role": "user", "content": "hi"}])
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="slow", max_tokens=2, stream=stream,
                                           messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 504
    assert len(billing.ledger()) == rows
    month = billing.key_month(key[:11])
    assert month["spent_micros"] == 0 and month["reserved_micros"] == 0


def test_concurrency_cap_refuses_beyond_it(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    held = gateway["held"]
    held.hold = True
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("reply", client.chat.completions.create(
        model="capped", max_tokens=2, messages=[{"role": "user", "content": "hi"}])))
    t.start()
    deadline = time.time() + 5
    capped = gateway["upstreams"]["capped"]
    while capped.in_flight == 0 and time.time() < deadline:
        time.sleep(0.01)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="capped", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503
    finally:
        held.hold = False
        t.join(timeout=10)
    assert first["reply"].choices[0].message.content == "".join(WORDS[:2])


def test_least_outstanding_spreads_requests_across_replicas(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    held, held2, lb = gateway["held"], gateway["held2"], gateway["upstreams"]["lb"]
    held.hold = held2.hold = True
    replies = []

    def ask():
        replies.append(client.chat.completions.create(model="lb", max_tokens=2,
                                                      messages=[{"role": "user", "content": "hi"}]))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 5
        while sum(r.outstanding for r in lb.replicas) < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert [r.outstanding for r in lb.replicas] == [2, 2]
    finally:
        held.hold = held2.hold = False
        for t in threads:
            t.join(timeout=10)
    assert len(replies) == 4 and all(r.outstanding == 0 for r in lb.replicas)


def test_client_leaving_before_a_json_answer_pays_nothing(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    held = gateway["held"]
    held.hold = True
    try:
        with pytest.raises(openai.APITimeoutError):
            _client(gateway, key).with_options(timeout=0.5).chat.completions.create(
                model="waits", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        wait_for_ledger_row(billing, lambda r: r["model"] == "waits", "the request the client left")
    finally:
        held.hold = False
    row = [r for r in billing.ledger() if r["model"] == "waits"][0]
    assert row["status"] == "disconnected" and row["revenue_micros"] == 0
    month = billing.key_month(key[:11])
    assert month["spent_micros"] == 0 and month["reserved_micros"] == 0


def test_stream_replay_and_report_by_upstream(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    texts = []
    for _ in range(2):
        stream = client.chat.completions.create(model="up", max_tokens=3, stream=True,
                                                messages=[{"role": "user", "content": "hi"}],
                                                extra_headers={"Idempotency-Key": "once"})
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert texts == ["".join(WORDS[:3])] * 2
    assert _spent(billing, key) == PROMPT_TOKENS + 6  # charged once
    from zenlm.serve.billing import month_of

    report = billing.report(month_of(time.time()), "upstream")
    groups = {r["group"] for r in report["rows"]}
    assert "up " + gateway["good"].url in groups
    import urllib.request

    req = urllib.request.Request(gateway["url"] + "/admin/upstreams", headers={"Authorization": "Bearer admin"})
    with urllib.request.urlopen(req, timeout=5) as r:
        ups = {u["name"]: u for u in json.loads(r.read())["data"]}
    assert {"up", "pair"} <= set(ups)
    replica = ups["up"]["replicas"][0]
    assert replica["healthy"] and replica["requests"] >= 1 and replica["p50_s"] is not None
    assert replica["tokens_per_s"] > 0
    with urllib.request.urlopen(gateway["url"] + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'zenlm_upstream_requests_total{{replica="{gateway["good"].url}",upstream="up"}}' in metrics
    assert "zenlm_upstream_in_flight" in metrics
    assert openai  # the client above is the official one


def test_health_check_ejects_and_readmits(gateway):
    from zenlm.serve.upstream import check_health, parse_upstream

    pair = parse_upstream(f"pair={gateway['refused']},{gateway['good'].url}")
    refused, good = pair.replicas
    good.down_until = time.monotonic() + 60  # set aside by hand
    refused.down_until = 0.0
    import asyncio as aio

    async def once():
        try:
            await check_health({"pair": pair})
        finally:
            await pair.close()

    aio.run(once())
    assert good.down_until <= time.monotonic() < refused.down_until
    assert pair.order()[0] is good


def test_cli_serves_an_upstream(gateway, tmp_path):
    import subprocess
    import sys
    import os

    from zenlm.serve.billing import Billing

    from .conftest import wait_healthy

    db = str(tmp_path / "cli.sqlite3")
    billing = Billing.open(db)
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9, replace=True)
    key = billing.create_key("acme", "basic")[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", "--port", str(port), "--database", db,
                             "--upstream", f"remote={gateway['good'].url};timeout=5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(proc, port)
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20)
        reply = client.chat.completions.create(model="remote", max_tokens=2,
                                               messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "".join(WORDS[:2])
        assert [m.id for m in client.models.list().data] == ["remote"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert billing.key_month(key[:11])["spent_micros"] == PROMPT_TOKENS + 4


def test_a_zenlm_server_as_upstream(tmp_path, model_dir, monkeypatch):
    """A real upstream: a second zenlm server with a tiny model, behind the gateway with a key of its own."""
    from zenlm.serve.upstream import parse_upstream

    backend = start_server(tmp_path / "backend", [model_dir])
    gw = None
    try:
        monkeypatch.setenv("ZEN_UPSTREAM_KEY", backend.key())
        up = parse_upstream(f"zen={backend.url};model={model_dir.name};api_key_env=ZEN_UPSTREAM_KEY;timeout=20")
        gw = start_server(tmp_path / "gw", [], upstreams=[up])
        billing = gw.billing
        import openai

        key = billing.create_key("acme", "basic")[0]
        client = gw.client(key)
        raw = client.chat.completions.with_raw_response.create(
            model="zen", max_tokens=5, temperature=0, messages=[{"role": "user", "content": "hello world"}])
        reply = raw.parse()
        assert reply.model == "zen"
        row = _row(billing, raw.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.prompt_tokens,
                                                                  reply.usage.completion_tokens)
        assert row["counted"] is None and reply.usage.completion_tokens >= 1
        behind = backend.billing.ledger()[-1]  # the upstream's own ledger saw the same tokens
        assert (behind["prompt_tokens"], behind["completion_tokens"]) == (row["prompt_tokens"],
                                                                        row["completion_tokens"])

        raw = client.chat.completions.with_raw_response.create(
            model="zen", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hello world"}])
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content  # greedy: the same reply, streamed
        row = _row(billing, raw.headers["x-request-id"])
        assert chunks[-1].usage.completion_tokens == row["completion_tokens"] == reply.usage.completion_tokens
        assert row["revenue_micros"] == row["prompt_tokens"] + 2 * row["completion_tokens"]

        done = client.completions.create(model="zen", prompt="the quick", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens >= 1 and done.model == "zen"
        emb = client.embeddings.create(model="zen", input=["hello", "world"])
        assert len(emb.data) == 2 and emb.usage.prompt_tokens >= 2
        assert {m.id for m in client.models.list().data} == {"zen"}
    finally:
        if gw is not None:
            gw.stop()
        backend.stop()


def test_busy_time_is_split_across_requests_in_flight(monkeypatch):
    """Cost per upstream: a replica's hour price split by each request's share of its busy time."""
    from zenlm.serve import upstream as U

    clock = [100.0]
    monkeypatch.setattr(U.time, "monotonic", lambda: clock[0])
    up = U.parse_upstream("m=http://127.0.0.1:1;price=3.60")  # 1 micro per busy millisecond
    r = up.replicas[0]
    a = up.begin(r)            # t=0: a alone
    clock[0] += 1.0
    b = up.begin(r)            # t=1: a and b share
    clock[0] += 2.0
    a_ms = up.end(r, a)        # t=3: a had 1 s alone + 2 s shared = 2 s
    clock[0] += 1.0
    b_ms = up.end(r, b)        # t=4: b had 2 s shared + 1 s alone = 2 s
    assert (a_ms, b_ms) == (2000, 2000) and up.cost(a_ms) + up.cost(b_ms) == 4000  # 4 busy seconds in all


def test_upstream_specs():
    from zenlm.serve.upstream import parse_upstream

    up = parse_upstream("m=http://127.0.0.1:9/v1/, http://127.0.0.1:10;timeout=3;concurrency=2;model=x;max_tokens=7")
    assert [r.url for r in up.replicas] == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
    assert (up.timeout_s, up.concurrency, up.remote_model, up.max_tokens) == (3.0, 2, "x", 7)
    for bad, why in (("m", "NAME=URL"), ("m=ftp://x", "not an http"), ("m=http://a;colour=red", "unknown option"),
                     ("m=http://a;timeout=-1", "bad value"), ("m=http://a;api_key_env=ZENLM_NO_SUCH_VAR", "not set")):
        with pytest.raises(ValueError, match=why):
            parse_upstream(bad)


def test_client_gone_before_the_first_byte_gives_everything_back(gateway, tmp_path):
    """A stream whose client is gone before its first byte (the server's send fails at once, as
    with ASGI 2.4) never starts relaying: its reservation and its replica's slot are given back."""
    import asyncio as aio

    from zenlm.serve import ServeConfig, build_server
    from zenlm.serve.upstream import parse_upstream

    up = parse_upstream(f"gone={gateway['good'].url}")
    app = build_server(ServeConfig(database=str(tmp_path / "gone.sqlite3")), [up])
    billing = app.app.state.server.billing
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9, replace=True)
    key = billing.create_key("acme", "basic")[0]
    body = json.dumps({"model": "gone", "max_tokens": 3, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent = []

    async def receive():
        if not sent:
            sent.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await aio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    async def run():
        try:
            await app(scope, receive, send)
        except Exception:
            pass
        finally:
            await up.close()

    before = gateway["good"].calls
    aio.run(run())
    assert gateway["good"].calls == before + 1  # the upstream was asked (its first event read) ...
    month = billing.key_month(key[:11])  # ... and nothing is held or charged
    assert month["reserved_micros"] == 0 and month["spent_micros"] == 0
    assert up.in_flight == 0 and up.replicas[0].outstanding == 0
