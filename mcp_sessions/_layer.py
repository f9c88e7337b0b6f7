"""The session layer: one ``ServerMiddleware`` that runs every request in its session.

Theory of operation
===================

A :class:`SessionLayer` serves one ``MCPServer`` with one :class:`Supervisor`
for one principal. The transport driver (``_stdio``) opens a connection with
:meth:`SessionLayer.connection` around the SDK's loop: a context variable then
names the connection in every task the loop starts (one stdio stream is one
connection), and the connection's session ends with ``disconnected`` when the
block exits. For each request on a connection of its own, the layer:

- handshake era: creates the connection session at ``initialize`` (it stays
  INITIALIZING until ``notifications/initialized``), and runs every request on
  the connection inside ``supervisor.request(session)``;
- modern era (2026-07-28): no connection session; each request stands alone;
- ``tools/call``: if the tool declares a ``session`` parameter, resolves it
  (a handle, or in the handshake era the connection session when omitted) and
  runs the tool inside that session's request scope, with
  :func:`~mcp_sessions.current_session` set. Failures become tool execution
  errors with ``{"error": {"code", "message"}}``; the SDK's rejection of a
  built-in tool's arguments becomes ``invalid_arguments`` (user tools keep
  the SDK's error).

Who owns what: the layer owns its connections (era, connection session) and
is the only writer of the request context variables in ``_context``; the
supervisor owns the sessions; the SDK owns the tasks the requests run in.

Which tools declare ``session`` is read from the server's public
``list_tools()`` into :class:`_SessionParams` (or, if the server has a
``session_parameter(tool)`` method, from that), never per call: when serving
starts (:meth:`SessionLayer.refresh_tools`), whenever a client lists the tools
(``tools/list``), and whenever a call names a tool the map has not seen. The
SDK does not tell anyone when a tool is added or removed, so:

- a tool added while serving is found on its first call;
- a tool *replaced* under a name the map knows (``remove_tool`` then
  ``add_tool``) is seen after the next ``tools/list``: the protocol's way to
  announce it is ``notifications/tools/list_changed``, and a client that gets
  one lists the tools again. Until then calls use the old declaration.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import attrs
import trio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from ._context import (
    capture_errors,
    in_session,
    is_generic_error,
    is_tool_error,
    log_request,
    log_session,
    serving,
    tool_error,
    with_code,
)
from ._errors import SessionError, SessionNotFound, SessionRequired
from ._runtime import ClientInfo, Session, SessionKind, Supervisor
from ._state import SessionState, TerminationReason
from ._tools import argument_error, is_builtin

__all__ = ["SessionLayer"]

logger = logging.getLogger("mcp_sessions.server")

SessionParam = Literal["required", "optional"]

#: JSON-RPC's "server error" range: the handshake refused by the server, not the client.
SERVER_ERROR = -32000


@attrs.define
class _Connection:
    """One stream: its era once decided, and its connection session (handshake era)."""

    layer: SessionLayer
    #: Who is calling: the layer's principal unless the transport names one.
    principal: str
    era: str | None = None
    session: Session | None = None
    #: A secret the transport gave the connection (HTTP's ``Mcp-Session-Id``):
    #: its connection session is opened with it as its handle, so it can be
    #: found again by it (in another process, after a restart).
    handle: str | None = None
    #: Many callers share the principal (anonymous HTTP): see ``Served.shared``.
    shared: bool = False
    #: Set once the connection session exists.
    opened: trio.Event = attrs.field(factory=trio.Event)


_connection_var: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "mcp_sessions_connection", default=None
)


class _SessionParams:
    """Tool name -> its ``session`` parameter and whether it is built in, from ``list_tools()``."""

    def __init__(self, server: MCPServer[Any]) -> None:
        self._server = server
        self._by_name: dict[str, tuple[SessionParam | None, bool]] = {}

    async def refresh(self) -> None:
        # A server may say itself which tools take our ``session`` (the gateway
        # does: an upstream's own ``session`` argument is the upstream's business).
        declared = getattr(self._server, "session_parameter", None)
        read = declared if callable(declared) else lambda tool: _session_param(tool.input_schema)
        # One new dict, swapped in whole: a lookup never sees half a map.
        self._by_name = {
            tool.name: (read(tool), is_builtin(tool)) for tool in await self._server.list_tools()
        }

    async def lookup(self, name: object) -> SessionParam | None:
        """``"required"``/``"optional"`` if the tool declares ``session``, else ``None``."""
        if not isinstance(name, str):
            return None
        if name not in self._by_name:  # a tool added since the last refresh, or no such tool
            await self.refresh()
        return self._by_name.get(name, (None, False))[0]

    def builtin(self, name: object) -> bool:
        """Whether ``name`` is a built-in session tool (as of the last lookup)."""
        return isinstance(name, str) and self._by_name.get(name, (None, False))[1]


def _session_param(schema: Mapping[str, Any]) -> SessionParam | None:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or "session" not in properties:
        return None
    required = schema.get("required")
    return "required" if isinstance(required, list) and "session" in required else "optional"


class SessionLayer:
    """The session middleware for one ``MCPServer`` and one :class:`Supervisor`."""

    def __init__(self, server: MCPServer[Any], supervisor: Supervisor, principal: str) -> None:
        self.server = server
        self.supervisor = supervisor
        self.principal = principal
        self._params = _SessionParams(server)

    async def refresh_tools(self) -> None:
        """Re-read which of the server's tools declare a ``session`` parameter.

        The layer does it when serving starts, on every ``tools/list``, and
        when a call names a tool it has not seen.
        """
        await self._params.refresh()

    @asynccontextmanager
    async def connection(
        self, *, principal: str | None = None, handle: str | None = None
    ) -> AsyncIterator[_Connection]:
        """Requests in the block are on one new connection; at exit its session ends.

        Wrap the SDK loop serving one stream in it: every task the loop starts
        inherits the connection. ``principal`` overrides the layer's for this
        connection; ``handle`` becomes its connection session's handle.
        """
        connection = _Connection(self, principal or self.principal, handle=handle)
        token = _connection_var.set(connection)
        try:
            yield connection
        finally:
            _connection_var.reset(token)
            with trio.CancelScope(shield=True):
                await self.disconnect(connection)

    def new_connection(
        self,
        principal: str | None = None,
        *,
        handle: str | None = None,
        session: Session | None = None,
        shared: bool = False,
    ) -> _Connection:
        """A connection to serve with :meth:`bind` (a transport whose requests arrive in
        tasks of their own, as HTTP's do). ``session``: an existing connection session
        (brought back from the store by its handle). End it with :meth:`disconnect`."""
        connection = _Connection(self, principal or self.principal, handle=handle, shared=shared)
        if session is not None:
            connection.era, connection.session = "handshake", session
            connection.opened.set()
        return connection

    @contextmanager
    def bind(self, connection: _Connection) -> Iterator[None]:
        """Requests started in the block (and the tasks they start) are on ``connection``."""
        token = _connection_var.set(connection)
        try:
            yield
        finally:
            _connection_var.reset(token)

    @contextmanager
    def request(self, principal: str | None = None, *, shared: bool = False) -> Iterator[None]:
        """One stand-alone request (a 2026-07-28 HTTP exchange) by ``principal``.

        No connection session: such requests reach sessions only through handles.
        """
        connection = self.new_connection(principal, shared=shared)
        connection.era = "modern"
        with self.bind(connection):
            yield

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
        with (
            serving(
                self.supervisor,
                connection.principal,
                shared=connection.shared,
                connection=connection.session,
            ),
            log_request(ctx.request_id),
        ):
            if method == "tools/call":
                return await self._call_tool(ctx, call_next, connection, modern)
            if method == "tools/list":  # what the client sees, the layer knows
                await self._params.refresh()
            session = connection.session if not modern else None
            if session is None or not session.live:
                return await call_next(ctx)
            with log_session(session.id):
                async with self.supervisor.request(session):
                    result = await call_next(ctx)
                return result

    async def _call_tool(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        connection: _Connection,
        modern: bool,
    ) -> HandlerResult:
        params = ctx.params or {}
        name, arguments = params.get("name"), params.get("arguments")
        try:
            session = await self._target(name, arguments, connection, modern)
        except SessionError as exc:
            return tool_error(exc)
        with capture_errors() as raised:  # what the tool's body raised, via our helpers
            if session is None:
                result = with_code(await call_next(ctx), raised)
            else:
                result = await self._call_in_session(ctx, call_next, session, raised)
        if is_generic_error(result) and self._params.builtin(name):
            # The SDK rejected the arguments (our tools return their own errors).
            why = argument_error(str(name), arguments if isinstance(arguments, dict) else None)
            if why is not None:
                return tool_error(why)
        return result

    async def _call_in_session(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        session: Session,
        raised: list[SessionError],
    ) -> HandlerResult:
        with log_session(session.id):
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("tool call %r", (ctx.params or {}).get("name"))
            try:
                async with self.supervisor.request(session) as scope:
                    with in_session(session, self.supervisor):
                        result = with_code(await call_next(ctx), raised)
                    if is_tool_error(result):
                        scope.mark_failed()
                return result
            except SessionError as exc:  # refused on entry, or ended while running
                return tool_error(exc)

    async def _target(
        self, name: object, arguments: object, connection: _Connection, modern: bool
    ) -> Session | None:
        """The session a tool call runs in, or ``None``; raises the tool error to return."""
        param = await self._params.lookup(name)
        if param is None:
            # Still a request on the connection, for accounting.
            session = connection.session if not modern else None
            return session if session is not None and session.live else None
        handle = arguments.get("session") if isinstance(arguments, dict) else None
        if handle is not None:
            if not isinstance(handle, str) or not handle:
                raise SessionNotFound()
            return await self.supervisor.resolve_handle(handle, connection.principal)
        if modern or connection.session is None or param == "required":
            raise SessionRequired()
        # (An HTTP session's transport checks it against the store before each request.)
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
                kind=SessionKind.CONNECTION,
                principal=connection.principal,
                client=client,
                ready=False,
                handle=connection.handle,
            )
        except SessionError as exc:
            if connection.handle is not None:
                # An HTTP session is nothing without its connection session (no
                # limit, no expiry, no record): refuse the handshake instead.
                logger.warning("refusing a session: %s", exc)
                raise MCPError(SERVER_ERROR, str(exc), {"code": exc.code}) from None
            # A limit or a store outage must not make a stdio connection unusable:
            # serve it without a connection session (tools that need one say so).
            logger.warning("serving this connection without a session: %s", exc)
            return
        connection.opened.set()
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


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
