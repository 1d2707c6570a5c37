"""Two gateway processes (`zenlm serve --upstream`) sharing one PostgreSQL ledger in front of one
upstream: a key's monthly budget holds across both while they are flooded at once. Every answered
request has its one ledger row, what the key spent is the ledger's revenue and never more than the
budget, refusals are 429 insufficient_quota, and nothing stays reserved."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from .conftest import fresh_postgres, free_port, postgres_url, wait_healthy
from .test_serve_upstream import PROMPT_TOKENS, Fake

BUDGET = 300  # micros; a request reserves ~32 (its prompt bound + 4 tokens) and is charged 7 + 4 = 11


def test_two_gateways_on_one_postgres_keep_one_budget(tmp_path):
    import openai

    from zenlm.serve.billing import Billing

    url = fresh_postgres(postgres_url())
    billing = Billing.open(url)
    billing.create_plan("tight", {"*": (1_000_000, 1_000_000)}, monthly_budget_micros=BUDGET,
                        requests_per_minute=100_000, tokens_per_minute=10 ** 9, replace=True)
    key = billing.create_key("acme", "tight")[0]
    up = Fake()
    gateways = []
    try:
        for _ in range(2):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", "--port", str(port), "--database",
                                     url, "--upstream", f"remote={up.url};timeout=20"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
            gateways.append((proc, port))
        for proc, port in gateways:
            wait_healthy(proc, port)
        outcomes, lock = [], threading.Lock()

        def flood(port: int) -> None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30)
            for _ in range(8):
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="remote", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
                    got = ("ok", port, raw.headers["x-request-id"], raw.parse().usage.completion_tokens)
                except openai.RateLimitError as e:
                    got = ("refused", port, e.code, None)
                with lock:
                    outcomes.append(got)

        threads = [threading.Thread(target=flood, args=(port,)) for _, port in gateways for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(outcomes) == 64
        answered = [o for o in outcomes if o[0] == "ok"]
        refused = [o for o in outcomes if o[0] == "refused"]
        assert refused and all(o[2] == "insufficient_quota" for o in refused)  # the budget ran out ...
        assert {o[1] for o in answered} == {port for _, port in gateways}  # ... after both gateways sold some
        rows = billing.ledger()
        assert sorted(r["request_id"] for r in rows) == sorted(o[2] for o in answered)  # one row per answer
        assert all(r["revenue_micros"] == PROMPT_TOKENS + 4 for r in rows)
        month = billing.key_month(key[:11])
        assert month["spent_micros"] == sum(r["revenue_micros"] for r in rows) <= BUDGET
        assert month["reserved_micros"] == 0
        assert up.calls == len(answered)  # a refused request never reached the upstream
    finally:
        for proc, _ in gateways:
            proc.terminate()
            proc.wait(timeout=20)
        up.stop()
        billing.engine.dispose()
        fresh_postgres(url)
