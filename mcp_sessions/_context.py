"""What a tool sees while the session layer serves it, and the shape of what it returns.

Theory of operation
===================

The session layer (``_layer``) owns every context variable here and is their
only writer; it sets them in the request's own task, around ``call_next``,
and resets them after. Everything else only reads them:

- :func:`current_session` returns the :class:`SessionContext` of the tool call
  (set only while a tool that declares ``session`` runs);
- :func:`served` says which runtime and principal serve the request (the
  built-in tools and resources read it);
- :class:`CorrelationFilter` stamps ``session_id`` and ``request_id`` on logs.

Error codes survive the SDK this way: the SDK turns any exception a tool raises
into a generic tool error without a code. A :class:`SessionError` raised
through our helpers (:func:`current_session`, :meth:`SessionContext.patch`) is
also :func:`noted <note>` in a list the layer opened for the call
(:func:`capture_errors`), and :func:`with_code` puts that error, code and all,
back on a generic tool error. The SDK's own rejection of a built-in tool's
arguments is likewise a generic tool error (:func:`is_generic_error`); the
layer replaces it with ``invalid_arguments``.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
from mcp.server.context import HandlerResult
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, TextContent

from ._errors import SessionError, SessionRequired
from ._runtime import Session, Supervisor

__all__ = [
    "CorrelationFilter",
    "Served",
    "SessionContext",
    "capture_errors",
    "current_session",
    "in_session",
    "is_generic_error",
    "is_tool_error",
    "iso",
    "log_request",
    "log_session",
    "note",
    "served",
    "serving",
    "session_context",
    "tool_error",
    "tool_result",
    "with_code",
]

# -- correlation for logs -------------------------------------------------------------

_log_session_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mcp_sessions_log_session", default="-"
)
_log_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mcp_sessions_log_request", default="-"
)


class CorrelationFilter(logging.Filter):
    """Adds ``session_id`` and ``request_id`` to every record (``-`` when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session_id"):
            record.session_id = _log_session_id.get()
        if not hasattr(record, "request_id"):
            record.request_id = _log_request_id.get()
        return True


@contextmanager
def log_request(request_id: object) -> Iterator[None]:
    """Logs in the block carry this request id."""
    token = _log_request_id.set(str(request_id))
    try:
        yield
    finally:
        _log_request_id.reset(token)


@contextmanager
def log_session(session_id: str) -> Iterator[None]:
    """Logs in the block carry this session id."""
    token = _log_session_id.set(session_id)
    try:
        yield
    finally:
        _log_session_id.reset(token)


# -- who serves the request -------------------------------------------------------------


@attrs.frozen
class Served:
    """The runtime serving the current request, and the caller's principal."""

    supervisor: Supervisor
    principal: str
    #: Many callers share ``principal`` (anonymous HTTP): listings show only
    #: what this caller holds (``connection``), never the others' sessions.
    shared: bool = False
    #: The caller's connection session, if any.
    connection: Session | None = None


_served: contextvars.ContextVar[Served | None] = contextvars.ContextVar(
    "mcp_sessions_served", default=None
)


@contextmanager
def serving(
    supervisor: Supervisor,
    principal: str,
    *,
    shared: bool = False,
    connection: Session | None = None,
) -> Iterator[None]:
    """Requests in the block are served by ``supervisor`` for ``principal``."""
    token = _served.set(Served(supervisor, principal, shared, connection))
    try:
        yield
    finally:
        _served.reset(token)


def served() -> Served:
    """Who serves the current request; only the session layer's requests have one."""
    value = _served.get()
    if value is None:
        raise RuntimeError("session tools run only under serve_stdio")
    return value


# -- what a tool sees ---------------------------------------------------------------------


@attrs.frozen
class SessionContext:
    """The session a request runs in, and the runtime that owns it."""

    session: Session
    supervisor: Supervisor

    @property
    def id(self) -> str:
        """The session's public id (safe to log and show)."""
        return self.session.id

    @property
    def state(self) -> dict[str, Any]:
        """A copy of the session's JSON state document."""
        return self.session.state_document()

    @property
    def version(self) -> int:
        return self.session.version

    async def patch(self, patch: Mapping[str, Any], *, if_version: int | None = None) -> int:
        """Apply an RFC 7386 merge patch to the state (committed); return the new version.

        Raises the session errors (``version_conflict``, ``store_unavailable``,
        ...); left uncaught in a tool, they become that tool error, code and all.
        """
        try:
            return await self.session.patch_state(patch, if_version=if_version)
        except SessionError as exc:
            raise note(exc) from None

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Start background work owned by the session: cancelled when it ends."""
        self.session.start_soon(fn, *args, name=name)


_current: contextvars.ContextVar[SessionContext | None] = contextvars.ContextVar(
    "mcp_sessions_current", default=None
)


@contextmanager
def in_session(session: Session, supervisor: Supervisor) -> Iterator[None]:
    """:func:`current_session` returns this session in the block."""
    token = _current.set(SessionContext(session, supervisor))
    try:
        yield
    finally:
        _current.reset(token)


def current_session() -> SessionContext:
    """The session the current tool call runs in.

    Available in a tool that declares a ``session: str | None = None``
    parameter (the layer resolves it before the tool runs). Raises
    :class:`SessionRequired` otherwise.
    """
    ctx = _current.get()
    if ctx is None:
        raise note(SessionRequired())
    return ctx


def session_context(ctx: Context[Any, Any] | None = None) -> SessionContext:
    """:func:`current_session`, for tools that like to pass the SDK's ``Context``."""
    return current_session()


# -- error codes through the SDK ----------------------------------------------------------

_raised: contextvars.ContextVar[list[SessionError] | None] = contextvars.ContextVar(
    "mcp_sessions_raised", default=None
)


@contextmanager
def capture_errors() -> Iterator[list[SessionError]]:
    """Collect the session errors a tool's body raises through our helpers."""
    raised: list[SessionError] = []
    token = _raised.set(raised)
    try:
        yield raised
    finally:
        _raised.reset(token)


def note(exc: SessionError) -> SessionError:
    """Remember ``exc`` for the layer (see :func:`with_code`); return it, to raise."""
    holder = _raised.get()
    if holder is not None:
        holder.append(exc)
    return exc


def with_code(result: HandlerResult, raised: list[SessionError]) -> HandlerResult:
    """A generic tool error caused by one of our errors becomes that error, with its code."""
    if raised and is_generic_error(result):
        return tool_error(raised[-1])
    return result


def is_generic_error(result: HandlerResult) -> bool:
    """A tool error without structured content: the SDK's, not one of ours."""
    return is_tool_error(result) and not _structured(result)


def is_tool_error(result: HandlerResult) -> bool:
    if isinstance(result, dict):
        return bool(result.get("isError"))
    return bool(getattr(result, "is_error", False))


def _structured(result: HandlerResult) -> object:
    if isinstance(result, dict):
        return result.get("structuredContent")
    return getattr(result, "structured_content", None)


# -- results ----------------------------------------------------------------------------


def tool_result(data: dict[str, Any]) -> CallToolResult:
    """A successful tool result: ``data`` as structured content and as JSON text."""
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(data, sort_keys=True))],
        structured_content=data,
    )


def tool_error(exc: SessionError) -> CallToolResult:
    """A tool execution error: ``{"error": {"code", "message"}}`` (spec: not a JSON-RPC error)."""
    body: dict[str, Any] = {"code": exc.code, "message": exc.message, **exc.details()}
    data = {"error": body}
    return CallToolResult(
        content=[TextContent(type="text", text=f"{exc.code}: {exc.message}")],
        structured_content=data,
        is_error=True,
    )


def iso(t: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC, to the millisecond."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="milliseconds")
