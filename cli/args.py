"""Argument parsing shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def comma_list(text: str, convert: Callable[[str], T]) -> tuple[T, ...]:
    """``"a, b,,c"`` -> ``(convert("a"), convert("b"), convert("c"))``: blanks between commas skipped."""
    return tuple(convert(part.strip()) for part in text.split(",") if part.strip())
