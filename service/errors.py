"""One error hierarchy for the service, mapped to HTTP in one place.

Routes raise :class:`ServiceError` subclasses (or let FastAPI raise its validation error); the
handlers installed by :func:`install_error_handlers` turn them into JSON responses and count them
in ``genret_errors_total{kind}``. Nothing else in the service builds an error response.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel

from models.catalogue.delta import DeltaError
from service.metrics import ERRORS

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The JSON body of every error response except request validation (422)."""

    kind: str
    message: str


class ServiceError(Exception):
    """Base class: ``status`` and ``kind`` say how the error is answered and counted."""

    status: int = 500
    kind: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class LimitExceeded(ServiceError):
    """A request field is outside the limits configured in settings (answered like validation, 422)."""

    status = 422
    kind = "limit"

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class PayloadTooLarge(ServiceError):
    status = 413
    kind = "body_too_large"


class UnknownModel(ServiceError):
    status = 404
    kind = "unknown_model"


class UnknownJob(ServiceError):
    """A catalogue job id this replica does not hold (never accepted here, or long finished)."""

    status = 404
    kind = "unknown_job"


class QueueFull(ServiceError):
    status = 429
    kind = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    status = 504
    kind = "deadline"


class Unavailable(ServiceError):
    """Not ready yet, or draining for shutdown."""

    status = 503
    kind = "unavailable"


class Overloaded(ServiceError):
    """More open connections or running requests than ``max_connections`` (service/http/guard.py)."""

    status = 503
    kind = "overloaded"


class ClientLimit(ServiceError):
    """One client has ``max_inflight_per_client`` requests being answered (service/http/guard.py)."""

    status = 429
    kind = "client_limit"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unauthorized(ServiceError):
    status = 401
    kind = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status = 403
    kind = "forbidden"


class BadBundle(ServiceError):
    """A bundle failed to load or warm; the serving one stays."""

    status = 422
    kind = "bad_bundle"


class ReloadConflict(ServiceError):
    """A reload would change which model requests without ``model`` get; refused, nothing swapped."""

    status = 409
    kind = "reload_conflict"


class CatalogueStoreFailed(ServiceError):
    """The delta directory cannot be written (read-only or missing volume); nothing changed."""

    status = 503
    kind = "catalogue_store"


class ComputeFailed(ServiceError):
    """The model failed on this request's own inputs; the rest of its batch was answered."""

    status = 500
    kind = "compute"


# Responses to declare in the OpenAPI schema of the retrieval routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown model name."},
    413: {"model": ErrorBody, "description": "Request body larger than max_body_bytes."},
    429: {
        "model": ErrorBody,
        "description": "Queue full; retry after the Retry-After header.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
    500: {"model": ErrorBody, "description": "The model failed on this request's inputs (kind 'compute')."},
    503: {"model": ErrorBody, "description": "Not ready, or shutting down."},
    504: {"model": ErrorBody, "description": "Deadline passed while the request was queued."},
}


def error_response(exc: ServiceError, errors: Counter = ERRORS) -> JSONResponse:
    """The response for ``exc`` (also used by middleware that runs outside the routes), counted in
    ``errors`` (the admin app counts its own, service/metrics.py)."""
    errors.labels(kind=exc.kind).inc()
    if isinstance(exc, LimitExceeded):
        detail = [{"loc": ["body", *exc.loc], "msg": exc.message, "type": "limit"}]
        return JSONResponse({"detail": detail}, status_code=exc.status, headers=exc.headers)
    body = ErrorBody(kind=exc.kind, message=exc.message).model_dump()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def field_loc(field: str) -> list[str | int]:
    """A delta's field path (``add[3].vector``) as a validation ``loc`` (``["add", 3, "vector"]``)."""
    parts = re.findall(r"[^.\[\]]+", field)
    return [int(p) if p.isdigit() else p for p in parts if p != "body"]


def delta_response(exc: DeltaError, errors: Counter = ERRORS) -> JSONResponse:
    """A delta that cannot apply (``models.catalogue.delta.DeltaError``): 422 naming its field, in the
    shape of a validation error (nothing was written or changed)."""
    errors.labels(kind="delta").inc()
    detail = [
        {"loc": ["body", *field_loc(exc.field)], "msg": exc.message, "type": "delta", "field": exc.field}
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def install_error_handlers(app: FastAPI, errors: Counter = ERRORS) -> None:
    """Map every error to its HTTP answer, once, for the whole app, counting it in ``errors``."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc, errors)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors.labels(kind="validation").inc()
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    async def on_delta_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DeltaError)
        return delta_response(exc, errors)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        errors.labels(kind="internal").inc()
        body = ErrorBody(kind="internal", message=f"internal error: {type(exc).__name__}").model_dump()
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(DeltaError, on_delta_error)
    app.add_exception_handler(Exception, on_unexpected)
