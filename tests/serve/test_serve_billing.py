"""Keys, budgets and the ledger, on SQLite and on PostgreSQL: exact under concurrency, never double-charged."""
from __future__ import annotations

import csv
import hashlib
import threading
import time

import pytest
from sqlalchemy import select

from zenlm.serve.billing import Billing, Usage, format_micros, price_micros, to_micros
from zenlm.serve.errors import Conflict, IdempotentReplay, InsufficientQuota, InvalidKey, InvalidRequest, RateLimited
from zenlm.serve.store import api_keys, metadata

from .conftest import fresh_postgres, postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "billing.sqlite3")
    return fresh_postgres(postgres_url())


def make(url, **kwargs) -> Billing:
    b = Billing.open(url, **kwargs)
    return b


def test_money_is_integer_micros():
    assert to_micros("2.50") == 2_500_000 and to_micros(3) == 3_000_000 and to_micros("0.000001") == 1
    for bad in (0.1, "1.0000001", "-1", "abc"):
        with pytest.raises(ValueError):
            to_micros(bad)
    assert format_micros(2_500_001) == "2.500001" and format_micros(-5) == "-0.000005"
    assert price_micros(3, 1_000_000) == 3 and price_micros(1, 1) == 1 and price_micros(0, 999) == 0


def test_keys_are_stored_as_hashes_and_checked(url):
    b = make(url)
    b.create_plan("p", {"*": (1, 1)})
    key, record = b.create_key("acme", "p", expires_in_days=1)
    assert key.startswith(record["prefix"]) and len(key) > 40
    with b.engine.connect() as conn:
        row = conn.execute(select(api_keys)).first()
        dump = " ".join(str(v) for t in metadata.sorted_tables for r in conn.execute(select(t)) for v in r)
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in dump
    assert b.authenticate(key).customer == "acme"
    for bad in (None, "", key[:-1] + ("x" if key[-1] != "x" else "y"), "zk-unknown-key-000000"):
        with pytest.raises(InvalidKey):
            b.authenticate(bad)
    b.revoke_key(record["prefix"])
    with pytest.raises(InvalidKey, match="revoked"):
        b.authenticate(key)


def test_parallel_reservations_never_pass_the_budget(url):
    b = make(url)
    # max cost of one request: 10 prompt + 90 completion tokens at 1 micro each = 100 micros; budget 550
    b.create_plan("p", {"*": (1_000_000, 1_000_000)}, monthly_budget_micros=550, requests_per_minute=10_000,
                  tokens_per_minute=10 ** 9)
    ctx = b.authenticate(b.create_key("acme", "p")[0])
    results, errors = [], []
    barrier = threading.Barrier(16)

    def worker(i):
        barrier.wait()
        try:
            results.append(b.reserve(ctx, f"r{i}", "m", 10, 90))
        except InsufficientQuota:
            errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 5 and len(errors) == 11
    assert b.key_month(ctx.prefix)["reserved_micros"] == 500
    charges = [b.settle(res, Usage(10, 20 + i), res.id, "/v1/completions") for i, res in enumerate(results)]
    month = b.key_month(ctx.prefix)
    assert month["reserved_micros"] == 0 and month["spent_micros"] == sum(charges) == sum(30 + i for i in range(5))
    assert sum(r["revenue_micros"] for r in b.ledger()) == sum(charges)


def test_settle_writes_one_row_and_duplicates_are_refused(url):
    b = make(url)
    b.create_plan("p", {"*": (1_000_000, 1_000_000)}, monthly_budget_micros=10_000)
    ctx = b.authenticate(b.create_key("acme", "p")[0])
    lid = b.ledger_id(ctx, "req-1", "retry-me")
    res = b.reserve(ctx, lid, "m", 5, 5)
    with pytest.raises(Conflict):  # the same Idempotency-Key while the first is still running
        b.reserve(ctx, lid, "m", 5, 5)
    assert b.settle(res, Usage(5, 3), "req-1", "/v1/chat/completions", {"id": "x", "usage": {}}) == 8
    assert b.stored_response(lid)["usage"]["cost_micros"] == 8
    # a retry that looked before the first finished, and reserves after: it gets the stored response
    with pytest.raises(IdempotentReplay) as replay:
        b.reserve(ctx, lid, "m", 5, 5)
    assert replay.value.response == b.stored_response(lid)
    assert b.settle(res, Usage(5, 3), "req-1", "/v1/chat/completions") == 0  # settling twice charges nothing
    assert len(b.ledger()) == 1
    assert b.key_month(ctx.prefix)["spent_micros"] == 8 and b.key_month(ctx.prefix)["reserved_micros"] == 0


def test_dead_servers_reservations_are_swept_after_their_lease(url):
    dead = make(url, lease_s=0.2)
    dead.create_plan("p", {"*": (1_000_000, 1_000_000)}, monthly_budget_micros=1000)
    ctx = dead.authenticate(dead.create_key("acme", "p")[0])
    dead.reserve(ctx, "a", "m", 100, 800)
    with pytest.raises(InsufficientQuota):
        dead.reserve(ctx, "b", "m", 100, 800)
    alive = make(url, lease_s=30)
    assert alive.sweep() == 0  # still leased
    time.sleep(0.3)
    assert alive.sweep() == 1
    assert alive.key_month(ctx.prefix)["reserved_micros"] == 0
    alive.reserve(ctx, "b", "m", 100, 800)  # the budget is free again


def test_rate_window_counts_requests_and_tokens(url):
    b = make(url)
    b.create_plan("p", {"*": (0, 0)}, monthly_budget_micros=0, included_tokens=10 ** 6, requests_per_minute=3,
                  tokens_per_minute=100)
    ctx = b.authenticate(b.create_key("acme", "p")[0])
    if int(time.time()) % 60 > 57:  # do not straddle a window boundary
        time.sleep(3)
    a = b.reserve(ctx, "a", "m", 10, 40)
    assert a.headers["x-ratelimit-remaining-tokens"] == "50" and a.free
    b.settle(a, Usage(10, 5), "a", "/v1/completions")  # unused estimate goes back to the window
    b.reserve(ctx, "b", "m", 10, 40)
    with pytest.raises(RateLimited) as e:
        b.reserve(ctx, "c", "m", 10, 60)
    assert e.value.type == "tokens" and e.value.headers["retry-after"]
    b.reserve(ctx, "d", "m", 1, 1)
    with pytest.raises(RateLimited) as e:
        b.reserve(ctx, "e", "m", 1, 1)
    assert e.value.type == "requests"


def test_report_revenue_cost_margin_and_csv(url, tmp_path):
    b = make(url, hardware_micros_per_hour=3_600_000)  # 1 micro per ms
    b.create_plan("p", {"a": (1_000_000, 2_000_000), "*": (3_000_000, 3_000_000)}, monthly_budget_micros=10 ** 6)
    k1 = b.authenticate(b.create_key("acme", "p")[0])
    k2 = b.authenticate(b.create_key("globex", "p")[0])
    for i, (ctx, model, p, c, ms) in enumerate([(k1, "a", 10, 5, 7), (k1, "b", 4, 4, 50), (k2, "a", 1, 1, 2)]):
        b.settle(b.reserve(ctx, f"r{i}", model, p, c), Usage(p, c, 0, ms), f"r{i}", "/v1/completions")
    month = time.strftime("%Y-%m", time.gmtime())
    by_customer = {r["group"]: r for r in b.report(month, "customer")["rows"]}
    assert by_customer["acme"]["revenue_micros"] == (10 + 10) + (12 + 12)
    assert by_customer["acme"]["compute_cost_micros"] == 57
    assert by_customer["acme"]["margin_micros"] == 44 - 57
    by_model = {r["group"]: r for r in b.report(month, "model")["rows"]}
    assert by_model["a"]["requests"] == 2 and by_model["a"]["revenue_micros"] == 20 + 3
    days = b.report(month, "day")
    assert days["total"]["revenue_micros"] == 44 + 3 and len(days["rows"]) == 1
    from zenlm.serve.billing import write_report_csv

    write_report_csv([b.report(month, "customer")], tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[-1]["group"] == "total" and rows[-1]["revenue"] == "0.000047"
    with pytest.raises(ValueError):
        b.report("2026-13")


def test_idempotency_keys_are_compared_whole_and_bounded(tmp_path):
    b = make(str(tmp_path / "b.sqlite3"))
    b.create_plan("p", {"*": (1_000_000, 1_000_000)}, monthly_budget_micros=10_000)
    ctx = b.authenticate(b.create_key("acme", "p")[0])
    shared = "k" * 128
    assert b.ledger_id(ctx, "r1", shared + "a") != b.ledger_id(ctx, "r2", shared + "b")
    assert len(b.ledger_id(ctx, "r1", "x" * 255, "/v1/chat/completions")) <= 200  # fits the ledger's id column
    for bad in ("", "x" * 256):
        with pytest.raises(InvalidRequest, match="1 to 255") as e:
            b.ledger_id(ctx, "r1", bad)
        assert e.value.param == "Idempotency-Key"


# --------------------------------------------------------------------------- idempotency under interleavings
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_billing(request, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("idem") / "b.sqlite3") if request.param == "sqlite" else \
        fresh_postgres(postgres_url())
    b = make(url)
    b.create_plan("p", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 12, requests_per_minute=10 ** 6,
                  tokens_per_minute=10 ** 12)
    return b


# one client request: its Idempotency-Key (None: none) and how it ends once running
request_plan = st.tuples(st.sampled_from([None, "a", "b"]),
                         st.sampled_from(["complete", "disconnect", "disconnect-early", "fail"]),
                         st.integers(1, 9))


@hypothesis.settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(plans=st.lists(request_plan, min_size=1, max_size=8), order=st.randoms(use_true_random=False))
def test_the_ledger_holds_exactly_what_clients_received_in_any_interleaving(shared_billing, plans, order):
    """Requests with shared Idempotency-Keys start and end in a random interleaving; some complete,
    some lose their client after a few tokens (billed for those), some before any (free), some fail.
    Whatever the order, every generation a client received is in the ledger once with the tokens it
    received, a replay is a finished generation of the same key, and the key's spend is the ledger's."""
    b = shared_billing
    ctx = b.authenticate(b.create_key("acme", "p")[0])
    received: dict[str, int] = {}  # generation (request id) -> completion tokens its client received
    finished: dict[str, str] = {}  # request id of a completed generation -> its Idempotency-Key
    running: dict[int, object] = {}
    steps = [(i, "start") for i in range(len(plans))]
    pending = list(steps)
    while pending:
        i, step = pending.pop(order.randrange(len(pending)))
        idem, end, tokens = plans[i]
        rid = f"req-{ctx.key_id}-{i}"
        if step == "start":
            try:
                res, stored = b.begin(ctx, rid, idem, "/v1/completions", "m", 5, 9)
            except Conflict:
                continue  # refused while the first runs: nothing received, nothing charged
            if stored is not None:
                assert finished[stored["id"]] == idem  # the stored result of a finished request, same key
                continue
            running[i] = res
            pending.append((i, "end"))
        else:
            res = running.pop(i)
            if end == "fail":
                b.release(res)
            elif end == "complete":
                b.settle(res, Usage(5, tokens), rid, "/v1/completions", {"id": rid, "usage": {}})
                received[rid], finished[rid] = tokens, idem
            else:
                sent = tokens if end == "disconnect" else 0
                b.settle(res, Usage(5, sent, status="disconnected"), rid, "/v1/completions", None, billable=sent > 0)
                received[rid] = sent
    rows = [r for r in b.ledger() if r["key_id"] == ctx.key_id]
    assert sorted(r["request_id"] for r in rows) == sorted(received)  # one row per generation, no more
    assert {r["request_id"]: r["completion_tokens"] for r in rows} == received
    assert sum(r["revenue_micros"] for r in rows) == sum(5 + 2 * n for n in received.values() if n)
    month = b.key_month(ctx.prefix)
    assert month["spent_micros"] == sum(r["revenue_micros"] for r in rows) and month["reserved_micros"] == 0
