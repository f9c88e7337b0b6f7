"""The one check a JSON value passes before any store sees it.

Every backend must treat the same input the same way, so the runtime refuses
what some backend cannot store (a NUL character, a lone surrogate), what is not
JSON (NaN, infinities, non-JSON types, non-string keys) and nesting deeper
than :data:`MAX_DEPTH`, with :class:`InvalidArguments`, before anything is
written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn

from ._errors import InvalidArguments

__all__ = ["MAX_DEPTH", "check_json_value"]

MAX_DEPTH = 100
"""Deepest nesting of objects and arrays accepted (the top level is depth 1)."""

_SEGMENT_CHARS = 64


def check_json_value(value: Any, *, what: str, argument: str) -> None:
    """Raise :class:`InvalidArguments` unless ``value`` is storable JSON.

    ``what`` names the value in the message ("state patch", "metadata");
    ``argument`` is the tool argument it came from. The message names the
    offending place as a JSON Pointer, never the value itself.
    """
    # Iterative walk: (value, path segments, depth of the containers holding it).
    stack: list[tuple[Any, tuple[str, ...], int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                _refuse(what, argument, path, f"is {item!r}, which is not a JSON number")
            continue
        if isinstance(item, str):
            _check_string(item, what, argument, path, "holds")
            continue
        if (
            isinstance(item, dict)
            or (not path and isinstance(item, Mapping))
            or isinstance(item, list)
        ):
            if depth >= MAX_DEPTH:
                _refuse(what, argument, path, f"nests deeper than {MAX_DEPTH} levels")
            if not isinstance(item, list):
                for key, member in item.items():
                    if not isinstance(key, str):
                        _refuse(
                            what,
                            argument,
                            path,
                            f"has a key of type {type(key).__name__}, not a string",
                        )
                    _check_string(key, what, argument, (*path, key), "has a key that holds")
                    stack.append((member, (*path, key), depth + 1))
            else:
                for index, member in enumerate(item):
                    stack.append((member, (*path, str(index)), depth + 1))
            continue
        _refuse(what, argument, path, f"is of type {type(item).__name__}, which is not JSON")


def _check_string(text: str, what: str, argument: str, path: tuple[str, ...], verb: str) -> None:
    if "\x00" in text:
        _refuse(what, argument, path, f"{verb} a NUL character (\\u0000), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(
            what,
            argument,
            path,
            f"{verb} a lone surrogate, which is not valid Unicode and cannot be stored",
        )


def _pointer(path: tuple[str, ...]) -> str:
    """RFC 6901 JSON Pointer, with NUL and lone surrogates escaped so the message encodes."""
    parts = []
    for segment in path:
        segment = segment.replace("~", "~0").replace("/", "~1").replace("\x00", "\\u0000")
        if len(segment) > _SEGMENT_CHARS:  # a caller's long key is not echoed whole
            segment = segment[:_SEGMENT_CHARS] + "\u2026"
        parts.append(segment.encode("utf-8", "backslashreplace").decode("utf-8"))
    return "".join("/" + part for part in parts)


def _refuse(what: str, argument: str, path: tuple[str, ...], problem: str) -> NoReturn:
    where = f"value at {_pointer(path)}" if path else "value"
    raise InvalidArguments(f"{what}: {where} {problem}", arguments=[argument])
