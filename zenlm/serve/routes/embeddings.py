"""POST /v1/embeddings: vectors for a batch of inputs (text or token ids), as floats or base64."""
from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import protocol as P
from ..billing import Usage
from ..catalog import embed_rows, tokenize_inputs
from ..metering import Outcome
from ..server import authenticated

ROUTE = "/v1/embeddings"
router = APIRouter()


@router.post(ROUTE, response_model=P.EmbeddingResponse, responses=P.ERROR_RESPONSES)
async def embeddings(body: P.EmbeddingRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "embed")
    rows = tokenize_inputs(served, body.inputs)
    tokens = sum(len(r) for r in rows)
    ticket = await server.meter.reserve(request, key, ROUTE, served.id, tokens, 0)

    async def run() -> Outcome:
        start = time.perf_counter()
        vectors = await run_in_threadpool(embed_rows, served, rows, body.dimensions)
        compute_ms = int(1000 * (time.perf_counter() - start)) + 1
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        response = P.EmbeddingResponse(model=served.id, usage=P.EmbeddingUsage(prompt_tokens=tokens,
                                                                               total_tokens=tokens),
                                       data=[P.EmbeddingData(index=i, embedding=e) for i, e in enumerate(data)])
        return Outcome(Usage(tokens, 0, 0, compute_ms), response.model_dump())

    return await server.meter.answer(ticket, run)
