"""JSON request bodies read by the routes themselves: small ones validated on the event loop, large
ones (``GENRET_HEAVY_BODY_BYTES`` and up) in the heavy lane (:mod:`service.heavy_lane`), so that a
client sending maximal allow-lists or a large delta does not hold up everyone else's requests.

Errors take FastAPI's own shapes (a 422 ``RequestValidationError`` with ``loc`` under ``body``), so
a client sees the same answer as from a body FastAPI validated. The routes declare their body to the
OpenAPI document with :func:`json_body_doc`.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import validation_error_definition, validation_error_response_definition
from pydantic import BaseModel, ValidationError

from service.heavy_lane import in_heavy_lane, pace

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def json_body_doc(model: type[BaseModel] | None = None, **schema: Any) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body with :func:`read_model` (``model``: its body
    and FastAPI's 422 schema, as if FastAPI had validated it) or :func:`read_object` (``schema``)."""
    if model is None:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    body = {"$ref": f"#/components/schemas/{model.__name__}"}
    invalid = {"$ref": "#/components/schemas/HTTPValidationError"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "422": {"description": "Validation Error", "content": {"application/json": {"schema": invalid}}}
        },
    }


def document_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add ``models`` (the bodies :func:`json_body_doc` refers to) to ``app``'s OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("ValidationError", validation_error_definition)
            schemas.setdefault("HTTPValidationError", validation_error_response_definition)
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    if content_type == "application/json":  # the usual header, without parsing it
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _invalid(type_: str, loc: tuple[str | int, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": type_, "loc": ("body", *loc), "msg": msg, "input": {}}])


PACE_OBJECTS = 256
"""JSON objects decoded between two :func:`service.heavy_lane.pace` calls (a delta's items)."""


def _paced_objects() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``json.loads`` object hook that returns each object as is and paces every PACE_OBJECTS: the
    decoder then runs as many short C calls, between which the GIL can go to other threads, instead
    of one call as long as the body (half a second for a 64 MB delta)."""
    decoded = 0

    def hook(obj: dict[str, Any]) -> dict[str, Any]:
        nonlocal decoded
        decoded += 1
        if decoded % PACE_OBJECTS == 0:
            pace()
        return obj

    return hook


def parse_json(raw: bytes, content_type: str | None, paced: bool = False) -> Any:
    """The body's JSON value; 422 when it is empty, not declared JSON, or not valid JSON.
    ``paced``: decoded with :func:`_paced_objects` (the heavy lane; a small body needs no hook)."""
    if not raw:
        raise _invalid("missing", (), "Field required")
    if not _is_json(content_type):
        raise _invalid("content_type", (), "expected a JSON body (Content-Type: application/json)")
    try:
        return json.loads(raw, object_hook=_paced_objects() if paced else None)
    except json.JSONDecodeError as exc:
        raise _invalid("json_invalid", (exc.pos,), f"JSON decode error: {exc.msg}") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise _invalid("json_invalid", (), f"JSON decode error: {type(exc).__name__}") from exc


def parse_model(raw: bytes, content_type: str | None, model: type[M], paced: bool = False) -> M:
    """The body validated as ``model``; 422 naming the field as FastAPI would."""
    value = parse_json(raw, content_type, paced)
    pace()
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc


async def read_model(request: Request, model: type[M]) -> M:
    """The request's body as ``model``, parsed in the heavy lane when it is large."""
    return await _read(request, lambda raw, content_type, paced: parse_model(raw, content_type, model, paced))


def parse_object(raw: bytes, content_type: str | None, paced: bool = False) -> dict[str, Any]:
    """The body's JSON object (the route checks its members); 422 for any other JSON value."""
    value = parse_json(raw, content_type, paced)
    if not isinstance(value, dict):
        raise _invalid("dict_type", (), "Input should be a valid dictionary")
    return value


async def read_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, parsed in the heavy lane when it is large."""
    return await _read(request, parse_object)


async def _read(request: Request, parse: Callable[[bytes, str | None, bool], T]) -> T:
    """``parse(body, content type, paced)``: on the event loop for a small body, else in the heavy lane."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    if len(raw) < request.app.state.settings.heavy_body_bytes:
        return parse(raw, content_type, False)
    return await in_heavy_lane("parse", lambda: parse(raw, content_type, True))
