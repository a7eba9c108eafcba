"""HTTP routes only: each route calls the engine or the registry and returns its answer.

Errors are raised, never caught here; ``service.errors`` maps them to HTTP once.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine
from service.errors import ERROR_RESPONSES, ErrorBody, Forbidden, Unauthorized, Unavailable
from service.metrics import render
from service.schemas import (
    BatchRetrieveRequest,
    BatchRetrieveResponse,
    ModelDescription,
    ModelsResponse,
    ReadyResponse,
    ReloadOutcome,
    ReloadRequest,
    ReloadResponse,
    RetrieveRequest,
    RetrieveResponse,
)

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="GENRET_ADMIN_TOKEN")


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise Unavailable("not ready: the engine is starting")
    return engine


def require_admin(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    if credentials is None:
        raise Unauthorized("missing bearer token")
    expected = request.app.state.settings.admin_token.get_secret_value()
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise Forbidden("wrong admin token")


@router.post(
    "/v1/retrieve",
    response_model=RetrieveResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Top-K items for one user history",
)
async def retrieve(
    body: RetrieveRequest, request: Request, engine: Engine = Depends(get_engine)
) -> RetrieveResponse:
    response = await engine.retrieve(body)
    request.state.variant = response.variant
    return response


@router.post(
    "/v1/retrieve/batch",
    response_model=BatchRetrieveResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Several retrieval requests in one call",
)
async def retrieve_batch(
    body: BatchRetrieveRequest, engine: Engine = Depends(get_engine)
) -> BatchRetrieveResponse:
    return BatchRetrieveResponse(results=await engine.retrieve_batch(body.requests))


@router.get("/v1/models", response_model=ModelsResponse, summary="Loaded models")
async def models(engine: Engine = Depends(get_engine)) -> ModelsResponse:
    default = engine.registry.default_name
    return ModelsResponse(
        models=[ModelDescription(**m.describe(), default=m.name == default) for m in engine.registry.all()]
    )


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready, or draining."}},
    summary="Readiness: bundles loaded and warmed, not draining",
)
async def readyz(request: Request) -> JSONResponse:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    settings = request.app.state.settings
    ready = engine is not None and engine.ready and not engine.draining
    body = ReadyResponse(
        ready=ready,
        draining=engine is not None and engine.draining,
        models=[] if engine is None else engine.registry.names(),
        device=settings.device,
        decoder_backend=settings.decoder_backend,
        backend_devices={}
        if engine is None
        else {m.name: m.retriever.device_info for m in engine.registry.all()},
        search_mode=settings.search_mode,
        cache={} if engine is None else engine.cache.status(),
        queue_depth=0 if engine is None else engine.batcher.depth,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (genret_*)", response_class=Response)
async def metrics() -> Response:
    payload, content_type = render()
    return Response(payload, media_type=content_type)


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={
        401: {"model": ErrorBody, "description": "No bearer token."},
        403: {"model": ErrorBody, "description": "Wrong bearer token."},
        422: {"model": ErrorBody, "description": "The new bundle was refused; the old one keeps serving."},
    },
    summary="Load bundles again from disk, beside the serving ones, and swap them in",
)
async def reload(body: ReloadRequest | None = None, engine: Engine = Depends(get_engine)) -> ReloadResponse:
    outcomes = await asyncio.to_thread(engine.registry.reload, None if body is None else body.model)
    return ReloadResponse(reloaded=[ReloadOutcome(**o) for o in outcomes])
