"""POST /v1/search: the top hits of a served index (dense, BM25 or both) for a query."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import protocol as P
from ..billing import Usage
from ..errors import user_error
from ..metering import Outcome
from ..server import authenticated

ROUTE = "/v1/search"
router = APIRouter()


@router.post(ROUTE, response_model=P.SearchResponse, responses=P.ERROR_RESPONSES)
async def search(body: P.SearchRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "search")
    tokens = len(body.query.split())  # metered in words: the index may be BM25-only, with no tokenizer
    ticket = await server.meter.reserve(request, key, ROUTE, served.id, tokens, 0)

    async def run() -> Outcome:
        start = time.perf_counter()
        hits = await run_in_threadpool(user_error, served.index.search, body.query, body.k, body.mode)
        compute_ms = int(1000 * (time.perf_counter() - start)) + 1
        response = P.SearchResponse(model=served.id, usage=P.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                                    data=[P.SearchHit(index=i, id=h.id, score=h.score, title=hit_title(h),
                                                      text=h.text) for i, h in enumerate(hits)])
        return Outcome(Usage(tokens, 0, 0, compute_ms), response.model_dump())

    return await server.meter.answer(ticket, run)


def hit_title(hit) -> str:
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
