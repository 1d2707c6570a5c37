"""What every route shares: how the server was started (``ServeConfig``) and its state (``Server``:
the models, the meter, the metrics, and the mailboxes that carry the engine's tokens to the loop)."""
from __future__ import annotations

import asyncio
import collections
import secrets
import threading
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request

from .billing import Billing, KeyContext
from .catalog import ModelCatalog, ServedModel
from .errors import Forbidden, InvalidKey
from .metering import Meter, bearer
from .metrics import Metrics

MAX_BODY_BYTES = 1_000_000


@dataclass
class ServeConfig:
    """How to run a server: what to serve, where the database is, and the operator's prices."""

    models: list[str] = field(default_factory=list)  # folders (or NAME=DIR) of generating/translating models
    embeddings: list[str] = field(default_factory=list)  # folders of embedding models
    indexes: list[str] = field(default_factory=list)  # search index folders (zenlm index build)
    database: Optional[str] = None  # SQLite path or postgresql:// URL; default $ZENLM_DATABASE_URL or ./zenlm.sqlite3
    admin_token: Optional[str] = None  # guards /admin/*; none = admin API off
    hardware_price_per_hour: str = "0"  # the operator's cost of this machine, currency units per hour
    max_batch_size: int = 32
    max_queue: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    lease_s: float = 60.0  # how long a dead server's reservations are held before they are given back


class Server:
    """What the routes share: the models, billing (through the meter) and metrics."""

    def __init__(self, catalog: ModelCatalog, billing: Billing, config: ServeConfig):
        self.catalog, self.billing, self.config = catalog, billing, config
        self.metrics = Metrics(catalog)
        self.meter = Meter(billing, self.metrics)
        self._mailboxes: dict = {}

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        if loop not in self._mailboxes:
            self._mailboxes[loop] = Mailbox(loop)
        return self._mailboxes[loop]

    def check_admin(self, request: Request) -> None:
        """/admin/* takes the operator's admin token, never a customer key (403 when the API is off)."""
        token = self.config.admin_token
        if not token:
            raise Forbidden("the admin API is off: start the server with an admin token (--admin-token or "
                            "ZENLM_ADMIN_TOKEN)")
        given = bearer(request) or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise InvalidKey("the admin API needs the admin token; customer keys cannot use it")


def server_of(request: Request) -> Server:
    """The state of the app that received ``request``."""
    return request.app.state.server


async def authenticated(request: Request, model: str, kind: str) -> tuple[Server, KeyContext, ServedModel]:
    """Where a metered route starts: the app's state, the caller's key (401 before anything else),
    and the served model of ``kind`` it named (404 when there is none)."""
    server = server_of(request)
    key = await server.meter.authenticate(request)
    return server, key, server.catalog.get(model, kind)


class Mailbox:
    """Hands the engine thread's token events to the event loop with one wake-up per batch of
    events rather than one per token: at 32 streams that is most of the loop's work."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, collections.deque()
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
