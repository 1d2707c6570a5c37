"""The one path every metered route takes: authenticate -> reserve -> run -> settle.

A route authenticates the key first (a wrong key with a malformed body is a 401, as OpenAI
answers), checks what it was asked, then ``reserve``s the request's worst case (rate window +
budget; or gets back the stored response of a retried Idempotency-Key). What runs next is the
route's own: a model in this process, or (the gateway) another engine's stream of token deltas
and usage. Whatever ran is settled *before* the last bytes of the response go out, so a delivered
response always has its ledger row, and a response that never completed (server killed) holds
only a reservation that its lease gives back. A run that fails gives its reservation back; a
non-streaming client that leaves is charged nothing; a streaming one pays for what it was sent.

Two shapes of run, both written here once:

- a JSON answer: ``return await meter.answer(ticket, run)``, where ``run()`` returns an
  :class:`Outcome` (the usage and the response body);
- an event stream: the stream's generator runs inside ``with ticket.streaming(sent, stop):`` and
  calls ``await ticket.settle(usage, full_response)`` before its closing chunks; if the client
  leaves first, ``stop()`` ends the run and ``sent()``'s usage is billed.

A remote run fits either: ``run`` awaits the remote answer and its usage, or the stream relays the
remote deltas, counting what it sent, and settles with the usage the remote reports at the end.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .billing import Billing, KeyContext, Reservation, Usage
from .errors import APIError
from .metrics import Metrics


def bearer(request: Request) -> Optional[str]:
    """The token of an ``Authorization: Bearer ...`` header, or None."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass
class Outcome:
    """What a finished run delivered: ``usage`` to record and ``response``, the JSON body (its
    ``usage`` gains ``cost_micros``). ``response=None``: the client got nothing (it left, or the run
    failed with ``error``, raised once the row is written), so the row is written at no charge."""

    usage: Usage
    response: Optional[dict] = None
    error: Optional[APIError] = None


class Ticket:
    """One request's reservation, from ``Meter.reserve`` to its settle (or release).

    ``replay`` is the stored response when the request is a retry of a finished Idempotency-Key:
    answer it again (charged nothing) and run nothing; ``reservation`` is then None."""

    def __init__(self, meter: "Meter", request_id: str, route: str, reservation: Optional[Reservation],
                 replay: Optional[dict]):
        self.meter, self.request_id, self.route = meter, request_id, route
        self.reservation, self.replay = reservation, replay
        self.settled = reservation is None  # its row is written (or there is nothing to write)

    @property
    def headers(self) -> dict:
        """The x-ratelimit-* headers for the response."""
        return dict(self.reservation.headers)

    async def settle(self, usage: Usage, response: Optional[dict], billable: bool = True) -> int:
        """Write the ledger row (with ``response`` stored for retries) and charge; the charge in micros."""
        res = self.reservation
        charge = await run_in_threadpool(self.meter.billing.settle, res, usage, self.request_id, self.route,
                                         response, billable)
        self.settled = True
        self.meter.metrics.tokens.labels(res.model, "prompt").inc(usage.prompt_tokens)
        self.meter.metrics.tokens.labels(res.model, "completion").inc(usage.completion_tokens)
        return charge

    async def release(self) -> None:
        """Give the reservation back unused (the run failed before it delivered anything)."""
        await run_in_threadpool(self.meter.billing.release, self.reservation)

    def abandon(self, usage: Usage) -> None:
        """The client left mid-stream: record ``usage`` (what it was sent; charged if any token was)
        in a thread of its own, since the request's task is being cancelled and may await nothing."""
        billing = self.meter.billing
        threading.Thread(target=billing.settle, daemon=True,
                         args=(self.reservation, usage, self.request_id, self.route, None,
                               usage.completion_tokens > 0)).start()

    @contextlib.contextmanager
    def streaming(self, sent: Callable[[], Usage], stop: Callable[[], None] = lambda: None) -> Iterator["Ticket"]:
        """Around an event stream's generator: if it ends before it settled (the client left, or the
        run failed), ``stop()`` the run and bill ``sent()``, the usage of what the client received."""
        try:
            yield self
        finally:
            if not self.settled:
                stop()
                self.abandon(sent())


class Meter:
    """Keys, reservations and the ledger for the routes: ``billing`` does the bookkeeping, this
    does it from a request, off the event loop, counting tokens into ``metrics``."""

    def __init__(self, billing: Billing, metrics: Metrics):
        self.billing, self.metrics = billing, metrics

    async def authenticate(self, request: Request) -> KeyContext:
        """The caller's key (401 when it is missing, unknown, revoked or expired)."""
        return await run_in_threadpool(self.billing.authenticate, bearer(request))

    async def reserve(self, request: Request, key: KeyContext, route: str, model: str, prompt_tokens: int,
                      max_completion: int, room: Optional[Callable[[], None]] = None) -> Ticket:
        """Replay a stored response for a retried Idempotency-Key, else check ``room`` (raises when
        the engine cannot take the request now: nothing is charged) and hold the worst case."""
        request_id = request.state.request_id
        res, stored = await run_in_threadpool(self.billing.begin, key, request_id,
                                              request.headers.get("idempotency-key"), request.url.path, model,
                                              prompt_tokens, max_completion, room)
        return Ticket(self, request_id, route, res, stored)

    async def answer(self, ticket: Ticket, run: Callable[[], Awaitable[Outcome]]) -> Response:
        """Run a request answered in one JSON body and settle it: the stored response for a replay;
        the reservation given back if ``run`` raises; 499 (no charge) if the client left first."""
        if ticket.replay is not None:
            return JSONResponse(ticket.replay)
        try:
            outcome = await run()
        except BaseException:
            await ticket.release()
            raise
        if outcome.response is None:
            await ticket.settle(outcome.usage, None, billable=False)
            if outcome.error is not None:
                raise outcome.error
            return Response(status_code=499)
        outcome.response["usage"]["cost_micros"] = await ticket.settle(outcome.usage, outcome.response)
        return JSONResponse(outcome.response, headers=ticket.headers)
