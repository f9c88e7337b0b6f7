"""RFC 7386 JSON Merge Patch."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["json_size", "merge_patch", "patched"]


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (what size limits count)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def patched(doc: Any, patch: Any, max_bytes: int | None) -> Any:
    """``merge_patch(doc, patch)``, refusing a result over ``max_bytes`` (StateTooLarge)."""
    result = merge_patch(doc, patch)
    if max_bytes is not None:
        size = json_size(result)
        if size > max_bytes:
            from ._errors import StateTooLarge

            raise StateTooLarge(size, max_bytes)
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply ``patch`` to ``target`` as RFC 7386 says and return the result.

    Neither argument is modified. A ``None`` (JSON ``null``) member in the
    patch deletes that member; a patch that is not an object replaces the
    target whole.
    """
    if not isinstance(patch, dict):
        return _copy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
