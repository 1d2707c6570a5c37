"""What /v1/completions and /v1/chat/completions share (and /v1/translations reuses): a request's
sequences decoded as rows of the engine's continuous batch, answered whole or as an event stream,
rendered in the OpenAI wire format, and metered through ``metering``. The two routes' handlers
live in completions.py and chat.py; the stream's hot loop and the chunk template stay here, next to
the rendering they must match byte for byte.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import protocol as P
from ..billing import KeyContext, Usage
from ..catalog import ServedModel
from ..engine import EngineRequest, SamplingParams, TokenEvent
from ..errors import APIError, InvalidRequest
from ..metering import Outcome, Ticket
from ..server import Server
from .tools import ToolCallParser, ToolDelta, tool_calls_of

CHAT_ROUTE, COMPLETIONS_ROUTE = "/v1/chat/completions", "/v1/completions"


def _sse(obj) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json()
    return f"data: {data}\n\n"


@dataclass
class Choice:
    """One sequence of a request (prompt i, sample j) and what it has produced so far."""

    index: int
    prompt_ids: list[int]
    request: Optional[EngineRequest] = None
    text: str = ""
    tokens: list = field(default_factory=list)  # (token_id, logprob, top) per token
    delivered_tokens: int = 0
    finish_reason: Optional[str] = None
    tool_parser: Optional[ToolCallParser] = None  # a streamed chat with tools: its calls as they were sent


@dataclass
class Decoding:
    """One request's sequences in the engine: its choices (prompts x n, in order) and the queue
    their token events arrive on, with what the answer needs to render them."""

    server: Server
    request: Request
    served: ServedModel
    body: object  # CompletionRequest or ChatCompletionRequest
    chat: bool
    choices: list[Choice]
    events: asyncio.Queue
    prompt_tokens: int
    rid: str  # the response's id: cmpl-... or chatcmpl-...
    created: int
    tools: object = None  # chat with tools: tools.ToolContext (the reply is parsed for tool calls)


async def serve_generation(server: Server, request: Request, key: KeyContext, served: ServedModel, body,
                   prompts: list[list[int]], param: str, chat: bool, tools=None):
    """Decode ``prompts`` (each ``body.n`` times) for an authenticated key, metered: reserve the
    worst case (refused whole when the engine has no room for every sequence), submit all the
    sequences at once, then answer as one JSON body or as an event stream."""
    route = CHAT_ROUTE if chat else COMPLETIONS_ROUTE
    # a schema that cannot compile is a 400 before any reservation; a forced tool call is its own grammar
    constraint = response_constraint(served, body, tools)
    max_tokens = [served.fit(len(p), body.max_tokens, param) for p in prompts]
    prompt_tokens = sum(len(p) for p in prompts)
    max_completion = sum(m * body.n for m in max_tokens)
    sequences = len(prompts) * body.n
    ticket = await server.meter.reserve(request, key, route, served.id, prompt_tokens, max_completion,
                                        room=lambda: served.engine.check_room(sequences, key.key_id))
    if ticket.replay is not None:
        return _replay(ticket.replay, body, chat)
    try:
        choices, events = _submit(server, request, served, body, chat, prompts, max_tokens, key.key_id,
                                  constraint=constraint)
    except BaseException:
        await ticket.release()
        raise
    d = Decoding(server, request, served, body, chat, choices, events, prompt_tokens,
                 rid=("chatcmpl-" if chat else "cmpl-") + request.state.request_id[4:], created=P.now(), tools=tools)
    if body.stream:
        return StreamingResponse(_stream(d, ticket), media_type="text/event-stream",
                                 headers={**ticket.headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    return await server.meter.answer(ticket, lambda: _wait(d))


def _submit(server: Server, request: Request, served: ServedModel, body, chat: bool, prompts: list[list[int]],
            max_tokens: list[int], owner: int, constraint=None) -> tuple[list[Choice], asyncio.Queue]:
    """Every sequence of the request into the engine, all or none (on failure none keeps running);
    the choices and the queue their token events will arrive on."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    top_logprobs = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
    mailbox = server.mailbox(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    choices: list[Choice] = []
    try:
        for ids, mt in zip(prompts, max_tokens):
            for _ in range(body.n):
                index = len(choices)
                choice = Choice(index, ids)
                params = SamplingParams(
                    max_tokens=mt, temperature=temperature, top_p=top_p,
                    seed=None if body.seed is None else (body.seed + index) % (2 ** 63),
                    stop=body.stop_strings, stop_token_ids=served.stop_token_ids,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    logprobs=want_logprobs, top_logprobs=top_logprobs, constraint=constraint)
                try:
                    params.rules()
                except ValueError as e:
                    raise InvalidRequest(str(e)) from None
                choice.request = EngineRequest(
                    ids, params, lambda ev, k=index: mailbox.post(events, (k, ev)),
                    request_id=request.state.request_id)
                choices.append(choice)
        served.engine.submit_all([c.request for c in choices], owner=owner)  # all or none
    except BaseException:
        for choice in choices:
            if choice.request is not None:
                choice.request.cancel()
        raise
    return choices, events


def response_constraint(served: ServedModel, body, tools=None):
    """The compiled grammar of ``body.response_format`` (zenlm.constraints), or of a forced tool call
    (``tool_choice`` "required" or a named function); None for free text. A 400 naming the schema when it
    cannot be compiled."""
    fmt = getattr(body, "response_format", None)
    grammar = getattr(tools, "grammar", None)
    if grammar is None and (fmt is None or fmt.type == "text"):
        return None
    from ...constraints import ConstraintError, compile_constraint
    model = getattr(served, "model", None)
    vocab = model.config.vocab_size if model is not None else served.tokenizer.vocab_size
    if grammar is not None:
        try:
            return compile_constraint(served.tokenizer, vocab, grammar=grammar)
        except (ConstraintError, ImportError) as e:
            raise InvalidRequest(f"the tools' parameter schemas cannot be used to force a call: {e}",
                                 param="tools") from None
    spec = fmt.json_schema
    try:
        if fmt.type == "json_object":
            return compile_constraint(served.tokenizer, vocab, json_object=True)
        schema = spec.schema_ if spec.schema_ is not None else {}  # OpenAI: no schema = any JSON
        return compile_constraint(served.tokenizer, vocab, json_schema=schema)
    except ConstraintError as e:
        raise InvalidRequest(f"response_format {spec.name if spec else fmt.type!r}: the schema cannot be used: {e}",
                             param="response_format") from None
    except ImportError as e:
        raise InvalidRequest(f"response_format needs constrained decoding, which this server lacks: {e}",
                             param="response_format") from None


async def _wait(d: Decoding) -> Outcome:
    """The non-streaming answer: wait for every choice, watching for a client that leaves."""
    choices = d.choices
    watcher = asyncio.create_task(watch_disconnect(d.request, choices))
    try:
        while any(c.finish_reason is None for c in choices):
            k, ev = await d.events.get()
            absorb(choices[k], ev)
    finally:
        watcher.cancel()
    if any(c.finish_reason in ("cancelled", "error") for c in choices):
        error = (APIError("the model failed while decoding; nothing was charged", status=500, type="server_error")
                 if any(c.finish_reason == "error" for c in choices) else None)
        return Outcome(Usage(d.prompt_tokens, 0, queue_ms(choices), compute_ms(choices), "disconnected"), None, error)
    usage = _usage(choices, d.prompt_tokens)
    _observe_ttft(d.server, d.served, choices)
    response = _build_response(d.served, d.body, d.chat, choices, usage, d.rid, d.created, d.tools).model_dump()
    return Outcome(Usage(usage.prompt_tokens, usage.completion_tokens, queue_ms(choices), compute_ms(choices)),
                   response)


def absorb(choice: Choice, ev: TokenEvent) -> None:
    """Add one engine event (a token, its text, perhaps the finish) to its choice."""
    if ev.token_id is not None:
        choice.tokens.append((ev.token_id, ev.logprob, ev.top_logprobs))
    choice.text += ev.text
    if ev.finish_reason is not None:
        choice.finish_reason = ev.finish_reason


def _usage(choices: list[Choice], prompt_tokens: int, delivered: bool = False) -> P.UsageInfo:
    completion = sum(c.delivered_tokens if delivered else len(c.tokens) for c in choices)
    return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)


def queue_ms(choices: list[Choice]) -> int:
    """How long the request waited for the batch: its slowest sequence's wait."""
    return max((c.request.queue_ms for c in choices if c.request is not None), default=0)


def compute_ms(choices: list[Choice]) -> int:
    """The engine time the request's sequences took, summed (what the operator's hardware cost)."""
    return sum(c.request.compute_ms for c in choices if c.request is not None)


def _observe_ttft(server: Server, served: ServedModel, choices: list[Choice]) -> None:
    for c in choices:
        r = c.request
        if r is not None and r.first_token is not None:
            server.metrics.ttft.labels(served.id).observe(r.first_token - r.submitted)


async def watch_disconnect(request: Request, choices: list[Choice]) -> None:
    """Stop every sequence of a non-streaming request whose client hung up (checked every 0.25 s)."""
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


def _message(c: Choice, tools) -> tuple[P.AssistantMessage, Optional[str]]:
    """A chat choice's message and finish reason: tool calls parsed out of the text when tools were given."""
    if c.tool_parser is not None:  # streamed: the calls (and ids) the client was sent
        content, calls = c.tool_parser.content, c.tool_parser.calls
    else:
        content, calls = tool_calls_of(tools, c.text)
    if not calls:
        return P.AssistantMessage(content=c.text), _finish(c.finish_reason)
    return P.AssistantMessage(content=content, tool_calls=[
        P.ToolCallOut(id=t.id, function=P.ToolCallFunction(name=t.name, arguments=t.arguments)) for t in calls]), (
        "tool_calls" if c.finish_reason == "stop" else _finish(c.finish_reason))


def _build_response(served: ServedModel, body, chat: bool, choices: list[Choice], usage: P.UsageInfo, rid: str,
                    created: int, tools=None):
    if chat:
        out = []
        for c in choices:
            message, finish = _message(c, tools)
            out.append(P.ChatCompletionChoice(index=c.index, message=message, finish_reason=finish,
                                              logprobs=_chat_logprobs(served, c.tokens) if body.logprobs else None))
        return P.ChatCompletionResponse(id=rid, created=created, model=served.id, usage=usage, choices=out)
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


def _tool_delta_chunks(rid: str, created: int, model: str, index: int, deltas: list[ToolDelta], logprobs=None):
    """The chunks of a chat-with-tools choice's parsed deltas (zenlm.serve.routes.tools.ToolCallParser): content
    as content, a call's start as index, id, type and name (arguments ""), then its argument fragments. The
    token's log-probabilities ride on the first chunk (on an empty delta when the token showed nothing yet)."""
    chunks = []
    for d in deltas or [ToolDelta()]:
        if d.index is None:
            delta = P.DeltaMessage(content=d.content)
        else:
            delta = P.DeltaMessage(tool_calls=[P.ToolCallDelta(
                index=d.index, id=d.id, type="function" if d.id is not None else None,
                function=P.ToolCallFunctionDelta(name=d.name, arguments=d.arguments))])
        chunks.append(_sse(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            P.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs if not chunks else None)])))
    return chunks


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


async def _stream(d: Decoding, ticket: Ticket) -> AsyncIterator[str]:
    """The event stream: a chunk per token (those that arrived together in one write), then the
    ledger row, then the finish chunks, the usage chunk if asked and [DONE]. A client that leaves
    stops its sequences and pays for the tokens it was sent."""
    served, body, chat, choices, events, rid, created = d.served, d.body, d.chat, d.choices, d.events, d.rid, d.created

    def sent() -> Usage:
        return Usage(d.prompt_tokens, sum(c.delivered_tokens for c in choices), queue_ms(choices),
                     compute_ms(choices), "disconnected")

    def stop() -> None:
        for c in choices:
            c.request.cancel()

    with ticket.streaming(sent, stop):
        if chat:
            for c in choices:
                yield _sse(_chunk(chat, rid, created, served.id, c.index, "", role=True))
        elif body.echo:
            for c in choices:
                yield _sse(_chunk(chat, rid, created, served.id, c.index, served.tokenizer.decode(c.prompt_ids)))
        token_chunk = _TokenChunks(chat, rid, created, served.id)
        # a reply that may hold tool calls goes through its format's parser: content until a call starts,
        # then the call's start and its arguments as they are written
        if chat and d.tools is not None and d.tools.format != "none":
            for c in choices:
                c.tool_parser = ToolCallParser(d.tools.format)
        while any(c.finish_reason is None for c in choices):
            arrived = [await events.get()]
            while not events.empty():  # everything that came meanwhile goes out in one write
                arrived.append(events.get_nowait())
            out = []
            for k, ev in arrived:
                c = choices[k]
                absorb(c, ev)
                if ev.token_id is None:
                    continue
                if c.tool_parser is not None:
                    deltas = c.tool_parser.feed(ev.text)
                    lp = _chat_logprobs(served, [c.tokens[-1]]) if ev.logprob is not None else None
                    if deltas or lp is not None:
                        out.extend(_tool_delta_chunks(rid, created, served.id, k, deltas, lp))
                elif ev.logprob is not None:
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
        last = {c.index: c.tool_parser.finish() for c in choices if c.tool_parser is not None}
        usage = _usage(choices, d.prompt_tokens)
        _observe_ttft(d.server, served, choices)
        full = _build_response(served, body, chat, choices, usage, rid, created, d.tools).model_dump()
        # the row is written before the response completes: a delivered response always has its row
        usage.cost_micros = await ticket.settle(
            Usage(usage.prompt_tokens, usage.completion_tokens, queue_ms(choices), compute_ms(choices)), full)
        finishes = {c.index: _finish(c.finish_reason) for c in choices}
        for c, f in zip(choices, full["choices"] if last else []):
            finishes[c.index] = f["finish_reason"]
            if last[c.index]:  # the rest of the reply: held content, or all of it when a call was malformed
                yield "".join(_tool_delta_chunks(rid, created, served.id, c.index, last[c.index]))
        for c in choices:
            yield _sse(_chunk(chat, rid, created, served.id, c.index, None if chat else "",
                              finish=finishes[c.index]))
        if body.include_usage:
            yield _sse(_usage_chunk(chat, rid, created, served.id, usage))
        yield "data: [DONE]\n\n"


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
                if c["message"].get("tool_calls"):  # as the stream sent them: content, each call's start, its arguments
                    message = c["message"]
                    deltas = [ToolDelta(content=message["content"])] if message.get("content") else []
                    for i, t in enumerate(message["tool_calls"]):
                        deltas += [ToolDelta(index=i, id=t["id"], name=t["function"]["name"], arguments=""),
                                   ToolDelta(index=i, arguments=t["function"]["arguments"])]
                    yield "".join(_tool_delta_chunks(rid, created, model, c["index"], deltas))
                else:
                    yield _sse(_chunk(True, rid, created, model, c["index"], c["message"]["content"]))
            else:
                yield _sse(_chunk(False, rid, created, model, c["index"], c["text"]))
        for c in stored["choices"]:
            yield _sse(_chunk(chat, rid, created, model, c["index"], None if chat else "", finish=c["finish_reason"]))
        if body.include_usage:
            yield _sse(_usage_chunk(chat, rid, created, model, usage))
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")
