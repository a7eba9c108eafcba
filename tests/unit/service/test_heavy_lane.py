"""The heavy lane (service/heavy_lane.py) and the bodies the routes parse themselves (service/http/body.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from service import heavy_lane
from service.http.body import parse_model, parse_object
from service.schemas import RetrieveRequest

JSON = "application/json"


def errors_of(raw: bytes, content_type: str | None = JSON) -> list[dict[str, Any]]:
    with pytest.raises(RequestValidationError) as caught:
        parse_model(raw, content_type, RetrieveRequest)
    return [{k: e[k] for k in ("type", "loc")} for e in caught.value.errors()]


def test_a_body_parsed_by_the_route_fails_in_fastapis_shapes_naming_the_field() -> None:
    assert parse_model(b'{"history": ["a", 7], "k": 3}', JSON, RetrieveRequest).history == ["a", "7"]
    assert errors_of(b'{"k": "5"}') == [{"type": "int_type", "loc": ("body", "k")}]
    assert errors_of(b'{"history": ["a", true]}') == [{"type": "string_type", "loc": ("body", "history", 1)}]
    assert errors_of(b'{"allow": ["a", ""]}') == [{"type": "too_short", "loc": ("body", "allow", 1)}]
    assert errors_of(b'{"k": 3,') == [{"type": "json_invalid", "loc": ("body", 8)}]
    assert errors_of(b"") == [{"type": "missing", "loc": ("body",)}]
    assert errors_of(b'{"k": 3}', "text/plain") == [{"type": "content_type", "loc": ("body",)}]
    assert errors_of(b'{"k": 3}', None) == [{"type": "content_type", "loc": ("body",)}]
    assert parse_model(b'{"k": 3}', "application/vnd.api+json; charset=utf-8", RetrieveRequest).k == 3
    with pytest.raises(RequestValidationError) as caught:
        parse_object(b"[1, 2]", JSON)
    assert caught.value.errors()[0]["loc"] == ("body",)
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than the decoder's recursion limit
    assert errors_of(nested) == [{"type": "json_invalid", "loc": ("body",)}]


def test_the_fast_id_check_gives_what_the_per_id_check_gives() -> None:
    ids = [f"sku-{i}" for i in range(5000)]
    body = {"history": [*ids[:3], 12], "exclude": ids[:10], "allow": [*ids, 99]}
    request = parse_model(json.dumps(body).encode(), JSON, RetrieveRequest)
    assert request.history == [*ids[:3], "12"] and request.allow == [*ids, "99"]
    assert request.exclude == ids[:10]
    assert errors_of(json.dumps({"allow": [*ids, "x" * 257]}).encode()) == [
        {"type": "too_long", "loc": ("body", "allow", 5000)}
    ]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    slept: list[float] = []
    monkeypatch.setattr(heavy_lane.time, "sleep", slept.append)
    yield slept
    heavy_lane.configure(0.1, lambda: True)


def test_the_lane_keeps_to_its_share_only_while_others_are_served(sleeps: list[float]) -> None:
    busy = [True]
    heavy_lane.configure(0.25, lambda: busy[0])

    def work() -> str:
        for _ in range(3):
            sum(range(20_000))  # a chunk of Python work
            heavy_lane.pace()
        busy[0] = False
        heavy_lane.pace()
        return threading.current_thread().name

    thread = asyncio.run(heavy_lane.in_heavy_lane("map", work))
    assert thread.startswith("genret-heavy")
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)  # 3x each chunk's time while busy, then none
    heavy_lane.pace()  # outside the lane (the event loop's small requests): never sleeps
    assert len(sleeps) == 3


def test_an_error_in_the_lane_is_the_callers() -> None:
    def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        asyncio.run(heavy_lane.in_heavy_lane("parse", fail))
