"""The gateway: models served by other OpenAI-compatible servers (vLLM, TGI, llama.cpp, another
zenlm), sold through zenlm's keys, plans, budgets and ledger.

``zenlm serve --upstream NAME=URL[,URL...][;option=value...]`` registers NAME. A request for it
takes the same metered path as a local model (``metering``: authenticate -> reserve -> run ->
settle), only the run is a call to one of the upstream's replicas:

- the request is authenticated (401 before any upstream is contacted), rate-limited and its worst
  case reserved: the prompt counted as its UTF-8 bytes plus a few tokens per message (no tokenizer
  makes more tokens than bytes) and ``max_tokens`` (``max_tokens`` option when the client gives
  none, and then sent upstream, so the reservation bounds what the upstream may generate);
- the body goes upstream as sent (``stream_options.include_usage`` added to streams); a JSON answer
  comes back whole, a stream is relayed event by event as it arrives;
- it is settled from the upstream's ``usage``; an upstream that reports none is counted here, with
  the tokenizer given (``tokenizer=FOLDER`` / ``--upstream-tokenizer``, marked ``local-tokenizer``)
  or else, for a stream, one token per content chunk and for a JSON answer the UTF-8 bytes (an
  upper bound, marked ``local-bytes``); the ledger row's ``counted`` column says which;
- replicas: least outstanding requests first (ties in the order given); a replica that refuses the
  connection, times out or answers 5xx before anything reached the client is set aside for
  ``eject_s`` seconds and the next one is tried; a 4xx is passed on (no charge); when every replica
  failed: 502 (504 for a timeout), no charge. A replica that dies mid-stream ends the stream with an
  ``error`` event and the customer pays for the tokens delivered;
- per upstream: ``timeout`` (seconds for connect and between bytes), ``concurrency`` (requests in
  flight at once in this process, 503 beyond), ``price`` (the upstream hardware's cost per hour and
  replica, split across the requests in flight by their share of its busy time, as the compute cost
  of the row); the same options in a YAML catalog (``--catalog``); see ``upstream_config.py``;
- every replica is checked at start (one that does not answer is reported and set aside, not
  fatal) and every ``health`` seconds after (re-admitted when it answers again).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .billing import Usage
from .errors import APIError, InvalidRequest
from .middleware import replaying
from .upstream_config import (Replica, Upstream, counting_tokenizer, httpx, load_catalog,  # noqa: F401 (re-exported)
                              make_upstream, parse_upstream)

log = logging.getLogger("zenlm.serve.upstream")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
INTERNAL = "/v1/_upstream"  # where the dispatch sends an upstream model's requests
SCOPE_KEY = "zenlm.upstream"
PER_MESSAGE_TOKENS = 8  # a chat template's role and separator tokens, per message, in the reservation


# --------------------------------------------------------------------------- dispatch
class UpstreamDispatch:
    """ASGI middleware inside the app: a POST to a generation or embedding route whose ``model`` is
    an upstream's goes to the gateway's route; everything else passes by untouched."""

    def __init__(self, app, upstreams: dict):
        self.app, self.upstreams = app, upstreams

    async def __call__(self, scope, receive, send):
        if (not self.upstreams or scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in ROUTES):
            return await self.app(scope, receive, send)
        parts = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        model = None
        try:
            parsed = json.loads(body)
            model = parsed.get("model") if isinstance(parsed, dict) else None
        except ValueError:
            pass
        if isinstance(model, str) and model in self.upstreams:
            scope = dict(scope)
            scope[SCOPE_KEY] = (model, scope["path"], parsed)
            scope["path"] = INTERNAL + scope["path"]
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, replaying(body, receive), send)


router = APIRouter(include_in_schema=False)


def _bad_gateway(name: str, why: str, timeout: bool = False) -> APIError:
    return APIError(f"the upstream {name!r} did not answer: {why}; nothing was charged",
                    status=504 if timeout else 502, type="server_error")


def _overloaded(name: str) -> APIError:
    return APIError(f"the upstream {name!r} has as many requests in flight as it takes; retry shortly",
                    status=503, type="server_error", headers={"retry-after": "1"})


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return json.dumps(content)


@dataclass
class Plan:
    """What a request asks of the upstream, and its worst case for the reservation."""

    route: str
    body: dict
    prompt_text: str
    prompt_bound: int
    max_completion: int
    stream: bool
    include_usage: bool
    messages: Optional[list] = None  # a chat's messages, for counting its prompt through the chat template


def _plan(up: Upstream, route: str, body: dict) -> Plan:
    body = dict(body)
    if up.remote_model:
        body["model"] = up.remote_model
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise InvalidRequest(f"n must be an integer in [1, 128], got {n!r}", param="n")
    if route == "/v1/embeddings":
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        text = "".join(x if isinstance(x, str) else json.dumps(x) for x in inputs)
        bound = len(text.encode()) + 2 * len(inputs)
        return Plan(route, body, text, bound, 0, False, False)
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        text = "".join(_text_of(m.get("content")) if isinstance(m, dict) else "" for m in messages)
        extra = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages if isinstance(m, dict)])
        for k in ("tools", "response_format"):
            if body.get(k) is not None:
                extra += json.dumps(body[k])
        bound = len(text.encode()) + len(extra.encode()) + PER_MESSAGE_TOKENS * len(messages)
        prompts = 1
    else:
        prompt = body.get("prompt")
        prompts_list = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt) \
            else [prompt]
        text = "".join(p if isinstance(p, str) else json.dumps(p) for p in prompts_list)
        bound = len(text.encode()) + 2 * len(prompts_list)
        prompts = len(prompts_list)
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is None:
        asked = up.max_tokens
        body["max_tokens"] = asked
        if route == "/v1/chat/completions":
            body.pop("max_completion_tokens", None)
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {asked!r}", param="max_tokens")
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    messages = body.get("messages") if route == "/v1/chat/completions" else None
    return Plan(route, body, text, bound, asked * n * prompts, stream, include_usage, messages)


@router.post(INTERNAL + "/{path:path}")
async def upstream_route(request: Request, path: str):
    found = request.scope.get(SCOPE_KEY)
    if found is None:
        raise APIError(f"no route POST {request.url.path}", status=404, type="invalid_request_error")
    name, route, body = found
    server = request.app.state.server
    upstreams = request.app.state.upstreams
    key = await server.meter.authenticate(request)  # 401 before anything is sent anywhere
    up: Upstream = upstreams[name]
    plan = _plan(up, route, body)
    if up.in_flight >= up.concurrency:
        raise _overloaded(name)
    up.in_flight += 1
    handed_over = False
    try:
        ticket = await server.meter.reserve(request, key, route, name, plan.prompt_bound, plan.max_completion)
        if ticket.replay is not None:  # a stored answer for a retried Idempotency-Key, charged nothing
            return _replay(ticket.replay, plan) if plan.stream else JSONResponse(ticket.replay)
        if not plan.stream:
            return await server.meter.answer(ticket, lambda: _answer(up, plan, request))
        try:
            opened = await _open_stream(up, plan)
        except BaseException:
            await ticket.release()
            raise
        handed_over = True
        return _Relay(up, ticket, opened, _relay(up, plan, ticket, opened), media_type="text/event-stream",
                      headers={**ticket.headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    finally:
        if not handed_over:
            up.in_flight -= 1


class _Relay(StreamingResponse):
    """The relayed stream's response; once it is over, whatever its generator did not clean up is:
    a client gone before the first byte never starts the generator (its reservation is given back,
    the replica's slot freed), and one gone mid-stream leaves it suspended (closed here, so it
    bills what was sent at once rather than when it is collected)."""

    def __init__(self, up: Upstream, ticket, opened: "Opened", content, **kwargs):
        super().__init__(content, **kwargs)
        self.up, self.ticket, self.opened, self.generator = up, ticket, opened, content

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.opened.relayed:  # the client left before the relay began
                self.opened.relayed = True
                self.up.end(self.opened.replica, self.opened.share)
                self.up.in_flight -= 1
                try:
                    await self.opened.response.aclose()
                finally:
                    await self.ticket.release()
            await self.generator.aclose()


def _replay(stored: dict, plan: Plan) -> StreamingResponse:
    """A stored answer streamed again: each choice's text in one chunk, then its finish."""
    chat = plan.route == "/v1/chat/completions"
    base = {"id": stored.get("id"), "created": stored.get("created"), "model": stored.get("model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunks():
        for c in stored.get("choices") or []:
            if chat:
                message = c.get("message") or {}
                delta = {"role": "assistant", "content": message.get("content")}
                if message.get("tool_calls"):
                    delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                piece = {"index": c.get("index", 0), "delta": delta, "finish_reason": None}
            else:
                piece = {"index": c.get("index", 0), "text": c.get("text", ""), "finish_reason": None}
            yield f"data: {json.dumps({**base, 'choices': [piece]}, ensure_ascii=False)}\n\n"
        for c in stored.get("choices") or []:
            piece = {"index": c.get("index", 0), "finish_reason": c.get("finish_reason")}
            piece.update({"delta": {}} if chat else {"text": ""})
            yield f"data: {json.dumps({**base, 'choices': [piece]})}\n\n"
        if plan.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': stored.get('usage')})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _passed_on(resp, name: str) -> APIError:
    """A 4xx from the upstream, passed on as it said it (no charge)."""
    try:
        err = resp.json().get("error") or {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
    except Exception:
        err = {}
    message = err.get("message") or f"the upstream {name!r} refused the request ({resp.status_code})"
    return APIError(str(message), status=resp.status_code, type=err.get("type") or "invalid_request_error",
                    param=err.get("param"), code=err.get("code"))


class _ClientLeft(Exception):
    pass


async def _unless_left(request: Request, coro):
    """``coro``'s result, unless the client hangs up first (checked every 0.25 s): then it is
    cancelled and _ClientLeft raised."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientLeft()
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass


async def _answer(up: Upstream, plan: Plan, request: Request):
    """The JSON answer of the first replica that gives one; a client that leaves first pays nothing."""
    from .metering import Outcome

    last, timed_out = "no replica", False
    for replica in up.order():
        share, started = up.begin(replica), time.monotonic()
        try:
            resp = await _unless_left(request, up.http().post(replica.url + plan.route, json=plan.body))
        except _ClientLeft:
            busy_ms = up.end(replica, share)
            return Outcome(Usage(0, 0, 0, busy_ms, "disconnected", upstream=f"{up.name} {replica.url}",
                                 compute_cost_micros=up.cost(busy_ms)))
        except httpx.TimeoutException as e:
            up.end(replica, share)
            up.eject(replica, f"timeout ({type(e).__name__})")
            last, timed_out = f"{replica.url} timed out", True
            continue
        except httpx.HTTPError as e:
            up.end(replica, share)
            up.eject(replica, repr(e))
            last, timed_out = f"{replica.url}: {type(e).__name__}", False
            continue
        busy_ms = up.end(replica, share)
        if resp.status_code >= 500:
            up.eject(replica, f"status {resp.status_code}")
            last, timed_out = f"{replica.url} answered {resp.status_code}", False
            continue
        up.ok(replica)
        if resp.status_code >= 400:
            raise _passed_on(resp, up.name)
        try:
            data = resp.json()
        except ValueError:
            raise _bad_gateway(up.name, "its answer is not JSON") from None
        usage, counted = _usage_of(data.get("usage"), plan.route)
        if usage is None:
            usage, counted = _count_answer(up, plan, data)
            data["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                             "total_tokens": usage[0] + usage[1]}
        if up.remote_model and isinstance(data, dict):
            data["model"] = up.name
        up.record(replica, time.monotonic() - started, usage[1])
        return Outcome(Usage(usage[0], usage[1], 0, busy_ms, counted=counted, upstream=f"{up.name} {replica.url}",
                             compute_cost_micros=up.cost(busy_ms)), data)
    raise _bad_gateway(up.name, last, timed_out)


def _usage_of(usage, route: str):
    """(prompt, completion) from an upstream's usage object, or None; counted=None (the upstream's)."""
    if not isinstance(usage, dict):
        return None, None
    p = usage.get("prompt_tokens")
    c = usage.get("completion_tokens", 0 if route == "/v1/embeddings" else None)
    if isinstance(p, int) and isinstance(c, int) and p >= 0 and c >= 0:
        return (p, c), None
    return None, None


def _count_answer(up: Upstream, plan: Plan, data: dict):
    texts = []
    for ch in data.get("choices") or []:
        if isinstance(ch, dict):
            texts.append(_text_of((ch.get("message") or {}).get("content")) if "message" in ch else
                         str(ch.get("text") or ""))
    completion_text = "".join(texts)
    if up.tokenizer is not None:
        return (up.count_prompt(plan.messages, plan.prompt_text), up.count(completion_text)), "local-tokenizer"
    return (plan.prompt_bound, len(completion_text.encode())), "local-bytes"


@dataclass
class Opened:
    replica: Replica
    share: float
    started: float
    response: object
    events: object  # the async iterator of lists of SSE data payloads (_events)
    first: list  # the first read's events, read before the client got anything
    relayed: bool = False  # the relay began (it cleans up after itself from then on)


async def _events(resp):
    """The ``data:`` payloads of an SSE response, as lists: every event that one network read
    completed (a fast upstream's read holds many), so the relay sends them on in one write."""
    buffer = ""
    async for text in resp.aiter_text():
        buffer += text
        if buffer.endswith("\r"):  # a "\r\n" may be cut between two reads: wait for its "\n"
            continue
        if "\r" in buffer:
            buffer = buffer.replace("\r\n", "\n").replace("\r", "\n")
        if "\n\n" not in buffer:
            continue
        *blocks, buffer = buffer.split("\n\n")
        payloads = [p for p in map(_data_of, blocks) if p is not None]
        if payloads:
            yield payloads
    last = _data_of(buffer.replace("\r\n", "\n"))
    if last is not None:
        yield [last]


def _data_of(block: str) -> Optional[str]:
    """An SSE event's ``data:`` lines joined (None for an event without data: a comment, a ping)."""
    data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
    return "\n".join(data) if data else None


async def _open_stream(up: Upstream, plan: Plan) -> Opened:
    """A replica's stream, open with its first event read: everything that fails before then (the
    connection, a 5xx, a timeout, a stream that ends at once) moves on to the next replica."""
    last, timed_out = "no replica", False
    for replica in up.order():
        share, started = up.begin(replica), time.monotonic()
        resp = None
        try:
            req = up.http().build_request("POST", replica.url + plan.route, json=plan.body)
            resp = await up.http().send(req, stream=True)
            if resp.status_code >= 500:
                raise _Status(resp.status_code)
            if resp.status_code >= 400:
                await resp.aread()
                up.end(replica, share)
                up.ok(replica)
                await resp.aclose()
                raise _passed_on(resp, up.name)
            events = _events(resp).__aiter__()
            first = await events.__anext__()
            up.ok(replica)
            return Opened(replica, share, started, resp, events, first)
        except APIError:
            raise
        except (httpx.HTTPError, _Status, StopAsyncIteration) as e:
            up.end(replica, share)
            if resp is not None:
                await resp.aclose()
            timed_out = isinstance(e, httpx.TimeoutException)
            why = (f"answered {e.code}" if isinstance(e, _Status) else "ended its stream at once"
                   if isinstance(e, StopAsyncIteration) else type(e).__name__)
            up.eject(replica, why)
            last = f"{replica.url} {why}"
        except BaseException:
            up.end(replica, share)
            if resp is not None:
                await resp.aclose()
            raise
    raise _bad_gateway(up.name, last, timed_out)


class _Status(Exception):
    def __init__(self, code: int):
        self.code = code


def _content_of(chunk: dict, choices: dict) -> tuple[str, int]:
    """The text a stream chunk delivers and how many of its choices carried some; ``choices``
    (index -> {"text", "finish_reason", "tool_calls"}) gathers each choice's text, finish and tool
    calls (deltas merged by their index, as the openai client does). A tool call's text is its
    name and argument pieces: what the model wrote, less the format's own tokens (never more)."""
    text, carried = [], 0
    for ch in chunk.get("choices") or []:
        if not isinstance(ch, dict):
            continue
        mine = choices.setdefault(ch.get("index", 0), {"text": [], "finish_reason": None, "tool_calls": {}})
        if ch.get("finish_reason"):
            mine["finish_reason"] = ch["finish_reason"]
        delta = ch.get("delta") or {}
        piece = delta.get("content") if "delta" in ch else ch.get("text")
        if piece and not isinstance(piece, str):
            piece = json.dumps(piece)
        if piece:
            mine["text"].append(piece)
        calls = []
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            into = mine["tool_calls"].setdefault(call.get("index", len(mine["tool_calls"])),
                                                 {"id": None, "type": "function", "name": [], "arguments": []})
            into["id"] = call.get("id") or into["id"]
            function = call.get("function") or {}
            for k in ("name", "arguments"):
                if isinstance(function.get(k), str):
                    into[k].append(function[k])
                    calls.append(function[k])
        piece = (piece or "") + "".join(calls)
        if piece:
            text.append(piece)
            carried += 1
    return "".join(text), carried


def _message_of(choice: dict) -> dict:
    """A streamed choice, whole: its content and its tool calls."""
    message = {"role": "assistant", "content": "".join(choice["text"]) or None}
    if choice["tool_calls"]:
        message["tool_calls"] = [{"id": c["id"], "type": c["type"], "function": {
            "name": "".join(c["name"]), "arguments": "".join(c["arguments"])}}
            for _, c in sorted(choice["tool_calls"].items())]
    elif message["content"] is None:
        message["content"] = ""
    return message


async def _relay(up: Upstream, plan: Plan, ticket, opened: Opened):
    """Relay the upstream's events as they come; settle from its usage before the last bytes."""
    opened.relayed = True
    state = {"chunks": 0, "text": [], "busy_ms": None}
    choices: dict = {}
    replica = opened.replica
    where = f"{up.name} {replica.url}"

    def finish() -> int:
        if state["busy_ms"] is None:
            state["busy_ms"] = up.end(replica, opened.share)
            up.in_flight -= 1
        return state["busy_ms"]

    def counted_usage(status: str) -> Usage:
        text = "".join(state["text"])
        if up.tokenizer is not None:
            p, c, how = up.count_prompt(plan.messages, plan.prompt_text), up.count(text), "local-tokenizer"
        else:
            p, c, how = plan.prompt_bound, state["chunks"], "local-chunks"
        busy = finish()
        return Usage(p, c, 0, busy, status, counted=how, upstream=where, compute_cost_micros=up.cost(busy))

    def sent() -> Usage:
        return counted_usage("disconnected")

    def stop() -> None:
        finish()

    try:
        with ticket.streaming(sent, stop):
            usage_chunk, last_chunk = None, None
            batch, events = opened.first, opened.events
            error, done = None, False
            while not done:
                if batch is None:
                    try:
                        batch = await events.__anext__()
                    except StopAsyncIteration:
                        break
                    except httpx.HTTPError as e:
                        error = f"{type(e).__name__}"
                        break
                out, texts, carried_all = [], [], 0
                for data in batch:
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        error = str((chunk.get("error") or {}).get("message", "error")) \
                            if isinstance(chunk.get("error"), dict) else str(chunk["error"])
                        done = True
                        break
                    if chunk.get("usage") and not chunk.get("choices"):
                        usage_chunk = chunk
                        continue
                    last_chunk = chunk
                    text, carried = _content_of(chunk, choices)
                    if up.remote_model:
                        chunk["model"] = up.name
                        data = json.dumps(chunk, ensure_ascii=False)
                    if chunk.get("usage"):  # usage riding on a content chunk: keep it, send the chunk without
                        usage_chunk = {**chunk, "choices": []}
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                        data = json.dumps(chunk, ensure_ascii=False)
                    out.append(f"data: {data}\n\n")
                    texts.append(text)
                    carried_all += carried
                batch = None
                if out:  # one write for the read's events; counted once the write returned (delivered)
                    yield "".join(out)
                    state["chunks"] += carried_all
                    state["text"].extend(texts)
            if error is not None:
                up.eject(replica, f"died mid-stream: {error}")
                usage = counted_usage("upstream_error")
                await ticket.settle(usage, None, billable=usage.completion_tokens > 0)
                err = {"error": {"message": f"the upstream {up.name!r} failed mid-stream ({error}); you are charged "
                                            f"for the {usage.completion_tokens} tokens delivered",
                                 "type": "server_error", "param": None, "code": "upstream_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            got, _ = _usage_of((usage_chunk or {}).get("usage"), plan.route)
            if got is None:
                usage = counted_usage("completed")
            else:
                busy = finish()
                usage = Usage(got[0], got[1], 0, busy, counted=None, upstream=where,
                              compute_cost_micros=up.cost(busy))
            chat = plan.route == "/v1/chat/completions"
            full = {"id": (last_chunk or {}).get("id"), "created": (last_chunk or {}).get("created"),
                    "model": up.name, "object": "chat.completion" if chat else "text_completion",
                    "choices": [{"index": i, "finish_reason": c["finish_reason"],
                                 **({"message": _message_of(c)} if chat else {"text": "".join(c["text"])})}
                                for i, c in sorted(choices.items())],
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                              "total_tokens": usage.prompt_tokens + usage.completion_tokens}}
            cost = await ticket.settle(usage, full)
            up.record(replica, time.monotonic() - opened.started, usage.completion_tokens)
            if plan.include_usage:
                out = usage_chunk or {"id": (last_chunk or {}).get("id"), "object": (last_chunk or {}).get("object"),
                                      "created": (last_chunk or {}).get("created"), "model": up.name,
                                      "choices": []}
                out = {**out, "usage": {**full["usage"], "cost_micros": cost}}
                if up.remote_model:
                    out["model"] = up.name
                yield f"data: {json.dumps(out, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
    finally:
        finish()
        try:
            await opened.response.aclose()
        except Exception:
            pass


# --------------------------------------------------------------------------- health
async def health_loop(upstreams: dict) -> None:
    """Check every replica at start, reporting each that does not answer (set aside, not fatal:
    the gateway serves the rest and keeps checking), then ``check_health`` every ``health_s``
    seconds (the shortest of the upstreams'), for the app's lifetime."""
    if not upstreams:
        return
    every = min(up.health_s for up in upstreams.values())
    first = True
    while True:
        try:
            for up, replica, why in await check_health(upstreams):
                if first:
                    log.warning("upstream %s: replica %s does not answer (%s); set aside and checked again every "
                                "%gs", up.name, replica.url, why, up.health_s)
        except Exception:
            log.exception("upstream health check failed")
        first = False
        await asyncio.sleep(every)


async def check_health(upstreams: dict) -> list[tuple]:
    """Re-admit set-aside replicas that answer ``/health`` (or ``/v1/models``) again, and set aside
    those that stop answering; all replicas at once. Returns (upstream, replica, why) for each that
    did not answer."""
    async def probe(up: Upstream, r: Replica) -> Optional[str]:
        why = "no /health or /v1/models"
        for path in ("/health", "/v1/models"):
            try:
                resp = await up.http().get(r.url + path, timeout=min(up.timeout_s, 2.0))
            except Exception as e:
                return f"{type(e).__name__}"
            if resp.status_code < 500 and resp.status_code != 404:
                return None
            why = f"{path} answered {resp.status_code}"
        return why

    pairs = [(up, r) for up in upstreams.values() for r in up.replicas]
    results = await asyncio.gather(*(probe(up, r) for up, r in pairs))
    down = []
    now = time.monotonic()
    for (up, r), why in zip(pairs, results):
        if why is None and r.down_until > now:
            up.ok(r)
            log.info("upstream %s replica %s is back", up.name, r.url)
        elif why is not None:
            down.append((up, r, why))
            if r.down_until <= now:
                up.eject(r, f"health check: {why}")
    return down


@router.get("/admin/upstreams")
async def admin_upstreams(request: Request):
    """Each upstream's replicas: admitted or set aside, requests in flight, failures in a row."""
    request.app.state.server.check_admin(request)
    return {"object": "list", "data": describe(request.app.state.upstreams)}


def describe(upstreams: dict) -> list[dict]:
    now = time.monotonic()
    return [{"name": up.name, "in_flight": up.in_flight, "concurrency": up.concurrency,
             "replicas": [{"url": r.url, "outstanding": r.outstanding, "healthy": r.down_until <= now,
                           "failures": r.failures, **r.stats()} for r in up.replicas]}
            for up in upstreams.values()]


def instrument(upstreams: dict, registry) -> None:
    """Prometheus series per upstream replica in the app's registry: requests answered, completion
    tokens, latency, requests in flight and whether it is admitted."""
    from prometheus_client import Counter, Gauge, Histogram

    labels = ["upstream", "replica"]
    requests = Counter("zenlm_upstream_requests", "requests an upstream replica answered", labels, registry=registry)
    tokens = Counter("zenlm_upstream_completion_tokens", "completion tokens an upstream replica delivered", labels,
                     registry=registry)
    latency = Histogram("zenlm_upstream_latency_seconds", "time to an upstream replica's last byte", labels,
                        registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    in_flight = Gauge("zenlm_upstream_in_flight", "requests in flight at an upstream replica", labels,
                      registry=registry)
    admitted = Gauge("zenlm_upstream_admitted", "1 while an upstream replica is admitted, 0 while set aside", labels,
                     registry=registry)
    for up in upstreams.values():
        up.metrics = (requests, tokens, latency)
        for r in up.replicas:
            in_flight.labels(up.name, r.url).set_function(lambda r=r: r.outstanding)
            admitted.labels(up.name, r.url).set_function(lambda r=r: float(r.down_until <= time.monotonic()))


__all__ = ["Upstream", "Replica", "make_upstream", "parse_upstream", "load_catalog", "counting_tokenizer",
           "UpstreamDispatch", "router", "health_loop", "check_health", "describe", "instrument"]
