"""The HTTP server: OpenAI-compatible routes over the catalog, the engine and billing.

Every model route authenticates the key, checks the model and the context window, reserves the
request's worst case (rate window + budget), runs it, and settles the ledger row *before* the last
bytes of the response go out — so a delivered response always has its row, and a response that
never completed (server killed) holds only a reservation that its lease gives back. Streaming
clients that leave are billed for the tokens they were sent; non-streaming ones for nothing.

The key is checked before anything else about a request (a wrong key with a malformed body is a
401, as OpenAI answers). Limits a client meets: a body of at most ``max_body_bytes`` (413, with or
without Content-Length); an Idempotency-Key of 1-255 characters; at most ``MAX_SEQUENCES`` (128)
sequences decoded per request (prompts x n for /v1/completions, n for chat, inputs for
translations) and 2,048 inputs per /v1/embeddings request (400); a request whose sequences do not
fit the engine's free room is refused as a whole before it is charged (503), and one key may hold
at most ``max_batch_size + max_queue // 2`` sequences at once (429), so others always get a turn.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .billing import Billing, KeyContext, Reservation, Usage, to_micros
from .catalog import ModelCatalog, ServedModel, embed_rows, tokenize_inputs
from .engine import EngineRequest, SamplingParams, TokenEvent
from .errors import APIError, Forbidden, InvalidKey, InvalidRequest, PayloadTooLarge

log = logging.getLogger("zenlm.serve")
STATIC = Path(__file__).parent / "static"
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


# --------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus series for one app (its own registry, so several apps can live in one process)."""

    def __init__(self, catalog: ModelCatalog):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("zenlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("zenlm_tokens", "tokens metered, by model and kind", ["model", "kind"], registry=r)
        self.latency = Histogram("zenlm_request_latency_seconds", "time to the last byte of a response", ["route"],
                                 registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("zenlm_time_to_first_token_seconds", "queueing + prefill until the first token",
                              ["model"], registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("zenlm_batch_size", "rows in each decoding step", ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step = Histogram("zenlm_step_seconds", "wall time of one decoding step", ["model"], registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.queue = Gauge("zenlm_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("zenlm_running_requests", "requests in the decoding batch", ["model"], registry=r)
        for m in catalog.models.values():
            if m.engine is not None:
                self.queue.labels(m.id).set_function(lambda e=m.engine: e.queue_depth)
                self.running.labels(m.id).set_function(lambda e=m.engine: e.batch_size)
                m.engine.on_step = lambda rows, dt, name=m.id: (self.batch.labels(name).observe(rows),
                                                                self.step.labels(name).observe(dt))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------- the gate
class Gate:
    """Outermost ASGI layer: a request id on every response, a 413 for bodies over the limit
    (by Content-Length, or counted as a chunked body arrives), and request metrics. An error raised
    after its response went out whole (Starlette re-raises what its 500 handler answered) stops
    here, so the server keeps the client's keep-alive connection instead of closing it."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req-" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), {"code": 500, "started": False, "done": False}
        route = scope.get("path", "")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True
            await send(message)

        def too_large() -> JSONResponse:
            err = PayloadTooLarge(f"the request body is larger than the limit of {self.max_body:,} bytes")
            return JSONResponse(err.body(), status_code=413, headers={"connection": "close"})

        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await too_large()(scope, receive, send_with_id)
        elif length is not None:
            await self._run(scope, receive, send_with_id, status)
        else:  # chunked: read the body whole (at most max_body bytes), then hand it on as one message
            body = await self._read_counted(receive)
            if body is None:
                status["code"] = 499  # the client left before its body arrived
            elif body is _TOO_LARGE:
                await too_large()(scope, receive, send_with_id)
            else:
                replayed = False

                async def replay():
                    nonlocal replayed
                    if replayed:
                        return await receive()
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}

                await self._run(scope, replay, send_with_id, status)
        if route.startswith(("/v1/", "/admin/")):
            label = _route_label(route)
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)

    async def _read_counted(self, receive):
        """A body without Content-Length (chunked), read whole while counting: its bytes, _TOO_LARGE
        once past the limit, or None when the client left first."""
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                return _TOO_LARGE
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _run(self, scope, receive, send, status) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            if not status["done"]:
                raise  # a response cut short: the connection must close


_TOO_LARGE = object()


def _route_label(path: str) -> str:
    for known in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/translations", "/v1/search",
                  "/v1/models"):
        if path.startswith(known):
            return known
    return "/admin" if path.startswith("/admin/") else "other"


# --------------------------------------------------------------------------- the server's state
class Server:
    """What the routes share: the models, billing and metrics."""

    def __init__(self, catalog: ModelCatalog, billing: Billing, config: ServeConfig):
        self.catalog, self.billing, self.config = catalog, billing, config
        self.metrics = Metrics(catalog)
        self._mailboxes: dict = {}

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        if loop not in self._mailboxes:
            self._mailboxes[loop] = Mailbox(loop)
        return self._mailboxes[loop]

    # ------------------------------------------------------------------ auth
    async def authenticate(self, request: Request) -> KeyContext:
        return await run_in_threadpool(self.billing.authenticate, _bearer(request))

    def check_admin(self, request: Request) -> None:
        token = self.config.admin_token
        if not token:
            raise Forbidden("the admin API is off: start the server with an admin token (--admin-token or "
                            "ZENLM_ADMIN_TOKEN)")
        given = _bearer(request) or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise InvalidKey("the admin API needs the admin token; customer keys cannot use it")

    # ------------------------------------------------------------------ metering helpers
    async def begin(self, request: Request, key: KeyContext, model: str, prompt_tokens: int, max_completion: int,
                    room: Optional[Callable[[], None]] = None) -> tuple[Reservation, Optional[dict]]:
        """Replay a stored response for a retried Idempotency-Key, else check ``room`` (raises when
        the engine cannot take the request now) and reserve the worst case (``Billing.begin``)."""
        return await run_in_threadpool(self.billing.begin, key, request.state.request_id,
                                       request.headers.get("idempotency-key"), request.url.path, model,
                                       prompt_tokens, max_completion, room)

    async def settle(self, request: Request, res: Reservation, usage: Usage, route: str, response: Optional[dict],
                     billable: bool = True) -> int:
        charge = await run_in_threadpool(self._settle_sync, request.state.request_id, res, usage, route, response,
                                         billable)
        self.metrics.tokens.labels(res.model, "prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(res.model, "completion").inc(usage.completion_tokens)
        return charge

    def _settle_sync(self, request_id, res, usage, route, response, billable) -> int:
        return self.billing.settle(res, usage, request_id, route, response, billable=billable)


def _bearer(request: Request) -> Optional[str]:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _json(model: P.Response, headers: Optional[dict] = None, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(), status_code=status, headers=headers)


def _sse(obj) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json()
    return f"data: {data}\n\n"


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


# --------------------------------------------------------------------------- generation
@dataclass
class _Choice:
    index: int
    prompt_ids: list[int]
    request: Optional[EngineRequest] = None
    text: str = ""
    tokens: list = field(default_factory=list)  # (token_id, logprob, top) per token
    delivered_tokens: int = 0
    finish_reason: Optional[str] = None


async def generate(server: Server, request: Request, body, chat: bool):
    route = "/v1/chat/completions" if chat else "/v1/completions"
    key = await server.authenticate(request)
    served = server.catalog.get(body.model, "generate")
    if chat:
        prompts = [served.encode_chat([{"role": m.role, "content": m.text} for m in body.messages])]
        param = "messages"
    else:
        prompts = []
        for p in body.prompts:
            ids = served.encode(p) if isinstance(p, str) else served.check_ids(p)
            if not ids:
                raise InvalidRequest("prompt is empty (0 tokens)", param="prompt")
            prompts.append(ids)
        param = "prompt"
    max_tokens = [served.fit(len(p), body.max_tokens, param) for p in prompts]
    prompt_tokens = sum(len(p) for p in prompts)
    max_completion = sum(m * body.n for m in max_tokens)
    sequences = len(prompts) * body.n
    res, stored = await server.begin(request, key, served.id, prompt_tokens, max_completion,
                                     room=lambda: served.engine.check_room(sequences, key.key_id))
    if stored is not None:
        return _replay(stored, body, chat)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    top_logprobs = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
    mailbox = server.mailbox(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    choices: list[_Choice] = []
    try:
        for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
            for j in range(body.n):
                index = len(choices)
                choice = _Choice(index, ids)
                params = SamplingParams(
                    max_tokens=mt, temperature=temperature, top_p=top_p,
                    seed=None if body.seed is None else (body.seed + index) % (2 ** 63),
                    stop=body.stop_strings, stop_token_ids=served.stop_token_ids,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    logprobs=want_logprobs, top_logprobs=top_logprobs)
                try:
                    params.rules()
                except ValueError as e:
                    raise InvalidRequest(str(e)) from None
                choice.request = EngineRequest(
                    ids, params, lambda ev, k=index: mailbox.post(events, (k, ev)),
                    request_id=request.state.request_id)
                choices.append(choice)
        served.engine.submit_all([c.request for c in choices], owner=key.key_id)  # all or none
    except BaseException:
        for choice in choices:
            if choice.request is not None:
                choice.request.cancel()
        await run_in_threadpool(server.billing.release, res)
        raise
    created = P.now()
    rid = ("chatcmpl-" if chat else "cmpl-") + request.state.request_id[4:]
    headers = dict(res.headers)
    if body.stream:
        return StreamingResponse(_stream(server, request, served, body, chat, choices, events, res, rid, created, route),
                                 media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    # non-streaming: wait for every choice, watching for a client that leaves
    watcher = asyncio.create_task(_watch_disconnect(request, choices))
    try:
        while any(c.finish_reason is None for c in choices):
            k, ev = await events.get()
            _absorb(choices[k], ev)
    finally:
        watcher.cancel()
    usage = _usage(choices, prompt_tokens)
    if any(c.finish_reason in ("cancelled", "error") for c in choices):
        await server.settle(request, res, Usage(prompt_tokens, 0, _queue_ms(choices), _compute_ms(choices),
                                                "disconnected"), route, None, billable=False)
        if any(c.finish_reason == "error" for c in choices):
            raise APIError("the model failed while decoding; nothing was charged", status=500, type="server_error")
        return Response(status_code=499)
    _observe_ttft(server, served, choices)
    response = _build_response(served, body, chat, choices, usage, rid, created)
    payload = response.model_dump()
    payload["usage"]["cost_micros"] = await server.settle(
        request, res, Usage(usage.prompt_tokens, usage.completion_tokens, _queue_ms(choices), _compute_ms(choices)),
        route, payload)
    return JSONResponse(payload, headers=headers)


def _absorb(choice: _Choice, ev: TokenEvent) -> None:
    if ev.token_id is not None:
        choice.tokens.append((ev.token_id, ev.logprob, ev.top_logprobs))
    choice.text += ev.text
    if ev.finish_reason is not None:
        choice.finish_reason = ev.finish_reason


def _usage(choices: list[_Choice], prompt_tokens: int, delivered: bool = False) -> P.UsageInfo:
    completion = sum(c.delivered_tokens if delivered else len(c.tokens) for c in choices)
    return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)


def _queue_ms(choices: list[_Choice]) -> int:
    return max((c.request.queue_ms for c in choices if c.request is not None), default=0)


def _compute_ms(choices: list[_Choice]) -> int:
    return sum(c.request.compute_ms for c in choices if c.request is not None)


def _observe_ttft(server: Server, served: ServedModel, choices: list[_Choice]) -> None:
    for c in choices:
        r = c.request
        if r is not None and r.first_token is not None:
            server.metrics.ttft.labels(served.id).observe(r.first_token - r.submitted)


async def _watch_disconnect(request: Request, choices: list[_Choice]) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            for c in choices:
                c.request.cancel()
            return


def _token_text(served: ServedModel, token_id: int) -> str:
    return served.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(served: ServedModel, tokens: list) -> P.ChoiceLogprobs:
    content = []
    for tok, lp, top in tokens:
        text = _token_text(served, tok)
        content.append(P.TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=[
            P.TopLogprob(token=_token_text(served, t), logprob=v, bytes=list(_token_text(served, t).encode()))
            for t, v in (top or [])]))
    return P.ChoiceLogprobs(content=content)


def _completion_logprobs(served: ServedModel, tokens: list, offset: int) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for tok, lp, top in tokens:
        text = _token_text(served, tok)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append({_token_text(served, t): v for t, v in top} if top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _finish(reason: Optional[str]) -> Optional[str]:
    return reason if reason in ("stop", "length") else None


def _build_response(served: ServedModel, body, chat: bool, choices: list[_Choice], usage: P.UsageInfo, rid: str,
                    created: int):
    if chat:
        return P.ChatCompletionResponse(id=rid, created=created, model=served.id, usage=usage, choices=[
            P.ChatCompletionChoice(index=c.index, message=P.AssistantMessage(content=c.text),
                                   finish_reason=_finish(c.finish_reason),
                                   logprobs=_chat_logprobs(served, c.tokens) if body.logprobs else None)
            for c in choices])
    out = []
    for c in choices:
        prefix = served.tokenizer.decode(c.prompt_ids) if body.echo else ""
        out.append(P.CompletionChoice(index=c.index, text=prefix + c.text, finish_reason=_finish(c.finish_reason),
                                      logprobs=_completion_logprobs(served, c.tokens, len(prefix))
                                      if body.logprobs is not None else None))
    return P.CompletionResponse(id=rid, created=created, model=served.id, usage=usage, choices=out)


def _chunk(chat: bool, rid: str, created: int, model: str, index: int, text: Optional[str] = None,
           role: bool = False, finish: Optional[str] = None, logprobs=None):
    if chat:
        delta = P.DeltaMessage(role="assistant" if role else None, content=text)
        return P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            P.ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])
    return P.CompletionResponse(id=rid, created=created, model=model, choices=[
        P.CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)])


def _usage_chunk(chat: bool, rid: str, created: int, model: str, usage: P.UsageInfo):
    if chat:
        return P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
    return P.CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)


class _TokenChunks:
    """The SSE line of a plain token chunk, built without a pydantic model per token: pydantic
    renders each choice's chunk once with a placeholder text, and every token fills the placeholder
    with one ``json.dumps`` — the same bytes ``_chunk(...).model_dump_json()`` gives, at a fraction
    of the cost (at 32 streams this was the largest share of the server's CPU per token)."""

    SLOT = "zenlm-token-slot-" + secrets.token_hex(8)

    def __init__(self, chat: bool, rid: str, created: int, model: str):
        self.chat, self.rid, self.created, self.model = chat, rid, created, model
        self.parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self.parts.get(index)
        if parts is None:
            rendered = _sse(_chunk(self.chat, self.rid, self.created, self.model, index, self.SLOT))
            head, _, tail = rendered.partition(json.dumps(self.SLOT))
            parts = self.parts[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


async def _stream(server: Server, request: Request, served: ServedModel, body, chat: bool, choices: list[_Choice],
                  events: asyncio.Queue, res: Reservation, rid: str, created: int, route: str) -> AsyncIterator[str]:
    settled = False
    prompt_tokens = sum(len(c.prompt_ids) for c in choices[::body.n])
    try:
        if chat:
            for c in choices:
                yield _sse(_chunk(chat, rid, created, served.id, c.index, "", role=True))
        elif body.echo:
            for c in choices:
                yield _sse(_chunk(chat, rid, created, served.id, c.index, served.tokenizer.decode(c.prompt_ids)))
        token_chunk = _TokenChunks(chat, rid, created, served.id)
        while any(c.finish_reason is None for c in choices):
            arrived = [await events.get()]
            while not events.empty():  # everything that came meanwhile goes out in one write
                arrived.append(events.get_nowait())
            out = []
            for k, ev in arrived:
                c = choices[k]
                _absorb(c, ev)
                if ev.token_id is None:
                    continue
                if ev.logprob is not None:
                    lp = (_chat_logprobs(served, [c.tokens[-1]]) if chat
                          else _completion_logprobs(served, [c.tokens[-1]], len(c.text) - len(ev.text)))
                    out.append(_sse(_chunk(chat, rid, created, served.id, k, ev.text, logprobs=lp)))
                elif ev.text:
                    out.append(token_chunk(k, ev.text))
            if out:
                yield "".join(out)
            for k, _ in arrived:
                choices[k].delivered_tokens = len(choices[k].tokens)
        if any(c.finish_reason == "error" for c in choices):
            raise RuntimeError("the engine failed while decoding")
        usage = _usage(choices, prompt_tokens)
        _observe_ttft(server, served, choices)
        full = _build_response(served, body, chat, choices, usage, rid, created).model_dump()
        # the row is written before the response completes: a delivered response always has its row
        usage.cost_micros = await server.settle(
            request, res, Usage(usage.prompt_tokens, usage.completion_tokens, _queue_ms(choices),
                                _compute_ms(choices)), route, full)
        settled = True
        for c in choices:
            yield _sse(_chunk(chat, rid, created, served.id, c.index, None if chat else "",
                              finish=_finish(c.finish_reason)))
        if body.include_usage:
            yield _sse(_usage_chunk(chat, rid, created, served.id, usage))
        yield "data: [DONE]\n\n"
    finally:
        if not settled:  # the client left (or we failed): stop decoding, bill only what was sent
            for c in choices:
                c.request.cancel()
            delivered = sum(c.delivered_tokens for c in choices)
            usage = Usage(prompt_tokens, delivered, _queue_ms(choices), _compute_ms(choices), "disconnected")
            threading.Thread(target=server._settle_sync, daemon=True,
                             args=(request.state.request_id, res, usage, route, None, delivered > 0)).start()


def _replay(stored: dict, body, chat: bool):
    """A retried Idempotency-Key gets the stored response again, streamed if asked, charged nothing."""
    if not body.stream:
        return JSONResponse(stored)
    rid, created, model = stored["id"], stored["created"], stored["model"]
    usage = P.UsageInfo(**stored["usage"])

    def chunks():
        for c in stored["choices"]:
            if chat:
                yield _sse(_chunk(True, rid, created, model, c["index"], "", role=True))
                yield _sse(_chunk(True, rid, created, model, c["index"], c["message"]["content"]))
            else:
                yield _sse(_chunk(False, rid, created, model, c["index"], c["text"]))
        for c in stored["choices"]:
            yield _sse(_chunk(chat, rid, created, model, c["index"], None if chat else "", finish=c["finish_reason"]))
        if body.include_usage:
            yield _sse(_usage_chunk(chat, rid, created, model, usage))
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


# --------------------------------------------------------------------------- the app
def create_app(catalog: ModelCatalog, billing: Billing, config: Optional[ServeConfig] = None) -> FastAPI:
    """The FastAPI app (wrapped in the body-size/request-id gate) for a catalog and a billing database."""
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    server = Server(catalog, billing, config)

    @asynccontextmanager
    async def lifespan(app):
        catalog.start()
        await run_in_threadpool(billing.sweep)
        task = asyncio.create_task(_housekeeping(billing, config.lease_s))
        try:
            yield
        finally:
            task.cancel()
            catalog.stop()

    app = FastAPI(title="zenlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for zenlm models, with keys, plans, budgets and a usage ledger.")
    app.state.server = server

    # -------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        try:  # a client learns that its key is wrong before what is wrong with its body, as with OpenAI
            if request.url.path.startswith("/admin/"):
                server.check_admin(request)
            elif request.url.path.startswith("/v1/"):
                await server.authenticate(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = "we could not parse the JSON body of your request (it is not valid JSON)", None
        else:
            where = ".".join(loc)
            msg = first.get("msg", "invalid value").removeprefix("Value error, ")
            message = f"{where}: {msg}" if where else msg
            param = where or None
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(InvalidRequest(message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(str(exc.detail) if exc.status_code != 404 else f"no route {request.method} {request.url.path}",
                       status=exc.status_code, type="invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(APIError("the server had an error while processing your request", status=500,
                                     type="server_error").body(), status_code=500)

    responses = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}

    # -------------------------------------------------------------- models, health, metrics, playground
    @app.get("/v1/models", response_model=P.ModelList, responses=responses)
    async def list_models(request: Request):
        await server.authenticate(request)  # as OpenAI: listing models needs a key
        return P.ModelList(data=[P.ModelCard(id=m.id, kind=m.kind, context_length=m.context_length)
                                 for m in catalog.models.values()])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=responses)
    async def get_model(model_id: str, request: Request):
        await server.authenticate(request)
        m = catalog.get(model_id)
        return P.ModelCard(id=m.id, kind=m.kind, context_length=m.context_length)

    @app.get("/health", response_model=P.HealthResponse)
    async def health():
        engines = [m.engine for m in catalog.models.values() if m.engine is not None]
        return P.HealthResponse(models=list(catalog.models), queue_depth=sum(e.queue_depth for e in engines),
                                running=sum(e.batch_size for e in engines))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # -------------------------------------------------------------- the model routes
    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=responses)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await generate(server, request, body, chat=True)

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=responses)
    async def completions(body: P.CompletionRequest, request: Request):
        return await generate(server, request, body, chat=False)

    @app.post("/v1/embeddings", response_model=P.EmbeddingResponse, responses=responses)
    async def embeddings(body: P.EmbeddingRequest, request: Request):
        key = await server.authenticate(request)
        served = catalog.get(body.model, "embed")
        rows = tokenize_inputs(served, body.inputs)
        tokens = sum(len(r) for r in rows)
        res, stored = await server.begin(request, key, served.id, tokens, 0)
        if stored is not None:
            return JSONResponse(stored)
        try:
            start = time.perf_counter()
            vectors = await run_in_threadpool(embed_rows, served, rows, body.dimensions)
            compute_ms = int(1000 * (time.perf_counter() - start)) + 1
        except BaseException:
            await run_in_threadpool(billing.release, res)
            raise
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        response = P.EmbeddingResponse(model=served.id, usage=P.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                                       data=[P.EmbeddingData(index=i, embedding=e) for i, e in enumerate(data)])
        payload = response.model_dump()
        payload["usage"]["cost_micros"] = await server.settle(request, res, Usage(tokens, 0, 0, compute_ms),
                                                              "/v1/embeddings", payload)
        return JSONResponse(payload, headers=res.headers)

    @app.post("/v1/translations", response_model=P.TranslationResponse, responses=responses)
    async def translations(body: P.TranslationRequest, request: Request):
        key = await server.authenticate(request)
        served = catalog.get(body.model, "translate")
        languages = served.model.config.extra.get("languages") if isinstance(served.model.config.extra, dict) else None
        for name in ("source_language", "target_language"):
            value = getattr(body, name)
            if languages and value is not None and value not in languages:
                raise InvalidRequest(f"{name}={value!r} is not one this model translates ({', '.join(languages)})",
                                     param=name)
        rows = [served.encode(t) for t in body.inputs]
        limit = served.context_length
        for i, r in enumerate(rows):
            if len(r) > limit:
                raise InvalidRequest(f"input {i} has {len(r)} tokens; this model reads at most {limit}",
                                     param="input", code="context_length_exceeded")
        max_tokens = body.max_tokens or min(limit - 1, 2 * max(len(r) for r in rows) + 16)
        if max_tokens + 1 > limit:
            raise InvalidRequest(f"max_tokens={max_tokens} exceeds this model's output window of {limit - 1}",
                                 param="max_tokens", code="context_length_exceeded")
        prompt_tokens = sum(len(r) for r in rows)
        batched = body.num_beams == 1 and served.engine is not None
        res, stored = await server.begin(request, key, served.id, prompt_tokens, max_tokens * len(rows),
                                         room=lambda: served.engine.check_room(len(rows), key.key_id) if batched
                                         else None)
        if stored is not None:
            return JSONResponse(stored)
        queue_ms = 0
        try:
            if batched:  # greedy: joins the running batch
                out, queue_ms, compute_ms = await _engine_translate(server, request, served, rows, max_tokens,
                                                                    key.key_id)
            else:  # beam search: one request at a time through zenlm.generate
                start = time.perf_counter()
                out = await run_in_threadpool(_translate, served, rows, body.num_beams, max_tokens)
                compute_ms = int(1000 * (time.perf_counter() - start)) + 1
        except BaseException:
            await run_in_threadpool(billing.release, res)
            raise
        if out is None:  # the client left before the translation was sent: nothing to charge
            await server.settle(request, res, Usage(prompt_tokens, 0, queue_ms, compute_ms, "disconnected"),
                                "/v1/translations", None, billable=False)
            return Response(status_code=499)
        completion = sum(len(g.token_ids) for g in out)
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                            total_tokens=prompt_tokens + completion)
        response = P.TranslationResponse(model=served.id, usage=usage, data=[
            P.TranslationData(index=i, text=g.text, finish_reason=g.finish_reason) for i, g in enumerate(out)])
        payload = response.model_dump()
        payload["usage"]["cost_micros"] = await server.settle(
            request, res, Usage(prompt_tokens, completion, queue_ms, compute_ms), "/v1/translations", payload)
        return JSONResponse(payload, headers=res.headers)

    @app.post("/v1/search", response_model=P.SearchResponse, responses=responses)
    async def search(body: P.SearchRequest, request: Request):
        key = await server.authenticate(request)
        served = catalog.get(body.model, "search")
        tokens = len(body.query.split())  # metered in words: the index may be BM25-only, with no tokenizer
        res, stored = await server.begin(request, key, served.id, tokens, 0)
        if stored is not None:
            return JSONResponse(stored)
        try:
            start = time.perf_counter()
            hits = await run_in_threadpool(_user_error, served.index.search, body.query, body.k, body.mode)
            compute_ms = int(1000 * (time.perf_counter() - start)) + 1
        except BaseException:
            await run_in_threadpool(billing.release, res)
            raise
        response = P.SearchResponse(model=served.id, usage=P.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                                    data=[P.SearchHit(index=i, id=h.id, score=h.score, title=_hit_title(h),
                                                      text=h.text) for i, h in enumerate(hits)])
        payload = response.model_dump()
        payload["usage"]["cost_micros"] = await server.settle(request, res, Usage(tokens, 0, 0, compute_ms),
                                                              "/v1/search", payload)
        return JSONResponse(payload, headers=res.headers)

    # -------------------------------------------------------------- admin
    @app.get("/admin/plans", response_model=P.PlanList, responses=responses)
    async def admin_plans(request: Request):
        server.check_admin(request)
        return P.PlanList(data=[_plan_out(p) for p in await run_in_threadpool(billing.list_plans)])

    @app.post("/admin/plans", response_model=P.PlanOut, responses=responses)
    async def admin_create_plan(body: P.PlanIn, request: Request, replace: bool = False):
        server.check_admin(request)
        prices = {m: (p.prompt_micros_per_million, p.completion_micros_per_million) for m, p in body.prices.items()}
        plan = await run_in_threadpool(_user_error, billing.create_plan, body.name, prices, body.included_tokens,
                                       body.monthly_budget_micros, body.requests_per_minute, body.tokens_per_minute,
                                       replace)
        return _plan_out(plan)

    @app.get("/admin/keys", response_model=P.KeyList, responses=responses)
    async def admin_keys(request: Request, customer: Optional[str] = None):
        server.check_admin(request)
        return P.KeyList(data=[P.KeyOut(**k) for k in await run_in_threadpool(billing.list_keys, customer)])

    @app.post("/admin/keys", response_model=P.KeyCreated, responses=responses)
    async def admin_create_key(body: P.KeyIn, request: Request):
        server.check_admin(request)
        key, record = await run_in_threadpool(_user_error, billing.create_key, body.customer, body.plan,
                                              body.expires_in_days)
        return P.KeyCreated(key=key, **record)

    @app.delete("/admin/keys/{prefix}", response_model=P.KeyOut, responses=responses)
    async def admin_revoke_key(prefix: str, request: Request):
        server.check_admin(request)
        return P.KeyOut(**await run_in_threadpool(_user_error, billing.revoke_key, prefix))

    @app.get("/admin/billing/report", response_model=P.BillingReport, responses=responses)
    async def admin_report(request: Request, month: str = Query(pattern=r"^\d{4}-\d{2}$"), by: str = "customer"):
        server.check_admin(request)
        return P.BillingReport(**await run_in_threadpool(_user_error, billing.report, month, by))

    return Gate(app, server.metrics, config.max_body_bytes)  # type: ignore[return-value]


def _hit_title(hit) -> str:
    """What to call a search hit: its title, else the first Markdown heading of its text, else the
    name of the file it came from (plain-text and Markdown corpora index files without titles)."""
    if hit.title:
        return hit.title
    metadata = hit.metadata if isinstance(hit.metadata, dict) else {}
    if isinstance(metadata.get("title"), str) and metadata["title"].strip():
        return metadata["title"].strip()
    for line in hit.text.splitlines():
        heading = line.strip()
        if heading.startswith("#") and heading.lstrip("#").strip():
            return heading.lstrip("#").strip()
    if isinstance(metadata.get("path"), str) and metadata["path"]:
        return Path(metadata["path"]).name
    return hit.id.split("#")[0]


def _user_error(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _plan_out(plan) -> P.PlanOut:
    return P.PlanOut(name=plan.name, included_tokens=plan.included_tokens,
                     monthly_budget_micros=plan.monthly_budget_micros, requests_per_minute=plan.requests_per_minute,
                     tokens_per_minute=plan.tokens_per_minute,
                     prices={m: P.ModelPrice(prompt_micros_per_million=p, completion_micros_per_million=c)
                             for m, (p, c) in plan.prices.items()})


async def _engine_translate(server: Server, request: Request, served: ServedModel, rows: list[list[int]],
                            max_tokens: int, owner: int):
    """Greedy translation of each input as a row of the continuous batch; (generations, queue ms,
    compute ms), with generations None when the client left first."""
    from ..generate import Generation

    mailbox = server.mailbox(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    choices = []
    for i, ids in enumerate(rows):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[served.model.config.eos_token_id])
        choice = _Choice(i, ids)
        choice.request = EngineRequest(ids, params, lambda ev, k=i: mailbox.post(events, (k, ev)),
                                       request_id=request.state.request_id)
        choices.append(choice)
    served.engine.submit_all([c.request for c in choices], owner=owner)  # all or none
    watcher = asyncio.create_task(_watch_disconnect(request, choices))
    try:
        while any(c.finish_reason is None for c in choices):
            k, ev = await events.get()
            _absorb(choices[k], ev)
    finally:
        watcher.cancel()
    if any(c.finish_reason == "error" for c in choices):
        raise APIError("the model failed while decoding; nothing was charged", status=500, type="server_error")
    out = None if any(c.finish_reason == "cancelled" for c in choices) else [
        Generation([t for t, _, _ in c.tokens], text=c.text, finish_reason=c.finish_reason) for c in choices]
    return out, _queue_ms(choices), _compute_ms(choices)


def _translate(served: ServedModel, rows: list[list[int]], num_beams: int, max_tokens: int):
    from ..generate import Generator

    with served.lock:
        return Generator(served.model, served.tokenizer).generate(rows, num_beams=num_beams,
                                                                  max_new_tokens=max_tokens).generations


async def _housekeeping(billing: Billing, lease_s: float) -> None:
    """Renew this process's leases and give back those of dead processes."""
    while True:
        await asyncio.sleep(max(0.5, lease_s / 3))
        try:
            await run_in_threadpool(billing.renew_leases)
            await run_in_threadpool(billing.sweep)
        except Exception:
            log.exception("lease housekeeping failed")


# --------------------------------------------------------------------------- building and running
def build_server(config: ServeConfig):
    """Load the models and open the database; returns the ASGI app."""
    from .catalog import load_embedder, load_generator, load_index

    if not config.models and not config.embeddings and not config.indexes:
        raise ValueError("nothing to serve: give at least one model folder (or --embeddings DIR)")
    catalog = ModelCatalog()
    for spec in config.models:
        catalog.add(load_generator(spec, config.max_batch_size, config.max_queue))
    for spec in config.embeddings:
        catalog.add(load_embedder(spec))
    for spec in config.indexes:
        catalog.add(load_index(spec))
    billing = Billing.open(config.database, hardware_micros_per_hour=to_micros(config.hardware_price_per_hour),
                           lease_s=config.lease_s)
    return create_app(catalog, billing, config)


def demo_setup(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, customer: str = "demo",
               plan: str = "demo", model: Optional[str] = None) -> dict:
    """Make a demo plan (1.00 / 2.00 per million prompt / completion tokens, 100,000 included tokens,
    a 10.00 monthly budget) if it is missing, and a fresh key for ``customer`` on it. Returns the
    key, the playground URL and a curl line that works against ``serve(config, host, port)``."""
    import shlex

    billing = Billing.open(config.database)
    if plan not in {p.name for p in billing.list_plans()}:
        billing.create_plan(plan, {"*": (1_000_000, 2_000_000)}, included_tokens=100_000,
                            monthly_budget_micros=10_000_000, requests_per_minute=120, tokens_per_minute=200_000)
    key, _ = billing.create_key(customer, plan)
    if model is None and config.models:
        spec = config.models[0]
        model = spec.partition("=")[0] if "=" in spec and not Path(spec).is_dir() else Path(spec).resolve().name
    url = f"http://{host}:{port}"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    curl = (f"curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
    return {"key": key, "url": url + "/", "curl": curl, "model": model}


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted.

    The engine thread gives up the GIL inside every torch op of a decoding step and must take it
    back from the event loop afterwards; with Python's default 5 ms switch interval a busy loop
    (32 streams writing) kept it waiting that long many times a step. A shorter interval
    (ZENLM_GIL_SWITCH_INTERVAL seconds, default 0.001) lets it back in sooner."""
    import os
    import sys

    import uvicorn

    interval = os.environ.get("ZENLM_GIL_SWITCH_INTERVAL", "0.001")
    try:
        sys.setswitchinterval(float(interval))
    except ValueError:
        raise ValueError(f"ZENLM_GIL_SWITCH_INTERVAL={interval!r} must be a positive number of seconds") from None
    app = build_server(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
