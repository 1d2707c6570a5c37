"""The routes without a key: /health, /metrics (Prometheus) and the web playground at /."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from .. import protocol as P
from ..server import server_of

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/health", response_model=P.HealthResponse)
async def health(request: Request):
    catalog = server_of(request).catalog
    engines = [m.engine for m in catalog.models.values() if m.engine is not None]
    return P.HealthResponse(models=list(catalog.models), queue_depth=sum(e.queue_depth for e in engines),
                            running=sum(e.batch_size for e in engines))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html", media_type="text/html")
