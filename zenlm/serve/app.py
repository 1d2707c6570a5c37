"""The server's wiring: build the FastAPI app, mount the routes, add the gate (request ids, body
limit, request metrics) and the error handlers, and run the engine and the lease housekeeping for
the app's lifetime.

Where the rest lives: the wire format in protocol.py; the handlers in routes/ (one module per
area); the one authenticate -> reserve -> run -> settle path in metering.py; the shared state and
``ServeConfig`` in server.py; the continuous-batching engine in engine.py; keys, plans and the
ledger in billing.py and store.py.

Limits a client meets: a body of at most ``max_body_bytes`` (413, with or without
Content-Length); an Idempotency-Key of 1-255 characters; at most ``MAX_SEQUENCES`` (128) sequences
decoded per request (prompts x n for /v1/completions, n for chat, inputs for translations) and
2,048 inputs per /v1/embeddings request (400); a request whose sequences do not fit the engine's
free room is refused as a whole before it is charged (503), and one key may hold at most
``max_batch_size + max_queue // 2`` sequences at once (429), so others always get a turn.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .billing import Billing, to_micros
from .catalog import ModelCatalog
from .errors import APIError, InvalidRequest
from .middleware import Gate
from .routes import admin, chat, completions, embeddings, health, models, search, translations
from .server import MAX_BODY_BYTES, ServeConfig, Server

__all__ = ["MAX_BODY_BYTES", "ServeConfig", "Server", "build_server", "create_app", "serve"]

log = logging.getLogger("zenlm.serve")
ROUTERS = (models, health, chat, completions, embeddings, translations, search, admin)


def create_app(catalog: ModelCatalog, billing: Billing, config: Optional[ServeConfig] = None,
               upstreams: Sequence = ()) -> FastAPI:
    """The FastAPI app (wrapped in the body-size/request-id gate) for a catalog and a billing database;
    ``upstreams`` (``upstream.Upstream``) are models served elsewhere, sold through this app."""
    from contextlib import asynccontextmanager

    from . import upstream as U

    config = config or ServeConfig()
    by_name = {}
    for up in upstreams:
        catalog.add_upstream(up)
        by_name[up.name] = up
    server = Server(catalog, billing, config)
    if by_name:
        U.instrument(by_name, server.metrics.registry)

    @asynccontextmanager
    async def lifespan(app):
        catalog.start()
        await run_in_threadpool(billing.sweep)
        task = asyncio.create_task(_housekeeping(billing, config.lease_s))
        health = asyncio.create_task(U.health_loop(by_name)) if by_name else None
        try:
            yield
        finally:
            task.cancel()
            if health is not None:
                health.cancel()
            for up in by_name.values():
                await up.close()
            catalog.stop()

    app = FastAPI(title="zenlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for zenlm models, with keys, plans, budgets and a usage ledger.")
    app.state.server = server
    app.state.upstreams = by_name
    for module in ROUTERS:
        app.include_router(module.router)
    if by_name:  # an upstream model's requests go to the gateway's route (upstream.py)
        app.include_router(U.router)
        app.add_middleware(U.UpstreamDispatch, upstreams=by_name)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return Gate(app, server.metrics, config.max_body_bytes)  # type: ignore[return-value]


# --------------------------------------------------------------------------- errors, as OpenAI words them
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    server: Server = request.app.state.server
    try:  # a client learns that its key is wrong before what is wrong with its body, as with OpenAI
        if request.url.path.startswith("/admin/"):
            server.check_admin(request)
        elif request.url.path.startswith("/v1/"):
            await server.meter.authenticate(request)
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


async def _http_error(request: Request, exc: StarletteHTTPException):
    err = APIError(str(exc.detail) if exc.status_code != 404 else f"no route {request.method} {request.url.path}",
                   status=exc.status_code, type="invalid_request_error")
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return JSONResponse(APIError("the server had an error while processing your request", status=500,
                                 type="server_error").body(), status_code=500)


# --------------------------------------------------------------------------- leases
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
def build_server(config: ServeConfig, upstreams: Sequence = ()):
    """Load the models and open the database; returns the ASGI app. ``upstreams``: models served by
    other OpenAI-compatible servers (``upstream.parse_upstream``)."""
    from .catalog import load_embedder, load_generator, load_index

    if not config.models and not config.embeddings and not config.indexes and not upstreams:
        raise ValueError("nothing to serve: give at least one model folder (or --embeddings DIR, or --upstream)")
    catalog = ModelCatalog()
    for spec in config.models:
        catalog.add(load_generator(spec, config.max_batch_size, config.max_queue))
    for spec in config.embeddings:
        catalog.add(load_embedder(spec))
    for spec in config.indexes:
        catalog.add(load_index(spec))
    billing = Billing.open(config.database, hardware_micros_per_hour=to_micros(config.hardware_price_per_hour),
                           lease_s=config.lease_s)
    return create_app(catalog, billing, config, upstreams)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          upstreams: Sequence = ()) -> None:
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
    app = build_server(config, upstreams)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
