"""What a hostile client tried (issue 22), each answered as OpenAI would and never with free tokens:
retries of unfinished requests are billed, invalid Unicode is a 400 that keeps the connection,
one request cannot fill the queue, the key is checked first, chunked bodies are bounded, text
content parts are read, and Idempotency-Keys are compared whole."""
from __future__ import annotations

import json
import socket
import time

import pytest

from .conftest import ADMIN, start_server
from .test_serve_api import assert_error, httpx, post

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


def slowed(running, seconds: float):
    """Make every decoding step of the `tiny` engine take at least ``seconds``; returns the undo."""
    engine = running.app.app.state.server.catalog.get("tiny").engine
    original = engine.on_step
    engine.on_step = lambda rows, dt: (original(rows, dt), time.sleep(seconds))
    return lambda: setattr(engine, "on_step", original)


def rows_of(running, key: str) -> list[dict]:
    key_id = running.billing.authenticate(key).key_id
    return [r for r in running.billing.ledger() if r["key_id"] == key_id]


def runs_full_length(running, body: dict) -> dict:
    """``body`` with a seed whose reply runs to max_tokens (a random model may otherwise stop early)."""
    seed = next(s for s in range(50) if post(running, "/chat/completions", {**body, "seed": s}, running.key())
                .json()["choices"][0]["finish_reason"] == "length")
    return {**body, "seed": seed}


def wait_for(predicate, timeout: float = 10):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- 1. idempotency
def test_a_retry_after_an_unfinished_request_is_billed_as_a_new_one(running):
    key = running.key()
    h = {"Authorization": f"Bearer {key}", "Idempotency-Key": "cut-short"}
    body = runs_full_length(running, {**CHAT, "max_tokens": 40, "temperature": 1.0})
    undo = slowed(running, 0.02)
    try:
        with httpx.stream("POST", running.base_url + "/chat/completions", json={**body, "stream": True},
                          headers=h) as first:
            lines = first.iter_lines()
            for _ in range(3):
                next(lines)
            # while the first still runs, the same key is refused, not run alongside
            assert_error(post(running, "/chat/completions", body, key, headers=h), 409, code="idempotency_conflict")
    finally:
        undo()
    wait_for(lambda: len(rows_of(running, key)) == 1)  # the cut stream settled
    assert rows_of(running, key)[0]["status"] == "disconnected"
    spent = running.billing.key_month(key[:11])["spent_micros"]
    retry = post(running, "/chat/completions", body, key, headers=h)
    assert retry.status_code == 200, retry.text
    cost = retry.json()["usage"]["cost_micros"]
    assert cost == retry.json()["usage"]["prompt_tokens"] + 2 * retry.json()["usage"]["completion_tokens"] > 0
    assert running.billing.key_month(key[:11])["spent_micros"] == spent + cost
    assert [r["status"] for r in rows_of(running, key)] == ["disconnected", "completed"]
    # the finished retry is what every later retry gets back, for nothing
    again = post(running, "/chat/completions", body, key, headers=h)
    assert again.json() == retry.json() and len(rows_of(running, key)) == 2


def test_a_non_streaming_client_that_hangs_up_cannot_retry_for_free(running):
    key = running.key()
    h = {"Authorization": f"Bearer {key}", "Idempotency-Key": "hung-up"}
    body = runs_full_length(running, {**CHAT, "max_tokens": 40, "temperature": 1.0})
    undo = slowed(running, 0.05)
    try:
        with pytest.raises(httpx.HTTPError):  # a read timeout: the client leaves (the server logs a 499)
            httpx.post(running.base_url + "/chat/completions", json=body, headers=h, timeout=0.5)
        wait_for(lambda: len(rows_of(running, key)) == 1)
    finally:
        undo()
    assert rows_of(running, key)[0]["revenue_micros"] == 0  # it received nothing and pays nothing
    retry = post(running, "/chat/completions", body, key, headers=h)
    assert retry.status_code == 200 and retry.json()["usage"]["cost_micros"] > 0
    completed = [r for r in rows_of(running, key) if r["status"] == "completed"]
    assert len(completed) == 1 and completed[0]["revenue_micros"] == retry.json()["usage"]["cost_micros"]


# --------------------------------------------------------------------------- 7. the whole key
def test_idempotency_keys_are_compared_whole_and_limited_to_255_characters(running):
    key = running.key()
    body = {**CHAT, "temperature": 1.0}
    a = post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "k" * 128 + "a"})
    b = post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "k" * 128 + "b"})
    assert a.status_code == b.status_code == 200 and a.json()["id"] != b.json()["id"]
    assert len(rows_of(running, key)) == 2
    assert post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "x" * 255}).status_code == 200
    err = assert_error(post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "x" * 256}), 400)
    assert err["param"] == "Idempotency-Key" and "256" in err["message"] and "255" in err["message"]


# --------------------------------------------------------------------------- 2. lone surrogates
def raw_exchange(sock: socket.socket, port: int, path: str, body: bytes, key: str) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request on an open keep-alive socket; (status, headers, body)."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800abc"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800abc", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfffabc"], "max_tokens": 2}', "prompt"),
    ("/v1/embeddings", '{"model": "tiny", "input": "\\ud800abc"}', "input"),
    ("/v1/embeddings", '{"model": "tiny", "input": ["a", "\\ud800"]}', "input"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_and_the_connection_stays_open(running, path, body, param):
    key = running.key()
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        status, headers, reply = raw_exchange(sock, port, path, body.encode(), key)
        assert status == 400, reply
        err = json.loads(reply)["error"]
        assert err["param"] == param and "surrogate" in err["message"] and err["type"] == "invalid_request_error"
        assert headers.get("connection") != "close"
        ok = json.dumps({**CHAT, "max_tokens": 1}).encode()  # the same connection answers the next request
        assert raw_exchange(sock, port, "/v1/chat/completions", ok, key)[0] == 200
    assert len(rows_of(running, key)) == 1  # the refused request left no row


# --------------------------------------------------------------------------- 6. content parts
def test_chat_content_may_be_a_list_of_text_parts(running):
    key = running.key()
    whole = post(running, "/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello world"}]}, key)
    parts = post(running, "/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]}, key)
    assert parts.status_code == 200, parts.text
    assert parts.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]
    assert parts.json()["usage"]["prompt_tokens"] == whole.json()["usage"]["prompt_tokens"]
    image = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    err = assert_error(post(running, "/chat/completions", {**CHAT, "messages": [image]}, key), 400)
    assert "this model takes text only" in err["message"] and err["param"] == "messages.0.content"


# --------------------------------------------------------------------------- 4. the key first
def test_a_wrong_key_is_a_401_whatever_is_wrong_with_the_body(running):
    bad_bodies = [{"model": "tiny", "messages": "not a list"}, {"model": "tiny", "prompt": []}, {}]
    for path, body in zip(("/chat/completions", "/completions", "/embeddings"), bad_bodies):
        for key in (None, "zk-not-a-key"):
            assert_error(post(running, path, body, key), 401, code="invalid_api_key")
        assert_error(post(running, path, body, running.key()), 400)
    assert_error(post(running, "/chat/completions", raw=b"{not json", key="zk-wrong"), 401, code="invalid_api_key")
    assert_error(httpx.post(running.url + "/admin/plans", json={"name": 5}, headers={"Authorization": "Bearer x"}), 401)
    assert_error(httpx.post(running.url + "/admin/plans", json={"name": 5},
                            headers={"Authorization": f"Bearer {ADMIN}"}), 400)


def test_listing_models_needs_a_key(running):
    for path in ("/models", "/models/tiny"):
        assert_error(httpx.get(running.base_url + path), 401, code="invalid_api_key")
        assert_error(httpx.get(running.base_url + path, headers={"Authorization": "Bearer zk-nope"}), 401)
    listed = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {running.key()}"})
    assert [m["id"] for m in listed.json()["data"]] == ["tiny", "tiny-mt"]


# --------------------------------------------------------------------------- 5. chunked bodies
def test_a_chunked_body_over_the_limit_is_a_413(running):
    key = running.key()
    h = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()

    def chunks(data: bytes):  # a generator body has no length: httpx sends it chunked
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    err = assert_error(httpx.post(running.base_url + "/chat/completions", content=chunks(big), headers=h), 413)
    assert "1,000,000" in err["message"]
    small = json.dumps({**CHAT, "max_tokens": 1}).encode()
    ok = httpx.post(running.base_url + "/chat/completions", content=chunks(small), headers=h)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


# --------------------------------------------------------------------------- 3. floods
def test_one_request_cannot_flood_the_queue(running):
    key = running.key()
    err = assert_error(post(running, "/completions", {"model": "tiny", "prompt": ["hi"] * 3000, "max_tokens": 1},
                            key), 400)
    assert "3000" in err["message"] and "128" in err["message"] and err["param"] == "prompt"
    err = assert_error(post(running, "/completions", {"model": "tiny", "prompt": ["hi"] * 20, "n": 8,
                                                      "max_tokens": 1}, key), 400)
    assert "160" in err["message"] and "128" in err["message"]
    assert_error(post(running, "/embeddings", {"model": "tiny", "input": ["hi"] * 2049}, key), 400)
    assert_error(post(running, "/translations", {"model": "tiny-mt", "input": ["hi"] * 129}, key), 400)
    assert not rows_of(running, key) and running.billing.key_month(key[:11])["reserved_micros"] == 0


def test_a_request_that_does_not_fit_is_refused_whole_and_uncharged_and_keys_share(tmp_path, model_dir):
    """max_batch_size 2 + max_queue 4: the engine holds 6 sequences, one key at most 4."""
    small = start_server(tmp_path, [model_dir], max_batch_size=2, max_queue=4)
    try:
        a, b = small.key(customer="a"), small.key(customer="b")
        engine = small.app.app.state.server.catalog.get("tiny").engine
        undo = slowed(small, 0.03)
        # greedy from "hi" runs to max_tokens on the test model (no early stop token)
        flood = {"model": "tiny", "prompt": ["hi"] * 4, "max_tokens": 60, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", small.base_url + "/completions", json=flood,
                              headers={"Authorization": f"Bearer {a}"}) as stream:
                lines = stream.iter_lines()  # held: a dropped iterator closes the stream
                next(lines)
                wait_for(lambda: engine.batch_size == 2)
                more = post(small, "/completions", {**flood, "prompt": "hi", "stream": False}, a)
                assert "at most 4" in assert_error(more, 429, "requests", "rate_limit_exceeded")["message"]
                whole = post(small, "/completions", {**flood, "prompt": ["x"] * 3, "stream": False}, b)
                assert "capacity" in assert_error(whole, 503, "server_error")["message"]
                assert engine.queue_depth == 2  # nothing of the refused requests was queued
                assert not rows_of(small, b) and small.billing.key_month(b[:11])["reserved_micros"] == 0
                fits = post(small, "/completions", {**flood, "prompt": ["x"] * 2, "max_tokens": 2,
                                                     "stream": False}, b)
                assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
        finally:
            undo()
    finally:
        small.stop()
