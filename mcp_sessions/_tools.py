"""The six built-in session tools, and how they are installed on a server.

Theory of operation
===================

Each tool is a plain SDK tool function; the session layer does the work
around it. The tools that take a ``session`` parameter run inside that
session's request scope and read it with :func:`current_session`;
``session_open`` and ``session_list`` need no session and read the runtime
and principal serving the request with :func:`served`. A tool never raises a
session error: it returns it as a tool execution error with its code.

They own nothing: the supervisor owns the sessions they open, close and
change. :func:`install_session_tools` registers them through the public
``MCPServer.add_tool``, skipping any name the server already lists (a second
install, or a user's own tool of that name, which wins).

Arguments that do not fit a tool's parameters never reach it: the SDK rejects
them with a generic tool error (pydantic's text, no code). The layer asks
:func:`argument_error` to explain such a rejection as ``invalid_arguments``,
and only for a built-in tool (:func:`is_builtin`): the published input schemas
stay the SDK's, made from the signatures below.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult
from mcp_types import Tool as MCPTool
from pydantic import Field, ValidationError

from ._context import current_session, iso, served, tool_error, tool_result
from ._errors import InvalidArguments, SessionError, gone
from ._runtime import SessionSnapshot
from ._state import TerminationReason
from ._store import SessionRecord

__all__ = ["SESSION_TOOLS", "argument_error", "install_session_tools", "is_builtin"]

#: Most sessions in one ``session_list`` page.
PAGE_MAX = 100

_Handle = Annotated[
    str | None,
    Field(description="A session handle from session_open; optional on a handshake-era connection"),
]


async def session_open(
    idle_timeout_s: Annotated[
        float | None,
        Field(gt=0, allow_inf_nan=False, description="Idle timeout in seconds (default: server's)"),
    ] = None,
    metadata: Annotated[
        dict[str, Any] | None, Field(description="Free-form JSON kept with the session")
    ] = None,
) -> CallToolResult:
    """Open a session and return its secret handle. Pass the handle as `session` to later calls."""
    caller = served()
    try:
        session, handle = await caller.supervisor.open_handle_session(
            principal=caller.principal, metadata=metadata, idle_timeout=idle_timeout_s
        )
    except SessionError as exc:
        return tool_error(exc)
    times = _snapshot_times(session.snapshot())
    return tool_result(
        {
            "session": handle,
            "id": session.id,
            "state": times["state"],
            "idle_timeout_s": times["idle_timeout_s"],
            "expires_at": times["expires_at"],
            "lifetime_ends_at": times["lifetime_ends_at"],
        }
    )


async def session_close(
    session: Annotated[str, Field(description="The handle of the session to close")],
) -> CallToolResult:
    """Close a session: cancel its work and forget its handle."""
    ctx = current_session()
    try:
        await ctx.supervisor.close(ctx.session, TerminationReason.CLOSED)
    except SessionError as exc:  # store_unavailable: the session stays open
        return tool_error(exc)
    if ctx.session.reason is not TerminationReason.CLOSED:
        return tool_error(gone(ctx.session.id, ctx.session.reason))  # it had ended otherwise
    return tool_result({"id": ctx.session.id, "state": "terminated", "reason": "closed"})


async def session_info(session: _Handle = None) -> CallToolResult:
    """Describe a session: state, times, counters and state version."""
    ctx = current_session()
    snap = ctx.session.snapshot()
    data = _snapshot_times(snap)
    data.update(requests=snap.requests, errors=snap.errors, version=snap.version)
    return tool_result(data)


async def session_list(
    cursor: Annotated[
        str | None, Field(description="next_cursor from the previous page (default: first page)")
    ] = None,
    limit: Annotated[
        int, Field(ge=1, le=PAGE_MAX, description=f"At most this many (1-{PAGE_MAX})")
    ] = PAGE_MAX,
) -> CallToolResult:
    """List the caller's live sessions, oldest first, a page at a time (ids, never handles)."""
    caller = served()
    try:
        after = None if cursor is None else _decode_cursor(cursor)
    except SessionError as exc:
        return tool_error(exc)
    if caller.shared:
        # Anonymous callers share one principal: show only what this caller holds
        # (one page at most: a cursor is past it).
        own = caller.connection
        mine = [_snapshot_times(own.snapshot())] if own is not None and own.live else []
        return tool_result({"sessions": mine if after is None else [], "next_cursor": None})
    try:
        records = await caller.supervisor.list_records(
            caller.principal, after=after, limit=limit + 1
        )
    except SessionError as exc:
        return tool_error(exc)
    page = records[:limit]
    more = len(records) > limit
    next_cursor = _encode_cursor(page[-1].created_at, page[-1].id) if more else None
    return tool_result({"sessions": [_record_summary(r) for r in page], "next_cursor": next_cursor})


def _encode_cursor(created_at: float, session_id: str) -> str:
    """An opaque cursor: the paging key of the last session listed."""
    raw = json.dumps([created_at, session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, session_id = json.loads(raw)
        number = isinstance(created_at, int | float) and not isinstance(created_at, bool)
        if number and isinstance(session_id, str) and math.isfinite(created_at):
            return float(created_at), session_id
    except (ValueError, TypeError):
        pass
    raise InvalidArguments(
        "invalid arguments for session_list: cursor is not a next_cursor from session_list",
        arguments=["cursor"],
    )


async def session_state_get(
    session: _Handle = None,
    keys: Annotated[
        list[str] | None, Field(description="Only these top-level keys (default: all)")
    ] = None,
) -> CallToolResult:
    """Read the session's JSON state document and its version."""
    ctx = current_session()
    doc = ctx.state
    if keys is not None:
        doc = {k: doc[k] for k in keys if k in doc}
    return tool_result({"state": doc, "version": ctx.version})


async def session_state_patch(
    patch: Annotated[
        dict[str, Any], Field(description="An RFC 7386 JSON Merge Patch; null deletes a member")
    ],
    session: _Handle = None,
    if_version: Annotated[
        int | None, Field(description="Apply only if the state is still at this version")
    ] = None,
) -> CallToolResult:
    """Change the session's JSON state with a merge patch; returns the new version."""
    ctx = current_session()
    try:
        version = await ctx.patch(patch, if_version=if_version)
    except SessionError as exc:
        return tool_error(exc)
    return tool_result({"version": version})


_TOOLS = (
    session_open,
    session_close,
    session_info,
    session_list,
    session_state_get,
    session_state_patch,
)

#: Names of the built-in tools (a contract: see the README).
SESSION_TOOLS: tuple[str, ...] = tuple(fn.__name__ for fn in _TOOLS)


async def install_session_tools(server: MCPServer[Any]) -> None:
    """Register the built-in session tools on ``server`` (idempotent).

    ``add_tool`` keeps an existing tool of the same name, but logs a warning;
    asking ``list_tools()`` first keeps a second install (every connection of
    a shared server installs) quiet.
    """
    present = {tool.name for tool in await server.list_tools()}
    for fn in _TOOLS:
        if fn.__name__ not in present:
            server.add_tool(fn, name=fn.__name__, structured_output=False)


@functools.cache
def _reference_tools() -> dict[str, Tool]:
    """Each built-in tool as ``add_tool`` makes it: its input schema and argument validator."""
    return {
        fn.__name__: Tool.from_function(fn, name=fn.__name__, structured_output=False)
        for fn in _TOOLS
    }


def is_builtin(tool: MCPTool) -> bool:
    """Whether a listed tool is one of ours (not a user's tool under a built-in name)."""
    reference = _reference_tools().get(tool.name)
    return reference is not None and tool.input_schema == reference.parameters


def argument_error(name: str, arguments: Mapping[str, Any] | None) -> InvalidArguments | None:
    """Why ``arguments`` do not fit built-in tool ``name``, or ``None`` if they do.

    Validates exactly as the SDK does before it calls the tool; the message
    names each offending argument and what is wrong, never the value given.
    """
    reference = _reference_tools().get(name)
    if reference is None:
        return None
    try:
        reference.fn_metadata.validate_arguments(dict(arguments or {}))
    except ValidationError as exc:
        problems: list[str] = []
        names: list[str] = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in err["loc"]) or "arguments"
            if err["type"] == "missing":
                problems.append(f"missing required argument '{where}'")
            else:
                problems.append(f"argument '{where}': {err['msg']}")
            top = str(err["loc"][0]) if err["loc"] else "arguments"
            if top not in names:
                names.append(top)
        return InvalidArguments(
            f"invalid arguments for {name}: " + "; ".join(problems), arguments=names
        )
    return None


def _times(
    last_active: float, idle_timeout: float, lifetime_end: float, idle_end: float | None = None
) -> dict[str, Any]:
    """The times every tool reports, each with one meaning (see the README).

    ``expires_at``: when the session ends if it is not used again, the earlier
    of its idle end (``last_active + idle_timeout``) and its lifetime end.
    ``lifetime_ends_at``: when it ends however much it is used.
    """
    if idle_end is None:
        idle_end = last_active + idle_timeout
    return {
        "last_active": iso(last_active),
        "idle_timeout_s": idle_timeout,
        "expires_at": iso(min(idle_end, lifetime_end)),
        "lifetime_ends_at": iso(lifetime_end),
    }


def _snapshot_times(snap: SessionSnapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "kind": snap.kind.value,
        "state": snap.state.value,
        "created_at": iso(snap.created_at),
        # An idle session's own idle end; otherwise counted from its last use.
        **_times(snap.last_active, snap.idle_timeout, snap.lifetime_ends_at, snap.idle_expires_at),
    }


def _record_summary(record: SessionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "state": record.state,
        "created_at": iso(record.created_at),
        **_times(record.last_active, record.idle_timeout, record.expires_at),
    }
