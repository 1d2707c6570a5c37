"""Schema migration: a ledger database made by the zenlm before the gateway (no ``counted`` and
``upstream`` columns) is brought up to date when a server opens it, on SQLite and PostgreSQL. The
old database is made by the old DDL verbatim (as SQLAlchemy emitted it for store.py at 978a454^),
with a customer, a plan, a key and a ledger row in it, so the test sees what an operator's
upgrade sees: old rows kept, the old key still working, new rows written with the new columns."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from .conftest import fresh_postgres, postgres_url

OLD_DDL = """
CREATE TABLE customers (
    id {serial} NOT NULL, name VARCHAR(128) NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE plans (
    id {serial} NOT NULL, name VARCHAR(64) NOT NULL, included_tokens BIGINT NOT NULL,
    monthly_budget_micros BIGINT NOT NULL, requests_per_minute INTEGER NOT NULL, tokens_per_minute BIGINT NOT NULL,
    created_at BIGINT NOT NULL, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE api_keys (
    id {serial} NOT NULL, prefix VARCHAR(32) NOT NULL, key_hash VARCHAR(64) NOT NULL, customer_id INTEGER NOT NULL,
    plan_id INTEGER NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT, revoked_at BIGINT,
    PRIMARY KEY (id), UNIQUE (prefix), FOREIGN KEY(customer_id) REFERENCES customers (id),
    FOREIGN KEY(plan_id) REFERENCES plans (id));
CREATE TABLE plan_prices (
    plan_id INTEGER NOT NULL, model VARCHAR(128) NOT NULL, prompt_micros_per_million BIGINT NOT NULL,
    completion_micros_per_million BIGINT NOT NULL, PRIMARY KEY (plan_id, model),
    FOREIGN KEY(plan_id) REFERENCES plans (id) ON DELETE CASCADE);
CREATE TABLE key_months (
    key_id INTEGER NOT NULL, month VARCHAR(7) NOT NULL, spent_micros BIGINT NOT NULL,
    reserved_micros BIGINT NOT NULL, free_tokens_used BIGINT NOT NULL, free_tokens_reserved BIGINT NOT NULL,
    tokens_used BIGINT NOT NULL, PRIMARY KEY (key_id, month), FOREIGN KEY(key_id) REFERENCES api_keys (id));
CREATE TABLE rate_windows (
    key_id INTEGER NOT NULL, "window" BIGINT NOT NULL, requests INTEGER NOT NULL, tokens BIGINT NOT NULL,
    PRIMARY KEY (key_id, "window"), FOREIGN KEY(key_id) REFERENCES api_keys (id));
CREATE TABLE reservations (
    id VARCHAR(200) NOT NULL, key_id INTEGER NOT NULL, month VARCHAR(7) NOT NULL, "window" BIGINT NOT NULL,
    estimate_tokens BIGINT NOT NULL, reserved_micros BIGINT NOT NULL, reserved_free_tokens BIGINT NOT NULL,
    free BOOLEAN NOT NULL, instance_id VARCHAR(64) NOT NULL, lease_until FLOAT NOT NULL, created_at FLOAT NOT NULL,
    PRIMARY KEY (id), FOREIGN KEY(key_id) REFERENCES api_keys (id));
CREATE INDEX ix_reservations_lease ON reservations (lease_until);
CREATE TABLE usage_ledger (
    id VARCHAR(200) NOT NULL, request_id VARCHAR(64) NOT NULL, key_id INTEGER NOT NULL, customer_id INTEGER NOT NULL,
    model VARCHAR(128) NOT NULL, route VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, queue_ms BIGINT NOT NULL,
    compute_ms BIGINT NOT NULL, revenue_micros BIGINT NOT NULL, compute_cost_micros BIGINT NOT NULL,
    created_at FLOAT NOT NULL, day VARCHAR(10) NOT NULL, month VARCHAR(7) NOT NULL, response TEXT,
    PRIMARY KEY (id), FOREIGN KEY(key_id) REFERENCES api_keys (id), FOREIGN KEY(customer_id) REFERENCES customers (id));
CREATE INDEX ix_usage_month ON usage_ledger (month, customer_id);
"""
KEY = "zk-oldkey01" + "x" * 40  # prefix: "zk-" and 8 characters, as billing.create_key makes them


def _old_database(url: str) -> None:
    """The pre-gateway schema with one customer, plan, key and ledger row, written by plain SQL."""
    from sqlalchemy import create_engine

    from zenlm.serve.billing import day_of, month_of
    from zenlm.serve.store import database_url

    engine = create_engine(database_url(url))
    serial = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    now = time.time()
    with engine.begin() as conn:
        for statement in OLD_DDL.format(serial=serial).split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO customers (name, created_at) VALUES ('acme', 1)")
        conn.exec_driver_sql("INSERT INTO plans (name, included_tokens, monthly_budget_micros, requests_per_minute, "
                             "tokens_per_minute, created_at) VALUES ('basic', 0, 1000000000, 1000, 1000000, 1)")
        conn.exec_driver_sql("INSERT INTO plan_prices VALUES (1, '*', 1000000, 2000000)")
        conn.exec_driver_sql(f"INSERT INTO api_keys (prefix, key_hash, customer_id, plan_id, created_at) VALUES "
                             f"('{KEY[:11]}', '{hashlib.sha256(KEY.encode()).hexdigest()}', 1, 1, 1)")
        conn.exec_driver_sql(
            "INSERT INTO usage_ledger VALUES ('old-1', 'req-old', 1, 1, 'tiny', '/v1/completions', 'completed', "
            f"5, 3, 0, 12, 11, 0, {now}, '{day_of(now)}', '{month_of(now)}', NULL)")
    engine.dispose()


def _columns(url: str) -> list[str]:
    from sqlalchemy import create_engine, inspect

    from zenlm.serve.store import database_url

    engine = create_engine(database_url(url))
    try:
        return [c["name"] for c in inspect(engine).get_columns("usage_ledger")]
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request, tmp_path):
    if request.param == "sqlite":
        url = str(tmp_path / "old.sqlite3")
    else:
        url = fresh_postgres(postgres_url())
    _old_database(url)
    yield url
    if request.param == "postgresql":
        fresh_postgres(url)


def test_an_old_ledger_gains_the_gateway_columns_and_keeps_its_rows(old_url):
    from zenlm.serve.billing import Billing, Usage, month_of

    assert "counted" not in _columns(old_url)  # the old DDL really is the old schema
    # servers starting together on one old database: each adds what is missing, none fails
    errors = []

    def open_one():
        try:
            Billing.open(old_url).engine.dispose()
        except Exception as e:  # pragma: no cover - the failure is the assertion below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    columns = _columns(old_url)
    assert columns.count("counted") == 1 and columns.count("upstream") == 1

    billing = Billing.open(old_url)  # once more: nothing left to add
    try:
        old = [r for r in billing.ledger() if r["id"] == "old-1"]
        assert len(old) == 1 and (old[0]["prompt_tokens"], old[0]["revenue_micros"]) == (5, 11)
        assert old[0]["counted"] is None and old[0]["upstream"] is None

        key = billing.authenticate(KEY)  # the old key, plan and prices still work
        ledger_id = billing.ledger_id(key, "req-new", None, "/v1/chat/completions")
        res = billing.reserve(key, ledger_id, "remote", 10, 10)
        cost = billing.settle(res, Usage(4, 6, 0, 9, counted="local-tokenizer", upstream="remote http://h:1"),
                              "req-new", "/v1/chat/completions")
        assert cost == 4 * 1 + 6 * 2
        new = [r for r in billing.ledger() if r["request_id"] == "req-new"]
        assert len(new) == 1 and (new[0]["counted"], new[0]["upstream"]) == ("local-tokenizer", "remote http://h:1")
        groups = {r["group"]: r for r in billing.report(month_of(time.time()), "upstream")["rows"]}
        assert set(groups) == {"local", "remote http://h:1"}
        assert billing.key_month(KEY[:11])["spent_micros"] == cost
    finally:
        billing.engine.dispose()
