"""Fuzz every route from the served OpenAPI schema (schemathesis): whatever the body, never a 5xx."""
from __future__ import annotations

import pytest

from .conftest import ADMIN, start_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (test extra)")


@pytest.mark.slow
def test_no_route_answers_a_5xx(tmp_path, model_dir, seq2seq_dir):
    from hypothesis import HealthCheck, given, settings

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
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
                if response.status_code >= 400:  # every error is an OpenAI-style body
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
        assert len(seen) >= 5 * len(operations) and any(s == 200 for s in seen) and any(s == 400 for s in seen)
    finally:
        running.stop()
