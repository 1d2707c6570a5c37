"""POST /v1/chat/completions: the messages through the model's chat template, then decoded as in
generation.py."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as P
from ..server import authenticated
from .generation import CHAT_ROUTE, serve_generation

router = APIRouter()


@router.post(CHAT_ROUTE, response_model=P.ChatCompletionResponse, responses=P.ERROR_RESPONSES)
async def chat_completions(body: P.ChatCompletionRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "generate")
    prompt = served.encode_chat([m.as_dict() for m in body.messages])
    return await serve_generation(server, request, key, served, body, [prompt], param="messages", chat=True)
