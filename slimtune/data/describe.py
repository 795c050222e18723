"""How error messages name values and columns (shared by the format detector, the readers and media columns)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def short_names(names: Iterable[Any], limit: int = 20, width: int = 40) -> list[str]:
    """The first `limit` names, each cut to `width` characters, for error messages (a bad header can be huge)."""
    return [str(n) if len(str(n)) <= width else f"{str(n)[:width]}…" for n in list(names)[:limit]]


def describe(value: Any) -> str:
    """Say what kind of JSON value `value` is, for error messages ("a number (42)", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"
