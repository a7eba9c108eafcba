"""HTTP routes only: each route calls the engine or the registry and returns its answer, built
into the HTTP models here (:mod:`service.http.responses`): the engine answers in domain results.

``router`` is the public API (port ``GENRET_PORT``); ``admin_router`` is served only by the admin
app on its own port (``GENRET_ADMIN_PORT``), and only when ``GENRET_ADMIN_TOKEN`` is set: every
route under ``/admin`` belongs there. Errors are raised, never caught here; ``service.errors``
maps them to HTTP once.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from service.catalogue.live import LiveCatalogue
from service.engine.engine import Engine
from service.errors import (
    ERROR_RESPONSES,
    ErrorBody,
    Forbidden,
    LimitExceeded,
    Unauthorized,
    Unavailable,
    UnknownJob,
)
from service.http.body import json_body_doc, read_model, read_object
from service.http.responses import to_response
from service.metrics import ADMIN_REGISTRY, render
from service.schemas import (
    AddItemsResponse,
    AdminModelDescription,
    AdminModelsResponse,
    BatchRetrieveRequest,
    BatchRetrieveResponse,
    ItemsJob,
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
admin_router = APIRouter(prefix="/admin")
_bearer = HTTPBearer(auto_error=False, description="GENRET_ADMIN_TOKEN")


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise Unavailable("not ready: the engine is starting")
    return engine


async def get_catalogue(request: Request) -> LiveCatalogue:
    catalogue: LiveCatalogue | None = getattr(request.app.state, "catalogue", None)
    if catalogue is None:
        raise Unavailable("not ready: the engine is starting")
    return catalogue


async def require_admin(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    if credentials is None:
        raise Unauthorized("missing bearer token")
    token = request.app.state.settings.admin_token
    if token is None:  # the admin app is not started without a token; refuse if it ever is
        raise Forbidden("the admin API is off: GENRET_ADMIN_TOKEN is not set")
    expected = token.get_secret_value()
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise Forbidden("wrong admin token")


def json_answer(answer: BaseModel) -> Response:
    """``answer`` as JSON, serialized once here (None fields left out): FastAPI would validate the
    returned model against ``response_model`` again before serializing it."""
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


def check_debug(request: Request, bodies: list[RetrieveRequest]) -> None:
    """``debug: true`` only where the settings allow it (off in prod by default): 422 naming the setting."""
    if request.app.state.settings.debug_on:
        return
    for i, body in enumerate(bodies):
        if body.debug:
            loc: tuple[str | int, ...] = ("debug",) if len(bodies) == 1 else ("requests", i, "debug")
            raise LimitExceeded(loc, "debug answers are off here (GENRET_DEBUG_RESPONSES)")


@router.post(
    "/v1/retrieve",
    response_model=RetrieveResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(RetrieveRequest),
    summary="Top-K items for one user history",
)
async def retrieve(request: Request, engine: Engine = Depends(get_engine)) -> Response:
    body = await read_model(request, RetrieveRequest)
    check_debug(request, [body])
    result = await engine.retrieve(body)
    request.state.variant = result.variant
    return json_answer(to_response(result, debug=body.debug))


@router.post(
    "/v1/retrieve/batch",
    response_model=BatchRetrieveResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body_doc(BatchRetrieveRequest),
    summary="Several retrieval requests in one call",
)
async def retrieve_batch(request: Request, engine: Engine = Depends(get_engine)) -> Response:
    body = await read_model(request, BatchRetrieveRequest)
    check_debug(request, body.requests)
    results = await engine.retrieve_batch(body.requests)
    return json_answer(
        BatchRetrieveResponse(
            results=[to_response(r, debug=q.debug) for q, r in zip(body.requests, results, strict=True)]
        )
    )


def describe_models(engine: Engine, kind: type[ModelDescription]) -> list[Any]:
    default = engine.registry.default_name
    return [
        kind(**{k: v for k, v in m.describe().items() if k in kind.model_fields}, default=m.name == default)
        for m in engine.registry.all()
    ]


@router.get("/v1/models", response_model=ModelsResponse, summary="Loaded models")
async def models(engine: Engine = Depends(get_engine)) -> ModelsResponse:
    return ModelsResponse(models=describe_models(engine, ModelDescription))


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
    catalogue: LiveCatalogue | None = getattr(request.app.state, "catalogue", None)
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
        catalogue_lag={} if catalogue is None else dict(catalogue.lags),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (genret_*)", response_class=Response)
async def metrics() -> Response:
    payload, content_type = render()
    return Response(payload, media_type=content_type)


ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token."},
    403: {"model": ErrorBody, "description": "Wrong bearer token."},
}


@admin_router.get(
    "/models",
    response_model=AdminModelsResponse,
    dependencies=[Depends(require_admin)],
    responses=ADMIN_RESPONSES,
    summary="Loaded models with their bundle paths",
)
async def admin_models(engine: Engine = Depends(get_engine)) -> AdminModelsResponse:
    return AdminModelsResponse(models=describe_models(engine, AdminModelDescription))


@admin_router.get(
    "/metrics",
    dependencies=[Depends(require_admin)],
    responses=ADMIN_RESPONSES,
    response_class=Response,
    summary="The admin port's own metrics (genret_admin_*): its requests and errors, never on public /metrics",
)
async def admin_metrics() -> Response:
    payload, content_type = render(ADMIN_REGISTRY)
    return Response(payload, media_type=content_type)


@admin_router.post(
    "/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={
        **ADMIN_RESPONSES,
        409: {
            "model": ErrorBody,
            "description": "The reload would change the default model; nothing swapped.",
        },
        422: {"model": ErrorBody, "description": "The new bundle was refused; the old one keeps serving."},
    },
    summary="Load bundles again from disk, beside the serving ones, and swap them in",
)
async def reload(body: ReloadRequest | None = None, engine: Engine = Depends(get_engine)) -> ReloadResponse:
    outcomes = await asyncio.to_thread(engine.registry.reload, None if body is None else body.model)
    return ReloadResponse(reloaded=[ReloadOutcome(**o) for o in outcomes])


@admin_router.post(
    "/items",
    response_model=AddItemsResponse,
    dependencies=[Depends(require_admin)],
    responses={
        **ADMIN_RESPONSES,
        202: {
            "model": ItemsJob,
            "description": "A delta of more than GENRET_CATALOGUE_ASYNC_ITEMS ids, checked and queued: "
            "GET /admin/items/jobs/{job} says when it is live.",
        },
        404: {"model": ErrorBody, "description": "Unknown model name."},
        422: {
            "description": "A malformed or contradicting delta (the field named); nothing written or changed."
        },
    },
    openapi_extra=json_body_doc(
        type="object",
        description="A delta (docs/live_catalogue.md) plus an optional `model` (default: the default model).",
        examples=[{"add": [{"id": "sku-1", "vector": [0.1, 0.2], "attributes": ["7"]}], "remove": ["sku-9"]}],
    ),
    summary="Add and remove items: a catalogue delta, written where every replica sees it and applied here",
)
async def add_items(
    request: Request, catalogue: LiveCatalogue = Depends(get_catalogue)
) -> AddItemsResponse | JSONResponse:
    delta = await read_object(request)
    model = delta.pop("model", None)
    if model is not None and not isinstance(model, str):
        raise LimitExceeded(("model",), "a model name (string)")
    if catalogue.deferred(delta):  # parsed and checked off the loop and off the catalogue thread
        job, parsed = await asyncio.to_thread(catalogue.accept, model, delta)
        catalogue.start(job, parsed)
        return JSONResponse(ItemsJob(**job.describe()).model_dump(), status_code=202)
    return AddItemsResponse(**await catalogue.run(catalogue.add, model, delta))


@admin_router.get(
    "/items/jobs/{job}",
    response_model=ItemsJob,
    response_model_exclude_none=True,
    dependencies=[Depends(require_admin)],
    responses={**ADMIN_RESPONSES, 404: {"model": ErrorBody, "description": "No such job on this replica."}},
    summary="Where a large delta accepted with 202 is: queued, running, live (with its version), refused, failed",
)
async def items_job(job: str, catalogue: LiveCatalogue = Depends(get_catalogue)) -> ItemsJob:
    found = catalogue.jobs.get(job)
    if found is None:
        raise UnknownJob(f"no catalogue job {job!r} on this replica (jobs are kept where they were accepted)")
    return ItemsJob(**found.describe())
