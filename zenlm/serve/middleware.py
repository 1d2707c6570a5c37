"""The outermost ASGI layer of the server: request ids, the body-size limit, request metrics."""
from __future__ import annotations

import secrets
import time

from fastapi.responses import JSONResponse

from .errors import PayloadTooLarge
from .metrics import Metrics



def replaying(body: bytes, receive):
    """An ASGI ``receive`` that hands over ``body`` (already read whole) once, then the real one's
    messages (a disconnect): for the app behind a middleware that had to read the body first."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay

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
                await self._run(scope, replaying(body, receive), send_with_id, status)
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
