"""GET /v1/models and /v1/models/{id}: what this server serves (a key is needed, as with OpenAI)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as P
from ..server import server_of

router = APIRouter()


@router.get("/v1/models", response_model=P.ModelList, responses=P.ERROR_RESPONSES)
async def list_models(request: Request):
    server = server_of(request)
    await server.meter.authenticate(request)  # as OpenAI: listing models needs a key
    return P.ModelList(data=[P.ModelCard(id=m.id, kind=m.kind, context_length=m.context_length)
                             for m in server.catalog.models.values()])


@router.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=P.ERROR_RESPONSES)
async def get_model(model_id: str, request: Request):
    server = server_of(request)
    await server.meter.authenticate(request)
    m = server.catalog.get(model_id)
    return P.ModelCard(id=m.id, kind=m.kind, context_length=m.context_length)
