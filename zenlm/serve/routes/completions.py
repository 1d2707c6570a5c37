"""POST /v1/completions: one or more prompts (text or token ids), each decoded ``n`` times as in
generation.py."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as P
from ..errors import InvalidRequest
from ..server import authenticated
from .generation import COMPLETIONS_ROUTE, serve_generation

router = APIRouter()


@router.post(COMPLETIONS_ROUTE, response_model=P.CompletionResponse, responses=P.ERROR_RESPONSES)
async def completions(body: P.CompletionRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "generate")
    prompts = []
    for p in body.prompts:
        ids = served.encode(p) if isinstance(p, str) else served.check_ids(p)
        if not ids:
            raise InvalidRequest("prompt is empty (0 tokens)", param="prompt")
        prompts.append(ids)
    return await serve_generation(server, request, key, served, body, prompts, param="prompt", chat=False)
