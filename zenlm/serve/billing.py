"""Keys, plans, limits, budgets, the usage ledger and the money report.

(Over 600 lines because every money rule lives here, in one transaction per call, so that the
ledger's invariants can be read and tested in one file.)

Every request goes through three calls, each one database transaction:

* ``authenticate`` – the key's hash is looked up by its visible prefix and compared in
  constant time; revoked and expired keys are refused.
* ``reserve`` – counts the request against its key's requests/min and tokens/min window and
  reserves the most it can cost (prompt + max_tokens at the plan's prices, or the same number of
  included tokens). Both are conditional UPDATEs, so parallel requests, threads or server
  processes can never together pass a limit or a budget.
* ``settle`` – writes the ledger row (primary key: the request id or the client's
  Idempotency-Key, so a retry is never charged twice), moves the actual cost from reserved to
  spent and drops the reservation, all in one commit.

Idempotency (as Stripe and OpenMeter treat it): a retry of a *finished* request gets the stored
response and is not charged again; a retry while the first is still running is a 409; a request
that did not finish (its client left, or it failed) is recorded under its own request id, so a
retry after it has settled runs and is billed as a new request. Every generation that reached a
client therefore has exactly one ledger row. ``release`` gives a reservation back when
  a request dies before its response is sent; a server that is killed leaves reservations whose
  lease runs out, and ``sweep`` gives those back.

Money is integer micro-units (1 unit of currency = 1,000,000 micros); a request is free when its
maximum fits in what is left of the plan's included tokens this month, else it is billed in full.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

from sqlalchemy import and_, bindparam, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import store
from .errors import (Conflict, IdempotentReplay, InsufficientQuota, InvalidKey, InvalidRequest, ModelNotFound,
                     RateLimited)
from .store import api_keys, customers, key_months, plan_prices, plans, rate_windows, reservations, usage_ledger

MICROS = 1_000_000
KEY_PREFIX = "zk-"
WINDOW_S = 60
LIMIT = 2 ** 53  # the largest price, budget or count stored: well inside a 64-bit column
IDEMPOTENCY_KEY_MAX = 255  # characters in an Idempotency-Key header (Stripe's limit)


# --------------------------------------------------------------------------- money
def to_micros(amount) -> int:
    """'2.50' (a decimal string or int) in currency units -> 2_500_000 micros; floats are refused
    because they cannot hold most prices exactly."""
    if isinstance(amount, float):
        raise ValueError(f"give money as a decimal string, not a float: {amount!r}")
    try:
        value = Decimal(str(amount)) * MICROS
    except InvalidOperation:
        raise ValueError(f"{amount!r} is not an amount of money (e.g. 2.50)") from None
    if value < 0 or value != value.to_integral_value():
        raise ValueError(f"{amount!r} must be >= 0 with at most 6 decimal places")
    return int(value)


def format_micros(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(int(micros)), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def price_micros(tokens: int, micros_per_million: int) -> int:
    """Cost of ``tokens`` at a per-million price, rounded up to a whole micro."""
    return -(-tokens * micros_per_million // MICROS)


def month_of(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m")


def day_of(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")


def check_month(month: str) -> str:
    try:
        dt.datetime.strptime(month, "%Y-%m")
    except (TypeError, ValueError):
        raise ValueError(f"month must be YYYY-MM, got {month!r}") from None
    return month


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Plan:
    name: str
    prices: dict[str, tuple[int, int]]  # model -> (prompt, completion) micros per million tokens
    included_tokens: int = 0
    monthly_budget_micros: int = 0
    requests_per_minute: int = 60
    tokens_per_minute: int = 100_000

    def price(self, model: str) -> tuple[int, int]:
        found = self.prices.get(model, self.prices.get("*"))
        if found is None:
            raise ModelNotFound(f"the plan {self.name!r} does not include the model {model!r}", param="model")
        return found

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        p, c = self.price(model)
        return price_micros(prompt_tokens, p) + price_micros(completion_tokens, c)


@dataclass(frozen=True)
class KeyContext:
    """Who is calling: the key's row id and prefix, its customer and its plan."""

    key_id: int
    prefix: str
    customer_id: int
    customer: str
    plan: Plan


@dataclass
class Reservation:
    id: str
    key: KeyContext
    model: str
    month: str
    window: int
    estimate_tokens: int
    reserved_micros: int
    free: bool
    headers: dict = field(default_factory=dict)  # x-ratelimit-* for the response
    settled: bool = False  # its ledger row is written: a second settle charges nothing


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_ms: int = 0
    compute_ms: int = 0
    status: str = "completed"
    counted: Optional[str] = None  # None: the engine's (or the upstream's) count; else how zenlm counted it
    upstream: Optional[str] = None  # "NAME URL": the upstream replica that served it (None: this process)
    compute_cost_micros: Optional[int] = None  # the upstream's hardware cost; None: compute_ms at this machine's price


class _Statements:
    """The statements of every metered request (authenticate, reserve, settle), built once per
    dialect with bind parameters. Building a Core statement and its cache key on every call was
    most of a gateway request's CPU (py-spy, issue 19); a statement built once keeps its cache key.
    The SQL is the same as building them per call with the values inline as parameters."""

    def __init__(self, dialect: str):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        b = bindparam
        w, m = rate_windows.c, key_months.c
        self.key = (select(api_keys, customers.c.name.label("customer"), plans.c.name.label("plan_name"))
                    .join(customers, customers.c.id == api_keys.c.customer_id)
                    .join(plans, plans.c.id == api_keys.c.plan_id)
                    .where(api_keys.c.prefix == b("p_prefix")))
        self.plan = select(plans).where(plans.c.id == b("p_plan"))
        self.prices = select(plan_prices).where(plan_prices.c.plan_id == b("p_plan"))
        # reserve
        self.window_row = insert(rate_windows).on_conflict_do_nothing()
        this_window = and_(w.key_id == b("p_key"), w.window == b("p_window"))
        self.window_take = update(rate_windows).where(
            this_window, w.requests + 1 <= b("p_rpm"), w.tokens + b("p_est") <= b("p_tpm")).values(
            requests=w.requests + 1, tokens=w.tokens + b("p_est2"))
        self.window = select(rate_windows).where(this_window)
        self.month_row = insert(key_months).on_conflict_do_nothing()
        this_month = and_(m.key_id == b("p_key"), m.month == b("p_month"))
        self.month_free = update(key_months).where(
            this_month, m.free_tokens_used + m.free_tokens_reserved + b("p_est") <= b("p_included")).values(
            free_tokens_reserved=m.free_tokens_reserved + b("p_est2"))
        self.month_budget = update(key_months).where(
            this_month, m.spent_micros + m.reserved_micros + b("p_cost") <= b("p_budget")).values(
            reserved_micros=m.reserved_micros + b("p_cost2"))
        self.month = select(key_months).where(this_month)
        self.reservation = reservations.insert()
        self.response = select(usage_ledger.c.response).where(usage_ledger.c.id == b("p_id"))
        # settle
        self.unreserve = delete(reservations).where(reservations.c.id == b("p_id"))
        self.ledger_row = usage_ledger.insert()
        self.window_return = update(rate_windows).where(this_window).values(tokens=w.tokens - b("p_unused"))
        self.month_settle = update(key_months).where(this_month).values(
            spent_micros=m.spent_micros + b("p_charge"), reserved_micros=m.reserved_micros - b("p_reserved"),
            free_tokens_used=m.free_tokens_used + b("p_free_used"),
            free_tokens_reserved=m.free_tokens_reserved - b("p_free_reserved"), tokens_used=m.tokens_used + b("p_tokens"))
        self.month_settle_swept = update(key_months).where(this_month).values(
            spent_micros=m.spent_micros + b("p_charge"), free_tokens_used=m.free_tokens_used + b("p_free_used"),
            tokens_used=m.tokens_used + b("p_tokens"))


_STATEMENTS: dict[str, _Statements] = {}


def _statements(dialect: str) -> _Statements:
    if dialect not in _STATEMENTS:
        _STATEMENTS[dialect] = _Statements(dialect)
    return _STATEMENTS[dialect]


class Billing:
    """The money side of the server, over one database shared by every server process."""

    def __init__(self, engine: Engine, hardware_micros_per_hour: int = 0, instance_id: Optional[str] = None,
                 lease_s: float = 60.0):
        self.engine = engine
        # SQLite allows one writer: queue this process's threads on a lock rather than in SQLite's
        # busy handler, which sleeps in steps of up to 100 ms. Other processes still wait in SQLite.
        self._lock = threading.RLock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self.hardware_micros_per_hour = int(hardware_micros_per_hour)
        self.instance_id = instance_id or secrets.token_hex(8)
        self.lease_s = lease_s
        self._sql = _statements(engine.dialect.name)

    @classmethod
    def open(cls, url: Optional[str] = None, **kwargs) -> "Billing":
        return cls(store.open_database(url), **kwargs)

    @contextlib.contextmanager
    def _begin(self):
        """One write transaction."""
        with self._lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _connect(self):
        """A read (on SQLite it also takes the write lock, so it queues here rather than in SQLite)."""
        with self._lock, self.engine.connect() as conn:
            yield conn

    # ------------------------------------------------------------------ plans
    def create_plan(self, name: str, prices: dict[str, tuple[int, int]], included_tokens: int = 0,
                    monthly_budget_micros: int = 0, requests_per_minute: int = 60,
                    tokens_per_minute: int = 100_000, replace: bool = False) -> Plan:
        """Create (or with ``replace`` update) a plan. Prices: model -> (prompt, completion) micros per
        million tokens; the model '*' prices every model not listed."""
        if not name or len(name) > 64:
            raise ValueError(f"plan name must be 1-64 characters, got {name!r}")
        if not prices:
            raise ValueError("a plan needs at least one price (model -> prompt, completion per million tokens)")
        for model, (p, c) in prices.items():
            if not isinstance(p, int) or not isinstance(c, int) or not (0 <= p <= LIMIT and 0 <= c <= LIMIT):
                raise ValueError(f"prices for {model!r} must be integer micros in [0, {LIMIT}], got {(p, c)!r}")
            if not isinstance(model, str) or not 1 <= len(model) <= 128:
                raise ValueError(f"model names in prices must be 1-128 characters, got {model!r}")
        for what, value, low, high in (("included_tokens", included_tokens, 0, LIMIT),
                                       ("monthly_budget_micros", monthly_budget_micros, 0, LIMIT),
                                       ("requests_per_minute", requests_per_minute, 1, 2 ** 31 - 1),
                                       ("tokens_per_minute", tokens_per_minute, 1, LIMIT)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
        values = dict(included_tokens=included_tokens, monthly_budget_micros=monthly_budget_micros,
                      requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
        with self._begin() as conn:
            row = conn.execute(select(plans.c.id).where(plans.c.name == name)).first()
            if row is not None and not replace:
                raise ValueError(f"plan {name!r} exists already (use replace to change it)")
            if row is None:
                plan_id = conn.execute(plans.insert().values(name=name, created_at=int(time.time()), **values)
                                       ).inserted_primary_key[0]
            else:
                plan_id = row.id
                conn.execute(update(plans).where(plans.c.id == plan_id).values(**values))
                conn.execute(delete(plan_prices).where(plan_prices.c.plan_id == plan_id))
            for model, (p, c) in prices.items():
                conn.execute(plan_prices.insert().values(plan_id=plan_id, model=model, prompt_micros_per_million=p,
                                                         completion_micros_per_million=c))
        return self.get_plan(name)

    def _plan_from_row(self, conn, row) -> Plan:
        prices = {r.model: (r.prompt_micros_per_million, r.completion_micros_per_million)
                  for r in conn.execute(self._sql.prices, {"p_plan": row.id})}
        return Plan(row.name, prices, row.included_tokens, row.monthly_budget_micros, row.requests_per_minute,
                    row.tokens_per_minute)

    def get_plan(self, name: str) -> Plan:
        with self._connect() as conn:
            row = conn.execute(select(plans).where(plans.c.name == name)).first()
            if row is None:
                known = [r.name for r in conn.execute(select(plans.c.name).order_by(plans.c.name))]
                raise ValueError(f"no plan named {name!r}; plans: {', '.join(known) or 'none yet'}")
            return self._plan_from_row(conn, row)

    def list_plans(self) -> list[Plan]:
        with self._connect() as conn:
            return [self._plan_from_row(conn, r) for r in conn.execute(select(plans).order_by(plans.c.name))]

    # ------------------------------------------------------------------ keys
    def create_key(self, customer: str, plan: str, expires_in_days: Optional[float] = None) -> tuple[str, dict]:
        """Make a key for ``customer`` (created if new) on ``plan``. Returns the secret — the only
        time it is ever visible — and the stored record."""
        if not customer or len(customer) > 128:
            raise ValueError(f"customer name must be 1-128 characters, got {customer!r}")
        if expires_in_days is not None and not 0 < expires_in_days <= 36_500:
            raise ValueError(f"expires_in_days must be in (0, 36500], got {expires_in_days!r}")
        plan_obj = self.get_plan(plan)
        now = int(time.time())
        expires = None if expires_in_days is None else now + int(expires_in_days * 86400)
        with self._begin() as conn:
            store.insert_ignore(conn, customers, name=customer, created_at=now)
            customer_id = conn.execute(select(customers.c.id).where(customers.c.name == customer)).scalar_one()
            plan_id = conn.execute(select(plans.c.id).where(plans.c.name == plan_obj.name)).scalar_one()
            prefix = KEY_PREFIX + secrets.token_urlsafe(6)[:8]
            key = f"{prefix}{secrets.token_urlsafe(30)}"
            conn.execute(api_keys.insert().values(prefix=prefix, key_hash=_hash(key), customer_id=customer_id,
                                                  plan_id=plan_id, created_at=now, expires_at=expires))
        return key, dict(prefix=prefix, customer=customer, plan=plan_obj.name, created_at=now, expires_at=expires,
                         revoked_at=None)

    def list_keys(self, customer: Optional[str] = None) -> list[dict]:
        q = (select(api_keys.c.prefix, customers.c.name.label("customer"), plans.c.name.label("plan"),
                    api_keys.c.created_at, api_keys.c.expires_at, api_keys.c.revoked_at)
             .join(customers, customers.c.id == api_keys.c.customer_id)
             .join(plans, plans.c.id == api_keys.c.plan_id).order_by(api_keys.c.id))
        if customer is not None:
            q = q.where(customers.c.name == customer)
        with self._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def revoke_key(self, prefix: str) -> dict:
        """Revoke by the visible prefix (or the whole key); takes effect on the next request."""
        prefix = prefix[:len(KEY_PREFIX) + 8]
        with self._begin() as conn:
            done = conn.execute(update(api_keys).where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                                .values(revoked_at=int(time.time()))).rowcount
        if not done:
            known = {k["prefix"]: k for k in self.list_keys()}
            if prefix not in known:
                raise ValueError(f"no key with prefix {prefix!r}")
        return next(k for k in self.list_keys() if k["prefix"] == prefix)

    def authenticate(self, key: Optional[str]) -> KeyContext:
        """The caller behind ``key``, or InvalidKey (401) for a missing, unknown, revoked or expired one."""
        if not key:
            raise InvalidKey("no API key: send it as 'Authorization: Bearer <key>'")
        prefix = key[:len(KEY_PREFIX) + 8]
        with self._connect() as conn:
            row = conn.execute(self._sql.key, {"p_prefix": prefix}).first()
            # compare even when the prefix is unknown so that timing says nothing about which prefixes exist
            stored = row.key_hash if row is not None else "0" * 64
            if not hmac.compare_digest(_hash(key), stored) or row is None:
                raise InvalidKey("incorrect API key provided")
            now = time.time()
            if row.revoked_at is not None:
                raise InvalidKey(f"the API key {row.prefix}… was revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise InvalidKey(f"the API key {row.prefix}… expired")
            plan = self._plan_from_row(conn, conn.execute(self._sql.plan, {"p_plan": row.plan_id}).first())
        return KeyContext(row.id, row.prefix, row.customer_id, row.customer, plan)

    # ------------------------------------------------------------------ idempotency
    @staticmethod
    def ledger_id(key: KeyContext, request_id: str, idempotency_key: Optional[str], route: str = "") -> str:
        """Retries carry the same Idempotency-Key; scoped by key and route so that neither another
        customer nor another kind of request can collide with it. The whole key is compared (by its
        SHA-256); keys of 1 to ``IDEMPOTENCY_KEY_MAX`` characters are accepted."""
        if idempotency_key is None:
            return request_id
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
            raise InvalidRequest(f"the Idempotency-Key header has {len(idempotency_key)} characters; it must have "
                                 f"1 to {IDEMPOTENCY_KEY_MAX}", param="Idempotency-Key")
        return f"idem:{key.key_id}:{route}:{_hash(idempotency_key)}"

    def begin(self, key: KeyContext, request_id: str, idempotency_key: Optional[str], route: str, model: str,
              prompt_tokens: int, max_completion_tokens: int, room: Optional[Callable[[], None]] = None
              ) -> tuple[Optional[Reservation], Optional[dict]]:
        """The start of every metered request: (None, stored response) for a retry of a finished
        Idempotency-Key, else (reservation, None) once ``room`` (raises when the server cannot take
        the request now) has passed and the worst case is held. Conflict (409) while a request with
        the same key still runs."""
        ledger_id = self.ledger_id(key, request_id, idempotency_key, route)
        if idempotency_key is not None:
            stored = self.stored_response(ledger_id)
            if stored is not None:
                return None, stored
        if room is not None:
            room()
        try:
            return self.reserve(key, ledger_id, model, prompt_tokens, max_completion_tokens), None
        except IdempotentReplay as done:  # the first request with this key finished while we looked
            return None, done.response

    def stored_response(self, ledger_id: str) -> Optional[dict]:
        with self._connect() as conn:
            text = conn.execute(self._sql.response, {"p_id": ledger_id}).scalar()
        return None if text is None else json.loads(text)

    # ------------------------------------------------------------------ reserve / settle
    def reserve(self, key: KeyContext, ledger_id: str, model: str, prompt_tokens: int,
                max_completion_tokens: int) -> Reservation:
        """Hold the request's worst case against the rate window and the month's budget, atomically.
        Raises Conflict (409) while a request with the same ``ledger_id`` runs, and IdempotentReplay
        when one has finished meanwhile (its stored response is the answer; nothing is held)."""
        plan = key.plan
        p_price, c_price = plan.price(model)
        estimate = prompt_tokens + max_completion_tokens
        max_cost = price_micros(prompt_tokens, p_price) + price_micros(max_completion_tokens, c_price)
        now = time.time()
        window, month = int(now // WINDOW_S) * WINDOW_S, month_of(now)
        reset = max(1, int(window + WINDOW_S - now + 0.999))
        headers = {"x-ratelimit-limit-requests": str(plan.requests_per_minute),
                   "x-ratelimit-limit-tokens": str(plan.tokens_per_minute),
                   "x-ratelimit-reset-requests": f"{reset}s", "x-ratelimit-reset-tokens": f"{reset}s"}
        try:
            sql, here = self._sql, {"p_key": key.key_id, "p_window": window, "p_month": month}
            with self._begin() as conn:
                conn.execute(sql.window_row, dict(key_id=key.key_id, window=window, requests=0, tokens=0))
                ok = conn.execute(sql.window_take, {**here, "p_rpm": plan.requests_per_minute, "p_est": estimate,
                                                    "p_tpm": plan.tokens_per_minute, "p_est2": estimate}).rowcount
                row = conn.execute(sql.window, here).first()
                headers["x-ratelimit-remaining-requests"] = str(max(0, plan.requests_per_minute - row.requests))
                headers["x-ratelimit-remaining-tokens"] = str(max(0, plan.tokens_per_minute - row.tokens))
                if not ok:
                    which = "requests" if row.requests + 1 > plan.requests_per_minute else "tokens"
                    limit = plan.requests_per_minute if which == "requests" else plan.tokens_per_minute
                    extra = (f" (this request needs up to {estimate} tokens)" if which == "tokens" else "")
                    raise RateLimited(f"rate limit reached: {limit} {which} per minute on plan {plan.name!r}{extra}; "
                                      f"retry in {reset}s", type=which,
                                      headers={**headers, "retry-after": str(reset)})
                conn.execute(sql.month_row, dict(key_id=key.key_id, month=month, spent_micros=0, reserved_micros=0,
                                                 free_tokens_used=0, free_tokens_reserved=0, tokens_used=0))
                free = conn.execute(sql.month_free, {**here, "p_est": estimate, "p_included": plan.included_tokens,
                                                     "p_est2": estimate}).rowcount == 1
                if not free:
                    ok = conn.execute(sql.month_budget, {**here, "p_cost": max_cost, "p_cost2": max_cost,
                                                         "p_budget": plan.monthly_budget_micros}).rowcount
                    if not ok:
                        spent = conn.execute(sql.month, here).first()
                        raise InsufficientQuota(
                            f"monthly budget exhausted: this request may cost up to {format_micros(max_cost)}, "
                            f"{format_micros(spent.spent_micros)} of {format_micros(plan.monthly_budget_micros)} "
                            f"is spent and {format_micros(spent.reserved_micros)} reserved this month",
                            headers={**headers, "retry-after": "3600"})
                conn.execute(sql.reservation, dict(
                    id=ledger_id, key_id=key.key_id, month=month, window=window, estimate_tokens=estimate,
                    reserved_micros=0 if free else max_cost, reserved_free_tokens=estimate if free else 0, free=free,
                    instance_id=self.instance_id, lease_until=now + self.lease_s, created_at=now))
                if ledger_id.startswith("idem:"):
                    # checked after the insert: on PostgreSQL the insert waits for a settle of the same id
                    # that is committing, and this read then sees its row (one statement, fresh snapshot)
                    stored = conn.execute(sql.response, {"p_id": ledger_id}).scalar()
                    if stored is not None:
                        raise IdempotentReplay(json.loads(stored))  # rolls back everything held above
        except IntegrityError:
            raise Conflict("a request with this Idempotency-Key is still running; retry when it has finished") from None
        return Reservation(ledger_id, key, model, month, window, estimate, 0 if free else max_cost, free, headers)

    def compute_cost(self, compute_ms: int) -> int:
        return -(-int(compute_ms) * self.hardware_micros_per_hour // 3_600_000)

    def settle(self, res: Reservation, usage: Usage, request_id: str, route: str,
               response: Optional[dict] = None, billable: bool = True) -> int:
        """Write the ledger row and charge the actual cost, in one commit; returns the charge in micros.
        ``billable=False`` (nothing reached the client) records the row and its compute at no charge.

        A finished request (``response`` given) is stored under the reservation's id — the
        Idempotency-Key's, when there is one — for retries to get back; an unfinished one under its
        request id, leaving the Idempotency-Key free for a retry that runs (and is billed) anew. If
        the id is taken already (a lease that ran out let a retry run alongside), the row goes under
        the request id: what a client received is always recorded. A reservation settles once; a
        second settle writes and charges nothing."""
        if res.settled:
            return 0
        ids = [res.id] if response is not None else []
        if request_id not in ids:
            ids.append(request_id)
        for ledger_id in ids:
            try:
                charge = self._settle_as(ledger_id, res, usage, request_id, route, response, billable)
            except IntegrityError:
                continue
            res.settled = True
            return charge
        self.release(res)
        return 0

    def _settle_as(self, ledger_id: str, res: Reservation, usage: Usage, request_id: str, route: str,
                   response: Optional[dict], billable: bool) -> int:
        plan, key = res.key.plan, res.key
        tokens = usage.prompt_tokens + usage.completion_tokens
        charge = 0 if res.free or not billable else min(
            res.reserved_micros, plan.cost(res.model, usage.prompt_tokens, usage.completion_tokens))
        free_used = tokens if res.free and billable else 0
        now = time.time()
        if response is not None and "usage" in response and isinstance(response["usage"], dict):
            response["usage"]["cost_micros"] = charge
        sql, here = self._sql, {"p_key": key.key_id, "p_window": res.window, "p_month": res.month}
        with self._begin() as conn:
            held = conn.execute(sql.unreserve, {"p_id": res.id}).rowcount
            conn.execute(sql.ledger_row, dict(
                id=ledger_id, request_id=request_id, key_id=key.key_id, customer_id=key.customer_id,
                model=res.model, route=route, status=usage.status, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, queue_ms=int(usage.queue_ms),
                compute_ms=int(usage.compute_ms), revenue_micros=charge,
                compute_cost_micros=(self.compute_cost(usage.compute_ms) if usage.compute_cost_micros is None
                                     else int(usage.compute_cost_micros)),
                counted=usage.counted, upstream=usage.upstream, created_at=now, day=day_of(now),
                month=res.month, response=None if response is None else json.dumps(response)))
            used = {**here, "p_charge": charge, "p_free_used": free_used, "p_tokens": tokens}
            if held:  # give back the reservation and count what was used (rows locked in reserve's order)
                conn.execute(sql.window_return, {**here, "p_unused": res.estimate_tokens - tokens})
                conn.execute(sql.month_settle, {**used, "p_reserved": res.reserved_micros,
                                                "p_free_reserved": res.estimate_tokens if res.free else 0})
            else:  # the lease ran out (and was swept) while we ran: count the use all the same
                conn.execute(sql.month_settle_swept, used)
        return charge

    def release(self, res: Reservation) -> None:
        """Give a reservation back unused (the request failed or its client left before any token)."""
        with self._begin() as conn:
            self._release_row(conn, res.id)

    @staticmethod
    def _release_row(conn, reservation_id: str) -> bool:
        row = conn.execute(select(reservations).where(reservations.c.id == reservation_id)).first()
        if row is None or not conn.execute(delete(reservations).where(reservations.c.id == reservation_id)).rowcount:
            return False
        w = rate_windows.c  # the same row order as reserve and settle: rate window, then month
        conn.execute(update(rate_windows).where(w.key_id == row.key_id, w.window == row.window).values(
            tokens=w.tokens - row.estimate_tokens))
        m = key_months.c
        conn.execute(update(key_months).where(m.key_id == row.key_id, m.month == row.month).values(
            reserved_micros=m.reserved_micros - row.reserved_micros,
            free_tokens_reserved=m.free_tokens_reserved - row.reserved_free_tokens))
        return True

    def renew_leases(self) -> None:
        """Keep this process's in-flight reservations alive (called every few seconds)."""
        with self._begin() as conn:
            conn.execute(update(reservations).where(reservations.c.instance_id == self.instance_id)
                         .values(lease_until=time.time() + self.lease_s))

    def sweep(self) -> int:
        """Give back reservations whose server died (lease expired); returns how many."""
        with self._begin() as conn:
            ids = list(conn.execute(select(reservations.c.id).where(reservations.c.lease_until < time.time())).scalars())
            freed = sum(self._release_row(conn, i) for i in ids)
            conn.execute(delete(rate_windows).where(rate_windows.c.window < time.time() - 3600))
        return freed

    # ------------------------------------------------------------------ reports
    def key_month(self, prefix: str, month: Optional[str] = None) -> dict:
        """Spent, reserved and used this month for one key (for tests and the admin API)."""
        month = month or month_of(time.time())
        with self._connect() as conn:
            row = conn.execute(select(key_months).join(api_keys, api_keys.c.id == key_months.c.key_id)
                               .where(api_keys.c.prefix == prefix, key_months.c.month == month)).first()
        return dict(row._mapping) if row is not None else dict(spent_micros=0, reserved_micros=0, free_tokens_used=0,
                                                              free_tokens_reserved=0, tokens_used=0)

    def ledger(self, month: Optional[str] = None) -> list[dict]:
        q = select(usage_ledger).order_by(usage_ledger.c.created_at)
        if month:
            q = q.where(usage_ledger.c.month == check_month(month))
        with self._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def report(self, month: str, by: str = "customer") -> dict:
        """Revenue, compute cost and gross margin for a month, grouped by customer, model or day."""
        check_month(month)
        groups = {"customer": customers.c.name, "model": usage_ledger.c.model, "day": usage_ledger.c.day,
                  "upstream": func.coalesce(usage_ledger.c.upstream, "local")}
        if by not in groups:
            raise ValueError(f"report by must be one of {', '.join(groups)}, got {by!r}")
        u = usage_ledger.c
        group = groups[by].label("group")
        q = (select(group, func.count().label("requests"), func.sum(u.prompt_tokens).label("prompt_tokens"),
                    func.sum(u.completion_tokens).label("completion_tokens"),
                    func.sum(u.revenue_micros).label("revenue_micros"),
                    func.sum(u.compute_cost_micros).label("compute_cost_micros"))
             .select_from(usage_ledger.join(customers, customers.c.id == u.customer_id))
             .where(u.month == month).group_by(group).order_by(group))
        with self._connect() as conn:
            rows = [{k: (int(v) if k != "group" else str(v)) for k, v in r._mapping.items()} for r in conn.execute(q)]
        for r in rows:
            r["margin_micros"] = r["revenue_micros"] - r["compute_cost_micros"]
        total = {"group": "total"}
        for k in ("requests", "prompt_tokens", "completion_tokens", "revenue_micros", "compute_cost_micros",
                  "margin_micros"):
            total[k] = sum(r[k] for r in rows)
        return {"month": month, "by": by, "rows": rows, "total": total}


def format_time(t: Optional[float]) -> str:
    """A ledger timestamp as 'YYYY-MM-DD HH:MM' (UTC); '-' for none."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def format_keys(keys: list[dict]) -> str:
    """``zenlm keys list``: a row per key (``Billing.list_keys``) under a header; never the key itself."""
    lines = [f"{'prefix':<13} {'customer':<20} {'plan':<14} {'created':<17} {'expires':<17} revoked"]
    lines += [f"{k['prefix']:<13} {k['customer']:<20} {k['plan']:<14} {format_time(k['created_at']):<17} "
              f"{format_time(k['expires_at']):<17} {format_time(k['revoked_at'])}" for k in keys]
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """``zenlm plans``: one line with a plan's prices per million tokens, allowance, budget and limits."""
    prices = ", ".join(f"{m}={format_micros(p)}:{format_micros(c)}" for m, (p, c) in plan.prices.items())
    return (f"{plan.name}: {prices} per 1M tokens; {plan.included_tokens:,} included tokens/month; budget "
            f"{format_micros(plan.monthly_budget_micros)}/month; {plan.requests_per_minute} req/min, "
            f"{plan.tokens_per_minute:,} tokens/min")


def format_report(report: dict) -> str:
    """``zenlm billing report``: one ``Billing.report`` as a table (requests, tokens, revenue,
    compute cost, gross margin and its percent), its groups then the total."""
    lines = [f"{report['month']} by {report['by']}",
             f"{report['by']:<20} {'requests':>9} {'prompt':>10} {'completion':>11} {'revenue':>14} "
             f"{'compute':>14} {'margin':>14} {'margin%':>8}"]
    for row in report["rows"] + [report["total"]]:
        pct = f"{100 * row['margin_micros'] / row['revenue_micros']:.1f}" if row["revenue_micros"] else "-"
        lines.append(f"{row['group']:<20} {row['requests']:>9,} {row['prompt_tokens']:>10,} "
                     f"{row['completion_tokens']:>11,} {format_micros(row['revenue_micros']):>14} "
                     f"{format_micros(row['compute_cost_micros']):>14} {format_micros(row['margin_micros']):>14} "
                     f"{pct:>8}")
    return "\n".join(lines)


def write_report_csv(reports: list[dict], path) -> None:
    """One CSV with a row per group of each report (money as decimal strings, not floats)."""
    from ..checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["month", "by", "group", "requests", "prompt_tokens", "completion_tokens", "revenue",
                        "compute_cost", "gross_margin", "margin_percent"])
            for report in reports:
                for r in report["rows"] + [report["total"]]:
                    pct = f"{100 * r['margin_micros'] / r['revenue_micros']:.1f}" if r["revenue_micros"] else ""
                    w.writerow([report["month"], report["by"], r["group"], r["requests"], r["prompt_tokens"],
                                r["completion_tokens"], format_micros(r["revenue_micros"]),
                                format_micros(r["compute_cost_micros"]), format_micros(r["margin_micros"]), pct])

    atomic_write(path, write)


def plot_report(report: dict, path) -> None:
    """Bars of revenue and compute cost per group, with the margin as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [r["group"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 3), 4))
    ax.bar([i - 0.2 for i in x], [r["revenue_micros"] / MICROS for r in rows], width=0.4, label="revenue")
    ax.bar([i + 0.2 for i in x], [r["compute_cost_micros"] / MICROS for r in rows], width=0.4, label="compute cost")
    ax.plot(list(x), [r["margin_micros"] / MICROS for r in rows], "k.-", label="gross margin")
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_ylabel("currency units")
    ax.set_title(f"zenlm billing {report['month']} by {report['by']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
