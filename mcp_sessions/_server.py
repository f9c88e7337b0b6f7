"""Serving an SDK ``MCPServer`` with the session layer: middleware, built-in tools, stdio.

Theory of operation
===================

::

    run_stdio(server) -> trio.run(serve_stdio)
      serve_stdio:  open_supervisor  ->  install the SessionLayer on the server  ->
                    StdioTransport.serve(serve_dual_era_loop)  ->  end the connection session

The :class:`SessionLayer` is one ``ServerMiddleware`` around every request the
SDK dispatches. It knows the connection it serves through a context variable
set before the SDK loop starts (one stdio stream is one connection), and:

- handshake era: creates the connection session at ``initialize`` (it stays
  INITIALIZING until ``notifications/initialized``), and runs every request on
  the connection inside ``supervisor.request(session)``;
- modern era (2026-07-28): no connection session; each request stands alone;
- ``tools/call``: if the tool declares a ``session`` parameter, resolves it
  (a handle, or in the handshake era the connection session when omitted) and
  runs the tool inside that session's request scope. Failures become tool
  execution errors with ``{"error": {"code", "message"}}``.

Tools reach their session through :func:`current_session` (or
:func:`session_context` taking the SDK's ``Context``); it is a context
variable set by the middleware in the request's own task.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import getpass
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import attrs
import trio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resources import FunctionResource
from mcp.server.runner import serve_dual_era_loop
from mcp_types import CallToolResult, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from ._errors import (
    SessionError,
    SessionNotFound,
    SessionRequired,
    VersionConflict,
    gone,
)
from ._runtime import (
    ClientInfo,
    Hooks,
    Session,
    SessionKind,
    SessionSnapshot,
    Supervisor,
    open_supervisor,
)
from ._settings import Settings
from ._state import SessionState, TerminationReason
from ._store import LIVE, SessionRecord, SessionStore
from ._transport import DEFAULT_MAX_MESSAGE_SIZE, StdioTransport, claim_stdio, forward_signals

__all__ = [
    "SESSION_TOOLS",
    "CorrelationFilter",
    "SessionContext",
    "SessionLayer",
    "current_session",
    "default_principal",
    "run_stdio",
    "serve_stdio",
    "session_context",
]

logger = logging.getLogger("mcp_sessions.server")

#: Names of the built-in tools (a contract: see the README).
SESSION_TOOLS = (
    "session_open",
    "session_close",
    "session_info",
    "session_list",
    "session_state_get",
    "session_state_patch",
)
HEALTH_URI = "sessions://health"
METRICS_URI = "sessions://metrics"

# -- correlation for logs --------------------------------------------------------

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


# -- what a tool sees -------------------------------------------------------------


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
            raise _note(exc) from None

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Start background work owned by the session: cancelled when it ends."""
        self.session.start_soon(fn, *args, name=name)


_current: contextvars.ContextVar[SessionContext | None] = contextvars.ContextVar(
    "mcp_sessions_current", default=None
)
# Session errors raised inside a tool's body through our helpers. The SDK turns
# any exception from a tool into a generic tool error; the layer puts the code back.
_raised: contextvars.ContextVar[list[SessionError] | None] = contextvars.ContextVar(
    "mcp_sessions_raised", default=None
)


def _note(exc: SessionError) -> SessionError:
    holder = _raised.get()
    if holder is not None:
        holder.append(exc)
    return exc


def _with_code(result: HandlerResult, raised: list[SessionError]) -> HandlerResult:
    """A generic tool error caused by one of our errors becomes that error, with its code."""
    if raised and _is_tool_error(result) and not _structured(result):
        return _error(raised[-1])
    return result


def _is_tool_error(result: HandlerResult) -> bool:
    if isinstance(result, dict):
        return bool(result.get("isError"))
    return bool(getattr(result, "is_error", False))


def _structured(result: HandlerResult) -> object:
    if isinstance(result, dict):
        return result.get("structuredContent")
    return getattr(result, "structured_content", None)


@attrs.define
class _Connection:
    """One stdio stream: its era once decided, and its connection session (handshake era)."""

    layer: SessionLayer
    era: str | None = None
    session: Session | None = None


@attrs.frozen
class _RequestEnv:
    layer: SessionLayer
    connection: _Connection
    modern: bool


_connection_var: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "mcp_sessions_connection", default=None
)
_env: contextvars.ContextVar[_RequestEnv | None] = contextvars.ContextVar(
    "mcp_sessions_env", default=None
)


def current_session() -> SessionContext:
    """The session the current tool call runs in.

    Available in a tool that declares a ``session: str | None = None``
    parameter (the layer resolves it before the tool runs). Raises
    :class:`SessionRequired` otherwise.
    """
    ctx = _current.get()
    if ctx is None:
        raise _note(SessionRequired())
    return ctx


def session_context(ctx: Context[Any, Any] | None = None) -> SessionContext:
    """:func:`current_session`, for tools that like to pass the SDK's ``Context``."""
    return current_session()


def default_principal() -> str:
    """The principal of a stdio connection by default: the OS user."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return f"uid:{os.getuid()}"


# -- results ------------------------------------------------------------------------


def _ok(data: dict[str, Any]) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(data, sort_keys=True))],
        structured_content=data,
    )


def _error(exc: SessionError) -> CallToolResult:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, VersionConflict):
        body["current_version"] = exc.current
    data = {"error": body}
    return CallToolResult(
        content=[TextContent(type="text", text=f"{exc.code}: {exc.message}")],
        structured_content=data,
        is_error=True,
    )


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="milliseconds")


# -- the middleware -------------------------------------------------------------------


class SessionLayer:
    """The session middleware for one ``MCPServer`` and one :class:`Supervisor`."""

    def __init__(self, server: MCPServer[Any], supervisor: Supervisor, principal: str) -> None:
        self.server = server
        self.supervisor = supervisor
        self.principal = principal

    def _session_param(self, name: object) -> str | None:
        """``"required"``/``"optional"`` if the tool declares a ``session`` parameter, else None."""
        if not isinstance(name, str):
            return None
        tool = self.server._tool_manager.get_tool(name)
        if tool is None or "session" not in tool.parameters.get("properties", {}):
            return None
        return "required" if "session" in tool.parameters.get("required", ()) else "optional"

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        connection = _connection_var.get()
        if connection is None or connection.layer is not self:  # not a connection we serve
            return await call_next(ctx)
        method = ctx.method
        if ctx.request_id is None:
            result = await call_next(ctx)
            if method == "notifications/initialized":
                self._initialized(connection)
            return result
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and method != "initialize"
        if connection.era is None:
            connection.era = "modern" if modern else "handshake"
        if method == "initialize":
            await self._open_connection_session(connection, ctx.params or {})
        env_token = _env.set(_RequestEnv(self, connection, modern))
        rid_token = _log_request_id.set(str(ctx.request_id))
        try:
            if method == "tools/call":
                return await self._call_tool(ctx, call_next, connection, modern)
            session = connection.session if not modern else None
            if session is None or not session.live:
                return await call_next(ctx)
            sid_token = _log_session_id.set(session.id)
            try:
                async with self.supervisor.request(session):
                    result = await call_next(ctx)
                return result
            finally:
                _log_session_id.reset(sid_token)
        finally:
            _log_request_id.reset(rid_token)
            _env.reset(env_token)

    async def _call_tool(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        connection: _Connection,
        modern: bool,
    ) -> HandlerResult:
        params = ctx.params or {}
        arguments = params.get("arguments")
        try:
            session = await self._target(params.get("name"), arguments, connection, modern)
        except SessionError as exc:
            return _error(exc)
        raised: list[SessionError] = []  # what the tool's body raised, via our helpers
        holder_token = _raised.set(raised)
        try:
            if session is None:
                return _with_code(await call_next(ctx), raised)
            return await self._call_in_session(ctx, call_next, session, raised)
        finally:
            _raised.reset(holder_token)

    async def _call_in_session(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        session: Session,
        raised: list[SessionError],
    ) -> HandlerResult:
        params = ctx.params or {}
        sid_token = _log_session_id.set(session.id)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("tool call %r", params.get("name"))
        try:
            async with self.supervisor.request(session) as scope:
                token = _current.set(SessionContext(session, self.supervisor))
                try:
                    result = _with_code(await call_next(ctx), raised)
                finally:
                    _current.reset(token)
                if _is_tool_error(result):
                    scope.mark_failed()
            return result
        except SessionError as exc:  # refused on entry, or ended while running
            return _error(exc)
        finally:
            _log_session_id.reset(sid_token)

    async def _target(
        self, name: object, arguments: object, connection: _Connection, modern: bool
    ) -> Session | None:
        """The session a tool call runs in, or ``None``; raises the tool error to return."""
        param = self._session_param(name)
        if param is None:
            # Still a request on the connection, for accounting.
            session = connection.session if not modern else None
            return session if session is not None and session.live else None
        handle = arguments.get("session") if isinstance(arguments, dict) else None
        if handle is not None:
            if not isinstance(handle, str) or not handle:
                raise SessionNotFound()
            return await self.supervisor.resolve_handle(handle, self.principal)
        if modern or connection.session is None or param == "required":
            raise SessionRequired()
        return self.supervisor.get(connection.session.id)

    async def _open_connection_session(
        self, connection: _Connection, params: Mapping[str, Any]
    ) -> None:
        if connection.session is not None:
            return
        info = params.get("clientInfo")
        info = info if isinstance(info, dict) else {}
        caps = params.get("capabilities")
        client = ClientInfo(
            name=_str_or_none(info.get("name")),
            version=_str_or_none(info.get("version")),
            protocol_version=_str_or_none(params.get("protocolVersion")),
            capabilities=caps if isinstance(caps, dict) else {},
        )
        try:
            connection.session = await self.supervisor.create_session(
                kind=SessionKind.CONNECTION, principal=self.principal, client=client, ready=False
            )
        except SessionError as exc:
            # A limit or a store outage must not make the connection unusable:
            # serve it without a connection session (tools that need one say so).
            logger.warning("serving this connection without a session: %s", exc)
            return
        logger.info("connection session opened for client %s", client.name or "?",
                    extra={"session_id": connection.session.id})  # fmt: skip

    def _initialized(self, connection: _Connection) -> None:
        session = connection.session
        if session is not None and session.state is SessionState.INITIALIZING:
            self.supervisor.mark_ready(session)

    async def disconnect(self, connection: _Connection) -> None:
        """The stream ended: end its connection session with ``disconnected``."""
        session = connection.session
        if session is not None and session.live:
            await self.supervisor.close(session, TerminationReason.DISCONNECTED)

    # -- resources --------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        store = self.supervisor.store
        store_info: dict[str, Any] = {"backend": "none", "healthy": True}
        if store is not None:
            with trio.move_on_after(5):
                h = await self.supervisor.store_health()
                assert h is not None
                store_info = {
                    "backend": h.backend,
                    "healthy": h.ok,
                    "latency_ms": round(h.latency_s * 1000, 3) if h.latency_s is not None else None,
                    "error": h.error,
                    "schema_version": h.schema_version,
                }
            if "latency_ms" not in store_info:
                store_info = {"backend": store.backend, "healthy": False, "error": "timed out"}
        stats = self.supervisor.statistics()
        status = "ok" if store_info["healthy"] else "degraded"
        return {
            "status": status if self.supervisor.admitting else "stopping",
            "sessions": {
                "live": sum(stats.live_by_state.values()),
                "by_state": {
                    state.value: count
                    for state, count in stats.live_by_state.items()
                    if state is not SessionState.TERMINATED
                },
            },
            "store": store_info,
            "cleanup": {
                "last_run": _iso(self.supervisor.last_cleanup),
                "runs": stats.cleanup_runs,
                "expired": stats.expired,
            },
            "uptime_s": round(stats.uptime, 3),
        }


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _layer_env() -> _RequestEnv:
    env = _env.get()
    if env is None:
        raise RuntimeError("session tools run only under serve_stdio")
    return env


def _snapshot_times(snap: SessionSnapshot) -> dict[str, Any]:
    expires = snap.idle_expires_at if snap.idle_expires_at is not None else snap.expires_at
    return {
        "id": snap.id,
        "kind": snap.kind.value,
        "state": snap.state.value,
        "created_at": _iso(snap.created_at),
        "last_active": _iso(snap.last_active),
        "idle_timeout_s": snap.idle_timeout,
        "expires_at": _iso(min(expires, snap.expires_at)),
    }


def _record_summary(record: SessionRecord) -> dict[str, Any]:
    idle_end = record.last_active + record.idle_timeout if record.state == LIVE else None
    expires = min(record.expires_at, idle_end) if idle_end is not None else record.expires_at
    return {
        "id": record.id,
        "kind": record.kind,
        "state": record.state,
        "created_at": _iso(record.created_at),
        "last_active": _iso(record.last_active),
        "idle_timeout_s": record.idle_timeout,
        "expires_at": _iso(expires),
    }


# -- the built-in tools -----------------------------------------------------------------

_Handle = Annotated[
    str | None,
    Field(description="A session handle from session_open; optional on a handshake-era connection"),
]


async def session_open(
    idle_timeout_s: Annotated[
        float | None, Field(gt=0, description="Idle timeout in seconds (default: server's)")
    ] = None,
    metadata: Annotated[
        dict[str, Any] | None, Field(description="Free-form JSON kept with the session")
    ] = None,
) -> CallToolResult:
    """Open a session and return its secret handle. Pass the handle as `session` to later calls."""
    env = _layer_env()
    layer = env.layer
    try:
        session, handle = await layer.supervisor.open_handle_session(
            principal=layer.principal, metadata=metadata, idle_timeout=idle_timeout_s
        )
    except SessionError as exc:
        return _error(exc)
    times = _snapshot_times(session.snapshot())
    return _ok(
        {
            "session": handle,
            "id": session.id,
            "state": times["state"],
            "idle_timeout_s": times["idle_timeout_s"],
            "expires_at": times["expires_at"],
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
        return _error(exc)
    if ctx.session.reason is not TerminationReason.CLOSED:
        return _error(gone(ctx.session.id, ctx.session.reason))  # it had ended otherwise
    return _ok({"id": ctx.session.id, "state": "terminated", "reason": "closed"})


async def session_info(session: _Handle = None) -> CallToolResult:
    """Describe a session: state, times, counters and state version."""
    ctx = current_session()
    snap = ctx.session.snapshot()
    data = _snapshot_times(snap)
    data.update(requests=snap.requests, errors=snap.errors, version=snap.version)
    return _ok(data)


async def session_list() -> CallToolResult:
    """List the caller's live sessions (public ids only, never handles)."""
    layer = _layer_env().layer
    try:
        records = await layer.supervisor.list_records(layer.principal)
    except SessionError as exc:
        return _error(exc)
    return _ok({"sessions": [_record_summary(r) for r in records]})


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
    return _ok({"state": doc, "version": ctx.version})


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
        return _error(exc)
    return _ok({"version": version})


_TOOL_FUNCS = (
    session_open,
    session_close,
    session_info,
    session_list,
    session_state_get,
    session_state_patch,
)


async def _health_resource() -> str:
    return json.dumps(await _layer_env().layer.health(), sort_keys=True)


async def _metrics_resource() -> str:
    return _layer_env().layer.supervisor.render_prometheus()


def install_session_tools(server: MCPServer[Any]) -> None:
    """Register the built-in session tools on ``server`` (idempotent)."""
    for fn in _TOOL_FUNCS:
        if server._tool_manager.get_tool(fn.__name__) is None:
            server.add_tool(fn, name=fn.__name__, structured_output=False)


def install_session_resources(server: MCPServer[Any]) -> None:
    """Register ``sessions://health`` and ``sessions://metrics`` on ``server`` (idempotent)."""
    if server._resource_manager._resources.get(HEALTH_URI) is not None:
        return
    server.add_resource(
        FunctionResource.from_function(
            _health_resource,
            uri=HEALTH_URI,
            name="sessions-health",
            description="Health of the session runtime (JSON)",
            mime_type="application/json",
        )
    )
    server.add_resource(
        FunctionResource.from_function(
            _metrics_resource,
            uri=METRICS_URI,
            name="sessions-metrics",
            description="Session runtime metrics (Prometheus text)",
            mime_type="text/plain; version=0.0.4",
        )
    )


# -- serving ---------------------------------------------------------------------------


async def serve_connection(
    server: MCPServer[Any],
    layer: SessionLayer,
    transport: StdioTransport,
) -> None:
    """Serve one connection (one stream pair) with ``layer``; end its session at EOF."""
    lowlevel = server._lowlevel_server
    connection = _Connection(layer)
    token = _connection_var.set(connection)
    try:
        async with lowlevel.lifespan(lowlevel) as lifespan_state:

            async def loop(read_stream: Any, write_stream: Any) -> None:
                await serve_dual_era_loop(
                    lowlevel,
                    read_stream,
                    write_stream,
                    lifespan_state=lifespan_state,
                    init_options=lowlevel.create_initialization_options(),
                )

            await transport.serve(loop)
    finally:
        _connection_var.reset(token)
        with trio.CancelScope(shield=True):
            await layer.disconnect(connection)


async def serve_stdio(
    server: MCPServer[Any],
    *,
    settings: Settings | None = None,
    hooks: Hooks | None = None,
    principal: str | None = None,
    session_tools: bool = True,
    session_resources: bool = True,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    shutdown_grace: float | None = None,
    supervisor: Supervisor | None = None,
    store: SessionStore | str | None = None,
    stdin: trio.abc.ReceiveStream | None = None,
    stdout: trio.abc.SendStream | None = None,
    handle_signals: bool | None = None,
) -> None:
    """Serve ``server`` over stdio with the session layer until the client goes away.

    Returns normally on stdin EOF, SIGINT, SIGTERM and a broken stdout: in-flight
    requests get ``shutdown_grace`` seconds (default ``settings.shutdown_grace``),
    the connection session ends with ``disconnected``, and the supervisor shuts
    down gracefully.

    ``stdin``/``stdout`` default to the process's fds 0 and 1 (claimed for the
    protocol: stray writes to fd 1 go to stderr while serving). Pass a running
    ``supervisor`` to share sessions between several connections, or a
    ``store`` (a :class:`SessionStore` or a URL such as ``sqlite:///path.db``
    or ``postgresql://...``) to keep sessions across restarts and processes;
    without either, sessions live in memory.
    """
    if isinstance(store, str):
        from ._store_url import store_from_url

        store = store_from_url(store)
    settings = settings or (supervisor.settings if supervisor is not None else Settings())
    grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
    if session_tools:
        install_session_tools(server)
    if session_resources:
        install_session_resources(server)
    if max_message_size <= 0:
        raise ValueError("max_message_size must be positive")
    restore: Callable[[], None] | None = None
    stdout_fd: int | None = None
    if stdin is None or stdout is None:
        fd_in, fd_out, restore = claim_stdio()
        stdin, stdout, stdout_fd = fd_in, fd_out, fd_out.fileno()
        if handle_signals is None:
            handle_signals = True
    try:
        transport = StdioTransport(
            stdin, stdout, max_message_size=max_message_size, grace=grace, stdout_fd=stdout_fd
        )
        async with trio.open_nursery() as nursery:
            if handle_signals:
                # For the whole run, not just while reading: a SIGTERM that comes
                # while the connection session's teardown runs must not kill us.
                await nursery.start(forward_signals, transport)
            if supervisor is not None:
                await _serve_with(server, supervisor, principal, transport)
            else:
                async with open_supervisor(settings, hooks=hooks, store=store) as own:
                    await _serve_with(server, own, principal, transport)
                    await own.shutdown(grace=0 if transport.broken else grace)
            nursery.cancel_scope.cancel()
    finally:
        if restore is not None:
            await stdin.aclose()
            await stdout.aclose()
            restore()
    logger.info("stdio server stopped (%s)", transport.stop_reason)


async def _serve_with(
    server: MCPServer[Any], supervisor: Supervisor, principal: str | None, transport: StdioTransport
) -> None:
    layer = SessionLayer(server, supervisor, principal or default_principal())
    middleware = server.middleware
    middleware.append(layer)
    try:
        await serve_connection(server, layer, transport)
    finally:
        middleware.remove(layer)


def run_stdio(server: MCPServer[Any], **kwargs: Any) -> None:
    """Serve ``server`` over stdio with the session layer (blocks; runs trio).

    Takes the keyword arguments of :func:`serve_stdio`, and any
    :class:`Settings` field directly (``run_stdio(server, idle_timeout=600)``).
    Returns when the client goes away or on SIGINT/SIGTERM; a stdio server
    that ends that way has succeeded, so the process should exit 0.
    """
    _ensure_standard_fds()
    fields = {f.name for f in attrs.fields(Settings)}
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if overrides:
        base = kwargs.pop("settings", None) or Settings()
        kwargs["settings"] = Settings.from_mapping({**base.to_mapping(), **overrides})
    try:
        trio.run(_run, server, kwargs)
    except KeyboardInterrupt:  # a SIGINT before our handler was installed
        logger.info("interrupted")


def _ensure_standard_fds() -> None:
    """Give a closed fd 0, 1 or 2 a ``/dev/null`` before trio opens anything.

    A client may start us with stdin closed; the next fd opened (trio's own
    wakeup socket) would then *be* fd 0, and claiming stdio would clobber it.
    A closed stdin then simply reads as EOF.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


async def _run(server: MCPServer[Any], kwargs: dict[str, Any]) -> None:
    await serve_stdio(server, **kwargs)
