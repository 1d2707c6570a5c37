"""Where keys, plans, limits and the usage ledger live: SQLAlchemy tables over one database.

An SQLite file by default (WAL journal, writers serialised with ``BEGIN IMMEDIATE`` so a
conditional update never races), or PostgreSQL through a ``postgresql://`` URL for several
server processes or machines sharing keys, budgets and the ledger. Money columns are integers
in micro-units; times are Unix seconds.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table,
                        Text, create_engine, event)
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("zenlm.serve.store")
DEFAULT_DATABASE = "zenlm.sqlite3"
DATABASE_ENV = "ZENLM_DATABASE_URL"

metadata = MetaData()

customers = Table(
    "customers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
)

plans = Table(
    "plans", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("included_tokens", BigInteger, nullable=False, default=0),
    Column("monthly_budget_micros", BigInteger, nullable=False, default=0),
    Column("requests_per_minute", Integer, nullable=False),
    Column("tokens_per_minute", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

plan_prices = Table(
    "plan_prices", metadata,
    Column("plan_id", Integer, ForeignKey("plans.id", ondelete="CASCADE"), primary_key=True),
    Column("model", String(128), primary_key=True),  # '*' = any model not listed
    Column("prompt_micros_per_million", BigInteger, nullable=False),
    Column("completion_micros_per_million", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prefix", String(32), nullable=False, unique=True),  # shown in lists; the key's first characters
    Column("key_hash", String(64), nullable=False),  # sha256 of the whole key; the key itself is never stored
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=False),
    Column("plan_id", Integer, ForeignKey("plans.id"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
)

# one row per request, written once: the primary key is the request id or the client's Idempotency-Key
usage_ledger = Table(
    "usage_ledger", metadata,
    Column("id", String(200), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=False),
    Column("model", String(128), nullable=False),
    Column("route", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # completed | disconnected
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("queue_ms", BigInteger, nullable=False),
    Column("compute_ms", BigInteger, nullable=False),
    Column("revenue_micros", BigInteger, nullable=False),  # what the customer is billed
    Column("compute_cost_micros", BigInteger, nullable=False),  # the hardware time it took, priced
    Column("created_at", Float, nullable=False),
    Column("day", String(10), nullable=False),
    Column("month", String(7), nullable=False),
    Column("response", Text, nullable=True),  # the response body, returned again to a retry
    # added for the gateway (upstream.py); open_database adds them to an older ledger
    Column("counted", String(32), nullable=True),  # None: usage as reported; else how zenlm counted it
    Column("upstream", String(300), nullable=True),  # "NAME URL" of the upstream replica; None: this process
)
ADDED_COLUMNS = {"usage_ledger": ("counted", "upstream")}
Index("ix_usage_month", usage_ledger.c.month, usage_ledger.c.customer_id)

# money and tokens a key has spent and holds reserved this month
key_months = Table(
    "key_months", metadata,
    Column("key_id", Integer, ForeignKey("api_keys.id"), primary_key=True),
    Column("month", String(7), primary_key=True),
    Column("spent_micros", BigInteger, nullable=False, default=0),
    Column("reserved_micros", BigInteger, nullable=False, default=0),
    Column("free_tokens_used", BigInteger, nullable=False, default=0),
    Column("free_tokens_reserved", BigInteger, nullable=False, default=0),
    Column("tokens_used", BigInteger, nullable=False, default=0),
)

# in-flight requests: what each holds, until settled, released, or its lease runs out (a dead server)
reservations = Table(
    "reservations", metadata,
    Column("id", String(200), primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("month", String(7), nullable=False),
    Column("window", BigInteger, nullable=False),
    Column("estimate_tokens", BigInteger, nullable=False),
    Column("reserved_micros", BigInteger, nullable=False),
    Column("reserved_free_tokens", BigInteger, nullable=False),
    Column("free", Boolean, nullable=False),
    Column("instance_id", String(64), nullable=False),
    Column("lease_until", Float, nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("ix_reservations_lease", reservations.c.lease_until)

# fixed one-minute windows for requests/min and tokens/min, shared by every server process
rate_windows = Table(
    "rate_windows", metadata,
    Column("key_id", Integer, ForeignKey("api_keys.id"), primary_key=True),
    Column("window", BigInteger, primary_key=True),
    Column("requests", Integer, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),
)


def database_url(url: Optional[str] = None) -> str:
    """The URL to use: the one given, else $ZENLM_DATABASE_URL, else an SQLite file in the current folder.
    A bare path is taken as an SQLite file."""
    url = url or os.environ.get(DATABASE_ENV) or DEFAULT_DATABASE
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3 is the driver we install
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if not url.startswith(("sqlite", "postgresql")):
        raise ValueError(f"database URL {url!r} is not supported; use an SQLite path or postgresql://user:pass@host/db")
    return url


def open_database(url: Optional[str] = None, create: bool = True) -> Engine:
    """An engine for the URL with the schema in place."""
    url = database_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_settings(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            # take the write lock up front: two readers upgrading to writers would deadlock
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        try:
            engine = create_engine(url, pool_size=10, max_overflow=30, pool_recycle=600)
        except ModuleNotFoundError as e:
            raise ValueError(f"PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]' ({e})") from None
    if create:
        try:
            metadata.create_all(engine)
            _add_columns(engine)
        except Exception as e:  # a wrong host, password or database name: one line, not a traceback
            from sqlalchemy.exc import OperationalError

            if isinstance(e, OperationalError):
                raise ValueError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: "
                                 f"{str(e.orig).strip().splitlines()[0]}") from None
            raise
    return engine


def _add_columns(engine: Engine) -> None:
    """Columns added since a table was first created, added to a database an older zenlm made
    (additive and nullable: ``ALTER TABLE ... ADD COLUMN``; old rows read them as NULL). Servers
    starting together may race: PostgreSQL says ``IF NOT EXISTS``; on SQLite, whose ALTER has no
    such clause, a failure is one only if the column is still missing afterwards."""
    from sqlalchemy import inspect

    inspector = inspect(engine)
    postgres = engine.dialect.name == "postgresql"
    for table_name, names in ADDED_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table_name)}
        table = metadata.tables[table_name]
        for name in names:
            if name in have:
                continue
            kind = table.c[name].type.compile(dialect=engine.dialect)
            clause = "IF NOT EXISTS " if postgres else ""
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {clause}{name} {kind}")
            except Exception:  # another process added it meanwhile
                if name not in {c["name"] for c in inspect(engine).get_columns(table_name)}:
                    raise
            log.info("database: added column %s.%s (%s) to a ledger an older zenlm made", table_name, name, kind)


def insert_ignore(conn: Connection, table: Table, **values) -> None:
    """INSERT … ON CONFLICT DO NOTHING, in either dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(table).values(**values).on_conflict_do_nothing())
