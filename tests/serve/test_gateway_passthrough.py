"""Tool calls and response_format pass through the gateway unchanged: a real zenlm server (tiny
model with room for tool listings) behind the gateway gives, with greedy decoding, the same JSON,
the same tool calls (whole and streamed, assembled by the openai client's helpers) as asked
directly; a streamed tool call retried with its Idempotency-Key is replayed with the call, and
charged once."""
from __future__ import annotations

import json

import pytest

from .conftest import save_tiny, start_server
from .test_serve_structured import ADD

SCHEMA = {"type": "object", "properties": {"word": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
          "required": ["word", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from zenlm.serve.upstream import parse_upstream

    folder = save_tiny(tmp_path_factory.mktemp("models") / "tiny-wide", window=1024)
    backend = start_server(tmp_path_factory.mktemp("backend"), [folder])
    up = parse_upstream(f"wide={backend.url};model=tiny-wide;timeout=30")
    up.api_key = backend.key()  # the gateway's own key at the backend (api_key_env=VAR on the command line)
    gw = start_server(tmp_path_factory.mktemp("gw"), [], upstreams=[up])
    yield backend, gw
    gw.stop()
    backend.stop()


def _clients(pair):
    backend, gw = pair
    key = gw.key()
    return backend.client(backend.key()), gw.client(key), gw, key


def test_response_format_and_tool_calls_pass_through_unchanged(pair):
    direct, through, gw, _ = _clients(pair)
    messages = [{"role": "user", "content": "answer in JSON"}]
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    a = direct.chat.completions.create(model="tiny-wide", messages=messages, response_format=rf, max_tokens=40,
                                       temperature=0)
    b = through.chat.completions.create(model="wide", messages=messages, response_format=rf, max_tokens=40,
                                        temperature=0)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert set(json.loads(b.choices[0].message.content)) == {"word", "n"} and b.model == "wide"

    forced = {"type": "function", "function": {"name": "add"}}
    messages = [{"role": "user", "content": "add 2 and 3"}]
    a = direct.chat.completions.create(model="tiny-wide", messages=messages, tools=[ADD], tool_choice=forced,
                                       max_tokens=60, temperature=0)
    b = through.chat.completions.create(model="wide", messages=messages, tools=[ADD], tool_choice=forced,
                                        max_tokens=60, temperature=0)
    call_a, call_b = a.choices[0].message.tool_calls[0], b.choices[0].message.tool_calls[0]
    assert b.choices[0].finish_reason == "tool_calls"
    assert (call_b.function.name, call_b.function.arguments) == (call_a.function.name, call_a.function.arguments)
    assert b.usage.completion_tokens == a.usage.completion_tokens

    # streamed through the gateway: the client's helpers assemble the same call
    with through.chat.completions.stream(model="wide", messages=messages, tools=[ADD], tool_choice=forced,
                                         max_tokens=60, temperature=0) as stream:
        for _ in stream:
            pass
        done = stream.get_final_completion()
    streamed = done.choices[0].message.tool_calls[0]
    assert (streamed.function.name, streamed.function.arguments) == ("add", call_a.function.arguments)


def test_a_streamed_tool_call_replayed_by_idempotency_key_keeps_the_call(pair):
    _, through, gw, key = _clients(pair)
    forced = {"type": "function", "function": {"name": "add"}}
    calls = []
    for _ in range(2):
        with through.chat.completions.stream(model="wide", messages=[{"role": "user", "content": "add 1 and 1"}],
                                             tools=[ADD], tool_choice=forced, max_tokens=60, temperature=0,
                                             extra_headers={"Idempotency-Key": "tool-once"}) as stream:
            for _ in stream:
                pass
            call = stream.get_final_completion().choices[0].message.tool_calls[0]
        calls.append((call.function.name, call.function.arguments))
    assert calls[0] == calls[1] and calls[0][0] == "add"
    json.loads(calls[0][1])
    rows = [r for r in gw.billing.ledger() if r["model"] == "wide" and r["id"].startswith("idem:")]
    assert len(rows) == 1  # charged once
    assert gw.billing.key_month(key[:11])["spent_micros"] == rows[0]["revenue_micros"]
