"""POST /v1/chat/completions: the messages (and any ``tools``) through the model's chat template, then
decoded as in generation.py; tool calls in the reply parsed as tools.py says."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as P
from ..server import authenticated
from .generation import CHAT_ROUTE, serve_generation
from .tools import tool_context

router = APIRouter()


@router.post(CHAT_ROUTE, response_model=P.ChatCompletionResponse, responses=P.ERROR_RESPONSES)
async def chat_completions(body: P.ChatCompletionRequest, request: Request):
    server, key, served = await authenticated(request, body.model, "generate")
    tools = tool_context(served, body)
    prompt = tools.prompt if tools is not None else served.encode_chat([m.as_dict() for m in body.messages])
    return await serve_generation(server, request, key, served, body, [prompt], param="messages", chat=True,
                                  tools=tools)
