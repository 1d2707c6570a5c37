"""Fuzz every route from the served OpenAPI schema (schemathesis), then the bodies a hostile client
tried (issue 22: lone surrogates, content-part lists, oversized chunked bodies, 3,000-prompt
requests): whatever the body, never a 5xx, and every error an OpenAI-style body."""
from __future__ import annotations

import json

import pytest

from .conftest import ADMIN, start_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (test extra)")

try:  # the openai client brings one of the two
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx


def assert_no_5xx(response, what) -> int:
    assert response.status_code < 500, (what, response.text[:500])
    if response.status_code >= 400:  # every error is an OpenAI-style body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    return response.status_code


@pytest.mark.slow
def test_no_route_answers_a_5xx(tmp_path, model_dir, seq2seq_dir):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    running = start_server(tmp_path, [model_dir, seq2seq_dir])
    try:
        key = running.key()
        schema = schemathesis.openapi.from_url(running.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        seen = []
        for operation in operations:
            token = ADMIN if operation.path.startswith("/admin") else key

            @given(case=operation.as_strategy())
            @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=60)
                seen.append(assert_no_5xx(response, (case.method, case.path, case.body)))

            check()
        assert len(seen) >= 5 * len(operations) and any(s == 200 for s in seen) and any(s == 400 for s in seen)

        # ---- the hostile bodies, on one keep-alive connection (a 5xx would also drop it)
        client = httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        bodies = {  # route -> a valid body, and the dotted paths of its text fields
            "/v1/chat/completions": (chat, ["messages.0.content", "messages.0.name", "stop", "model", "user"]),
            "/v1/completions": ({"model": "tiny", "prompt": "hi", "max_tokens": 2}, ["prompt", "suffix", "stop"]),
            "/v1/embeddings": ({"model": "tiny", "input": ["hi", "there"]}, ["input.1", "user"]),
            "/v1/translations": ({"model": "tiny-mt", "input": "hi", "max_tokens": 2},
                                 ["input", "source_language"]),
        }

        def put(body, path, value):
            body = json.loads(json.dumps(body))
            *parents, last = path.split(".")
            target = body
            for p in parents:
                target = target[int(p)] if isinstance(target, list) else target[p]
            if isinstance(target, list):
                target[int(last)] = value
            else:
                target[last] = value
            return body

        @given(route=st.sampled_from(sorted(bodies)), data=st.data(),
               text=st.text(st.characters(categories=["Cs", "L", "N", "Zs"]), min_size=1, max_size=12)
               # a high surrogate followed by a low one is a valid pair once JSON is decoded (U+10000 and up):
               # the text must keep a lone one through json.loads
               .filter(lambda t: any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(json.dumps(t)))))
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def lone_surrogates(route, data, text):
            body, fields = bodies[route]
            field = data.draw(st.sampled_from(fields))
            raw = json.dumps(put(body, field, text)).encode()  # ensure_ascii: "\udXXX" escapes on the wire
            response = client.post(route, content=raw, headers={"content-type": "application/json"})
            assert assert_no_5xx(response, (route, field, raw)) == 400
            error = response.json()["error"]
            assert field.startswith(error["param"])  # named; pydantic's own string check may answer first
            assert "surrogate" in error["message"] or "unicode" in error["message"]

        lone_surrogates()

        parts = [[{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                 [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], [], [{"type": "text"}],
                 [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], [{"text": "no type"}],
                 [{"type": "text", "text": "\ud800"}], "plain", [{"type": "text", "text": 5}]]
        for content in parts:
            body = {**chat, "messages": [{"role": "user", "content": content}]}
            raw = json.dumps(body).encode()  # ensure_ascii: a surrogate goes as its "\ud800" escape
            status = assert_no_5xx(client.post("/v1/chat/completions", content=raw,
                                               headers={"content-type": "application/json"}), content)
            assert status == (200 if content in (parts[0], "plain") else 400), content

        def chunked(data: bytes):
            for i in range(0, len(data), 1 << 16):
                yield data[i:i + 1 << 16]

        big = json.dumps({"model": "tiny", "input": "x " * 600_000}).encode()
        for route in ("/v1/embeddings", "/v1/chat/completions", "/admin/plans"):
            response = httpx.post(running.url + route, content=chunked(big), timeout=60,
                                  headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
            assert assert_no_5xx(response, route) == 413

        many = ["hello"] * 3000
        for route, body in (("/v1/completions", {"model": "tiny", "prompt": many, "max_tokens": 1}),
                            ("/v1/completions", {"model": "tiny", "prompt": [[5, 6]] * 3000, "max_tokens": 1}),
                            ("/v1/embeddings", {"model": "tiny", "input": many}),
                            ("/v1/translations", {"model": "tiny-mt", "input": many, "max_tokens": 1})):
            assert assert_no_5xx(client.post(route, json=body), route) == 400
        assert client.post("/v1/chat/completions", json=chat).status_code == 200  # the connection still serves
        client.close()
    finally:
        running.stop()
