"""POST /v1/translations: each input translated by a sequence-to-sequence model; greedy ones join
the engine's continuous batch, beam search runs one request at a time through the Generator."""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import protocol as P
from ..billing import Usage
from ..catalog import ServedModel
from ..engine import EngineRequest, SamplingParams
from ..errors import APIError, InvalidRequest
from ..metering import Outcome
from ..server import Server, authenticated
from .generation import Choice, absorb, compute_ms, queue_ms, watch_disconnect

ROUTE = "/v1/translations"
router = APIRouter()


@router.post(ROUTE, response_model=P.TranslationResponse, responses=P.ERROR_RESPONSES)
async def translations(body: P.TranslationRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "translate")
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
    ticket = await server.meter.reserve(request, key, ROUTE, served.id, prompt_tokens, max_tokens * len(rows),
                                        room=lambda: served.engine.check_room(len(rows), key.key_id) if batched
                                        else None)

    async def run() -> Outcome:
        queue = 0
        if batched:  # greedy: joins the running batch
            out, queue, compute = await _engine_translate(server, request, served, rows, max_tokens, key.key_id)
        else:  # beam search: one request at a time through zenlm.generation
            start = time.perf_counter()
            out = await run_in_threadpool(_translate, served, rows, body.num_beams, max_tokens)
            compute = int(1000 * (time.perf_counter() - start)) + 1
        if out is None:  # the client left before the translation was sent: nothing to charge
            return Outcome(Usage(prompt_tokens, 0, queue, compute, "disconnected"))
        completion = sum(len(g.token_ids) for g in out)
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                            total_tokens=prompt_tokens + completion)
        response = P.TranslationResponse(model=served.id, usage=usage, data=[
            P.TranslationData(index=i, text=g.text, finish_reason=g.finish_reason) for i, g in enumerate(out)])
        return Outcome(Usage(prompt_tokens, completion, queue, compute), response.model_dump())

    return await server.meter.answer(ticket, run)


async def _engine_translate(server: Server, request: Request, served: ServedModel, rows: list[list[int]],
                            max_tokens: int, owner: int):
    """Greedy translation of each input as a row of the continuous batch; (generations, queue ms,
    compute ms), with generations None when the client left first."""
    from ...generation import Generation

    mailbox = server.mailbox(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    choices = []
    for i, ids in enumerate(rows):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[served.model.config.eos_token_id])
        choice = Choice(i, ids)
        choice.request = EngineRequest(ids, params, lambda ev, k=i: mailbox.post(events, (k, ev)),
                                       request_id=request.state.request_id)
        choices.append(choice)
    served.engine.submit_all([c.request for c in choices], owner=owner)  # all or none
    watcher = asyncio.create_task(watch_disconnect(request, choices))
    try:
        while any(c.finish_reason is None for c in choices):
            k, ev = await events.get()
            absorb(choices[k], ev)
    finally:
        watcher.cancel()
    if any(c.finish_reason == "error" for c in choices):
        raise APIError("the model failed while decoding; nothing was charged", status=500, type="server_error")
    out = None if any(c.finish_reason == "cancelled" for c in choices) else [
        Generation([t for t, _, _ in c.tokens], text=c.text, finish_reason=c.finish_reason) for c in choices]
    return out, queue_ms(choices), compute_ms(choices)


def _translate(served: ServedModel, rows: list[list[int]], num_beams: int, max_tokens: int):
    from ...generation import Generator

    with served.lock:
        return Generator(served.model, served.tokenizer).generate(rows, num_beams=num_beams,
                                                                  max_new_tokens=max_tokens).generations
