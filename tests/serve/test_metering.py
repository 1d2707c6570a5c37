"""The metering path from a route whose run is a remote call (the shape of the gateway to come): an
async iterator of token deltas and, at its end, the usage the remote reports. Answered whole or
streamed, the ledger holds one row with the remote's usage; a retry with the Idempotency-Key
gets the stored answer; a run that fails before it delivered gives its reservation back; a
stream cut short pays for the tokens it sent."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from zenlm.serve.billing import Billing, Usage
from zenlm.serve.catalog import ModelCatalog
from zenlm.serve.metering import Meter, Outcome
from zenlm.serve.metrics import Metrics
from zenlm.serve.middleware import Gate

try:  # the openai client brings one of the two
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROUTE, MODEL, PROMPT_TOKENS = "/v1/relay", "remote/model", 3


@dataclass
class Delta:
    text: str


@dataclass
class RemoteUsage:
    prompt_tokens: int
    completion_tokens: int


async def remote(words: int, fail_after: int | None = None):
    """A stand-in for another engine's stream: one delta per token, then its usage."""
    for i in range(words):
        if i == fail_after:
            raise ConnectionError("the remote engine went away")
        await asyncio.sleep(0)
        yield Delta(f"w{i} ")
    yield RemoteUsage(PROMPT_TOKENS, words)


def relay_app(billing: Billing):
    metrics = Metrics(ModelCatalog())
    meter = Meter(billing, metrics)
    app = FastAPI()

    @app.post(ROUTE)
    async def relay(request: Request, words: int = 4, stream: bool = False, fail_after: int | None = None):
        key = await meter.authenticate(request)
        ticket = await meter.reserve(request, key, ROUTE, MODEL, PROMPT_TOKENS, words)
        if not stream:
            async def run() -> Outcome:
                text, usage = "", None
                async for item in remote(words, fail_after):
                    if isinstance(item, Delta):
                        text += item.text
                    else:
                        usage = item
                return Outcome(Usage(usage.prompt_tokens, usage.completion_tokens),
                               {"text": text, "usage": {"prompt_tokens": usage.prompt_tokens,
                                                        "completion_tokens": usage.completion_tokens}})
            return await meter.answer(ticket, run)

        async def events():
            sent = 0
            with ticket.streaming(lambda: Usage(PROMPT_TOKENS, sent, status="disconnected")):
                async for item in remote(words, fail_after):
                    if isinstance(item, Delta):
                        yield f"data: {item.text}\n\n"
                        sent += 1
                    else:
                        usage = item
                cost = await ticket.settle(Usage(usage.prompt_tokens, usage.completion_tokens),
                                           {"usage": {"completion_tokens": usage.completion_tokens}})
                yield f"data: cost {cost}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=ticket.headers)

    return Gate(app, metrics, 100_000)


@pytest.fixture
def relay(tmp_path):
    billing = Billing.open(str(tmp_path / "relay.sqlite3"))
    billing.create_plan("p", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9)  # 1 and 2 micros a token
    key, record = billing.create_key("acme", "p")
    transport = httpx.ASGITransport(app=relay_app(billing), raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://relay",
                               headers={"Authorization": f"Bearer {key}"})
    return billing, client, record["prefix"]


def test_a_remote_answer_is_settled_once_and_replayed(relay):
    billing, client, prefix = relay

    async def go():
        headers = {"Idempotency-Key": "once"}
        first = await client.post(ROUTE, params={"words": 4}, headers=headers)
        again = await client.post(ROUTE, params={"words": 4}, headers=headers)
        return first, again

    first, again = asyncio.run(go())
    assert first.status_code == 200 and first.json()["text"] == "w0 w1 w2 w3 "
    assert first.json()["usage"]["cost_micros"] == PROMPT_TOKENS * 1 + 4 * 2
    assert "x-ratelimit-limit-requests" in first.headers
    assert again.json() == first.json()
    rows = billing.ledger()
    assert [(r["route"], r["model"], r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (ROUTE, MODEL, PROMPT_TOKENS, 4, "completed")]
    month = billing.key_month(prefix)
    assert month["reserved_micros"] == 0 and month["spent_micros"] == 11


def test_a_remote_stream_settles_before_its_last_chunk(relay):
    billing, client, prefix = relay
    response = asyncio.run(client.post(ROUTE, params={"words": 5, "stream": True}))
    chunks = [line[6:] for line in response.text.split("\n\n") if line]
    assert chunks[:5] == [f"w{i} " for i in range(5)] and chunks[-1] == f"cost {PROMPT_TOKENS + 5 * 2}"
    (row,) = billing.ledger()
    assert row["completion_tokens"] == 5 and row["status"] == "completed" and row["revenue_micros"] == 13


def test_a_failed_remote_gives_the_reservation_back(relay):
    billing, client, prefix = relay
    response = asyncio.run(client.post(ROUTE, params={"words": 4, "fail_after": 2}))
    assert response.status_code == 500
    assert billing.ledger() == []
    assert billing.key_month(prefix)["reserved_micros"] == 0


def test_a_stream_cut_short_pays_for_what_it_sent(relay):
    billing, client, prefix = relay
    asyncio.run(client.post(ROUTE, params={"words": 6, "stream": True, "fail_after": 2}))
    deadline = time.time() + 10
    while not billing.ledger() and time.time() < deadline:  # written by a thread of its own
        time.sleep(0.02)
    (row,) = billing.ledger()
    assert row["status"] == "disconnected" and row["completion_tokens"] == 2
    assert row["revenue_micros"] == PROMPT_TOKENS + 2 * 2
    assert billing.key_month(prefix)["reserved_micros"] == 0
