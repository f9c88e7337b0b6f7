"""Streamable HTTP: the session layer for hosted servers.

Theory of operation
===================

:func:`serve_http` runs one ASGI application under anycorn (an anyio fork of
hypercorn: it serves under trio and tells an application when its client
went away, which hypercorn's trio worker does not, hypercorn issue #210; a
2026-07-28 request is cancelled by closing its response stream, so that
matters). The application routes by path:

- ``/mcp``: the MCP endpoint. The caller's principal is decided first
  (:class:`Principals`: bearer tokens, a library hook, or ``anonymous``); a
  request without one gets 401. Then by era:

  - a 2026-07-28 request (its ``MCP-Protocol-Version`` header is not a
    handshake version) stands alone: the SDK's own session manager serves it
    (``StreamableHTTPSessionManager.handle_request``, stateless), inside
    :meth:`SessionLayer.request` so the layer knows who calls;
  - a handshake-era request belongs to an HTTP session (:class:`_HttpSessions`):
    ``initialize`` without ``Mcp-Session-Id`` opens one, whose id is a fresh
    secret that becomes its connection session's handle in our runtime. The
    session's SDK loop runs in this module's nursery inside
    :meth:`SessionLayer.connection`; it ends on ``DELETE`` (reason
    ``closed``), when our runtime ends the connection session (idle timeout,
    lifetime, an operator's close: the id then answers 404), or at shutdown.
    An id this process does not know is looked up in the store by its hash
    and, if live and the caller's, *resumed*: a loop is started for it, born
    initialized from the record's client info, so a load balancer without
    stickiness or a restart does not cost the client its session.

- ``/healthz`` (200 while serving), ``/readyz`` (200 when the store answers
  and sessions are admitted, else 503, with the health document),
  ``/metrics`` (the Prometheus text of ``sessions://metrics``).

Draining (the first SIGINT/SIGTERM under :func:`run_http`): anycorn stops
accepting, closes idle keep-alive connections and gives the requests it is
serving ``shutdown_grace`` seconds (``graceful_timeout``), closing each
connection once its response is out. It cannot tell a call in flight from a
stream that only listens, so those we end ourselves
(:func:`_end_listen_streams`): each handshake-era session's GET stream (the
SDK's ``close_standalone_sse_stream``; a new GET is then 503) and the
2026-07-28 ``subscriptions/listen`` streams (the SDK's ``ListenHandler.close``:
the client hears a graceful end). A response's last body message (HTTP/1.x) is sent
shielded (:func:`_last_body_shielded`): anycorn arms a connection's keep-alive
timer inside that ``send``, and the SDK's handlers cancel their own task group
as the response ends, which left the connection idle without a timer, held
open until the grace ran out. So with no call in flight the process exits at
once; with calls in flight, once they are answered. Then the HTTP sessions'
transports stop and the supervisor shuts the sessions down (kept in a durable
store, to be resumed). A second signal cancels everything at once.

Who owns what: :func:`serve_http` owns the supervisor (unless given one), the
HTTP sessions' nursery and the ASGI server; each HTTP session's loop task
owns its transport; the supervisor owns the sessions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import trio
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
from mcp.server.auth.provider import TokenVerifier, principal_components
from mcp.server.connection import Connection
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import serve_connection, serve_loop
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import ListenHandler
from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    ClientCapabilities,
    ErrorData,
    Implementation,
    InitializeRequestParams,
    JSONRPCError,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ._errors import SessionError
from ._hooks import Hooks
from ._layer import SessionLayer
from ._resources import health, install_session_resources
from ._runtime import Session, SessionKind, Supervisor, open_supervisor
from ._settings import Settings
from ._state import SessionState, TerminationReason
from ._stdio import _lowlevel, initialization_options
from ._store import SessionStore, StoreUnavailable
from ._tools import install_session_tools

__all__ = ["Principals", "load_bearer_tokens", "run_http", "serve_http"]

logger = logging.getLogger("mcp_sessions.http")

ANONYMOUS = "anonymous"
MCP_PATH = "/mcp"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PROTOCOL_HEADER = b"mcp-protocol-version"
#: How long an ended HTTP session's answers in flight may take to get out.
_ANSWER_GRACE = 5.0

PrincipalFrom = Callable[[Request], Awaitable[str | None]]


# -- who is calling ------------------------------------------------------------------


def load_bearer_tokens(path: str | Path) -> dict[str, str]:
    """Read a bearer-token file: ``{"<principal>": ["sha256:<hex>", ...]}``.

    Returns token digest (hex) -> principal. Raises :class:`ValueError` naming
    the principal and entry that are wrong.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read bearer tokens from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of principal -> list of digests")
    digests: dict[str, str] = {}
    for principal, entries in data.items():
        if not principal or not isinstance(entries, list):
            raise ValueError(f"{path}: {principal!r}: expected a list of 'sha256:<hex>' strings")
        for entry in entries:
            if not isinstance(entry, str) or not entry.startswith("sha256:"):
                raise ValueError(f"{path}: {principal!r}: {entry!r} is not 'sha256:<hex>'")
            hexdigest = entry.removeprefix("sha256:").lower()
            if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                raise ValueError(f"{path}: {principal!r}: {entry!r} is not a SHA-256 hex digest")
            if digests.setdefault(hexdigest, principal) != principal:
                raise ValueError(f"{path}: one token is listed for two principals")
    return digests


@attrs.frozen
class Principals:
    """How a request's principal is decided: bearer-token digests, the SDK's token
    verifier, a hook, or nobody (everyone is ``anonymous``)."""

    #: SHA-256 hex digest of a token -> its principal.
    tokens: Mapping[str, str] | None = None
    hook: PrincipalFrom | None = None
    #: The SDK's ``TokenVerifier``: requests carry its ``AuthenticatedUser``.
    verifier: TokenVerifier | None = None

    @property
    def anonymous(self) -> bool:
        return self.tokens is None and self.hook is None and self.verifier is None

    async def of(self, request: Request) -> str | None:
        """The caller's principal, or ``None`` (answer 401)."""
        if self.hook is not None:
            return await self.hook(request)
        if self.verifier is not None:
            user = request.scope.get("user")
            return principal_of_token(user) if isinstance(user, AuthenticatedUser) else None
        if self.tokens is None:
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.tokens.get(hashlib.sha256(token.strip().encode()).hexdigest())


def principal_of_token(user: AuthenticatedUser) -> str:
    """The principal an SDK access token stands for: its subject (else its client id),
    qualified by its issuer when the verifier gives one."""
    client_id, issuer, subject = principal_components(user.access_token)
    who = subject or client_id
    return f"{issuer}#{who}" if issuer else who


# -- handshake-era sessions ------------------------------------------------------------


@attrs.define(eq=False)
class _HttpSession:
    """One handshake-era HTTP session: its transport and its connection in the layer."""

    transport: StreamableHTTPServerTransport
    connection: Any  # the layer's connection (principal, connection session)
    #: POSTs being answered: when the session ends, their answers are let out first.
    posts: int = 0
    posts_done: trio.Event = attrs.field(factory=trio.Event)

    @contextmanager
    def post(self) -> Iterator[None]:
        self.posts += 1
        try:
            yield
        finally:
            self.posts -= 1
            if self.posts == 0:
                self.posts_done.set()
                self.posts_done = trio.Event()

    async def answered(self) -> None:
        """Wait until no POST is being answered (bound it with a cancel scope)."""
        while self.posts:
            await self.posts_done.wait()


class _HttpSessions:
    """The handshake-era HTTP sessions this process serves, by ``Mcp-Session-Id``.

    The SDK runs each request's handler in the context of the HTTP request
    that carried it, so every request is bound to its session's connection
    (:meth:`SessionLayer.bind`) where it arrives, not where the loop runs.
    """

    def __init__(
        self,
        server: MCPServer[Any],
        layer: SessionLayer,
        security: TransportSecuritySettings | None,
        lifespan_state: Any,
    ) -> None:
        self._lowlevel = _lowlevel(server)
        self._init_options = initialization_options(server)
        self._layer = layer
        self._security = security
        self._lifespan_state = lifespan_state
        self._sessions: dict[str, _HttpSession] = {}
        self._resuming: dict[tuple[str, str], trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._draining = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                for http in list(self._sessions.values()):
                    with trio.CancelScope(shield=True):
                        await http.transport.terminate()
                nursery.cancel_scope.cancel()

    def drain(self) -> None:
        """End every session's GET stream (it only waits for server messages: nothing is
        lost, the client listens again elsewhere) and refuse new ones, so that only
        requests being answered hold the server's graceful shutdown."""
        self._draining = True
        for http in list(self._sessions.values()):
            http.transport.close_standalone_sse_stream()

    async def handle(
        self, principal: str, shared: bool, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if self._draining and scope["method"] == "GET":
            await _json_error(send, 503, INTERNAL_ERROR, "Server is shutting down")
            return
        session_id = Request(scope).headers.get(MCP_SESSION_ID_HEADER)
        if session_id is None:
            await self._open(principal, shared, scope, receive, send)
            return
        http = self._sessions.get(session_id)
        try:
            if http is not None and http.connection.principal == principal:
                http = await self._still_live(session_id, http)
            elif http is None:
                http = await self._resume(session_id, principal, shared)
        except StoreUnavailable as exc:
            await _json_error(send, 503, INTERNAL_ERROR, f"Session store unavailable: {exc}")
            return
        if http is None or http.connection.principal != principal:
            await _json_error(send, 404, INVALID_REQUEST, "Session not found")
            return
        if scope["method"] == "DELETE":
            send = self._closing_on_delete(session_id, http, send)
        answering = http.post() if scope["method"] == "POST" else nullcontext()
        with self._layer.bind(http.connection), answering:
            await http.transport.handle_request(scope, receive, send)

    async def _still_live(self, session_id: str, http: _HttpSession) -> _HttpSession | None:
        """``http`` if its session is still live, as the store sees it (another
        instance or an operator may have ended it); else forget it (``None``: 404).

        No store round trip when nothing changed elsewhere (``resolve_handle``).
        """
        session = http.connection.session
        if session is None:
            return http  # resumed sessions always have one; a new one is opening
        if (
            session.live
            and session.state is not SessionState.INITIALIZING  # resolving would wait for it
            and self._layer.supervisor.store is not None
        ):
            try:
                await self._layer.supervisor.resolve_handle(session_id, http.connection.principal)
            except StoreUnavailable:
                return http  # serve what this process holds; the store decides later
            except SessionError:
                pass  # ended elsewhere: the local copy is now ended too
        if session.live:
            return http
        self._forget(session_id, http)
        return None

    def _closing_on_delete(self, session_id: str, http: _HttpSession, send: Send) -> Send:
        """``send`` for a DELETE: once the transport accepted it, forget the session and
        end it (``closed``) before the client hears so (or its id could resume it)."""

        replaced = False

        async def closing(message: Any) -> None:
            nonlocal replaced
            if replaced:
                return  # the transport's own answer, replaced by the 503 below
            if message["type"] == "http.response.start" and message["status"] < 300:
                self._forget(session_id, http)
                try:
                    await self._close(http)
                except StoreUnavailable as exc:
                    # Not closed: the record lives on, and the id resumes it later.
                    logger.warning("DELETE: could not close the session: %s", exc)
                    replaced = True
                    await _json_error(
                        send, 503, INTERNAL_ERROR, f"Session store unavailable: {exc}"
                    )
                    return
            await send(message)

        return closing

    def _new_transport(self, session_id: str) -> StreamableHTTPServerTransport:
        return StreamableHTTPServerTransport(
            mcp_session_id=session_id, security_settings=self._security
        )

    async def _open(
        self, principal: str, shared: bool, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if self._nursery is None:
            await _json_error(send, 503, INTERNAL_ERROR, "Server is shutting down")
            return
        session_id = secrets.token_urlsafe(32)
        connection = self._layer.new_connection(principal, handle=session_id, shared=shared)
        http = _HttpSession(self._new_transport(session_id), connection)
        self._sessions[session_id] = http
        established = False
        try:
            await self._nursery.start(self._run, session_id, http, None)
            with self._layer.bind(connection):
                status = await _send_and_report_status(
                    http.transport.handle_request, scope, receive, send
                )
            # Refused (a session limit, the store down): the client got an error
            # answer, and no HTTP session lives on without its connection session.
            established = status is not None and status < 400 and connection.session is not None
        finally:
            if not established:
                self._forget(session_id, http)
                with trio.CancelScope(shield=True):
                    await http.transport.terminate()

    async def _resume(self, session_id: str, principal: str, shared: bool) -> _HttpSession | None:
        """Bring back a session another process (or this one, before a restart) opened."""
        if self._nursery is None or self._layer.supervisor.store is None:
            return None
        key = (session_id, principal)  # another principal's attempt never answers for ours
        while (pending := self._resuming.get(key)) is not None:
            await pending.wait()  # another request is resuming it: wait for that one
            http = self._sessions.get(session_id)
            if http is not None:
                return http
            # It failed (the store down, say): try again ourselves, for our own answer.
        self._resuming[key] = done = trio.Event()
        try:
            try:
                session = await self._layer.supervisor.resolve_handle(session_id, principal)
            except StoreUnavailable:
                raise  # not "no such session": the client must not start over (503)
            except SessionError as exc:
                logger.debug("no HTTP session to resume: %s", exc)
                return None
            if session.kind is not SessionKind.CONNECTION:
                return None  # a handle session's handle is not an HTTP session id
            connection = self._layer.new_connection(
                principal, handle=session_id, session=session, shared=shared
            )
            http = _HttpSession(self._new_transport(session_id), connection)
            self._sessions[session_id] = http
            await self._nursery.start(self._run, session_id, http, _client_params(session))
            logger.info("HTTP session resumed from the store",
                        extra={"session_id": session.id})  # fmt: skip
            return http
        finally:
            del self._resuming[key]
            done.set()

    async def _run(
        self,
        session_id: str,
        http: _HttpSession,
        resumed: InitializeRequestParams | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The session's SDK loop, until DELETE, our runtime ends it, or shutdown."""
        connection = http.connection
        try:
            async with http.transport.connect() as (read, write), trio.open_nursery() as nursery:
                nursery.start_soon(self._follow, http, nursery.cancel_scope)
                task_status.started()
                with self._layer.bind(connection):
                    if connection.session is None:
                        await serve_loop(
                            self._lowlevel,
                            read,
                            write,
                            lifespan_state=self._lifespan_state,
                            session_id=session_id,
                            init_options=self._init_options,
                        )
                    else:
                        await self._serve_resumed(
                            session_id, connection.session, resumed, read, write
                        )
                nursery.cancel_scope.cancel()
        finally:
            self._forget(session_id, http)
            # The loop also ends at shutdown: then the session is not ended here but
            # kept in a durable store, to be resumed after a restart.

    async def _close(self, http: _HttpSession) -> None:
        session = http.connection.session
        if session is not None and session.live:
            with trio.CancelScope(shield=True):
                try:
                    await self._layer.supervisor.close(session, TerminationReason.CLOSED)
                except StoreUnavailable:
                    raise
                except SessionError as exc:
                    logger.warning("could not close session %s: %s", session.id, exc)

    async def _serve_resumed(
        self,
        session_id: str,
        session: Session,
        params: InitializeRequestParams | None,
        read: Any,
        write: Any,
    ) -> None:
        """A loop born initialized, from what the record kept of the handshake."""
        dispatcher: JSONRPCDispatcher[TransportContext] = JSONRPCDispatcher(
            read, write, inline_methods=frozenset({"initialize"})
        )
        connection = Connection(
            dispatcher,
            protocol_version=session.client.protocol_version or LATEST_HANDSHAKE_VERSION,
            session_id=session_id,
            client_params=params,
        )
        connection.initialized.set()
        await serve_connection(
            self._lowlevel,
            dispatcher,
            connection=connection,
            lifespan_state=self._lifespan_state,
            init_options=self._init_options,
        )

    async def _follow(self, http: _HttpSession, scope: trio.CancelScope) -> None:
        """When our runtime ends the connection session (idle, lifetime, an operator's
        close), end the HTTP session: its id then answers 404."""
        await http.connection.opened.wait()
        session = http.connection.session
        await self._layer.supervisor.wait_terminated(session)
        logger.info("HTTP session ended (%s)", session.reason.value if session.reason else "?",
                    extra={"session_id": session.id})  # fmt: skip
        self._forget(http.transport.mcp_session_id or "", http)
        # New requests now get 404; those being answered (the close's own reply, the
        # ``session_closed`` errors of cancelled calls) get out first, within bounds.
        with trio.move_on_after(_ANSWER_GRACE):
            await http.answered()
        with trio.CancelScope(shield=True):
            await http.transport.terminate()
        scope.cancel()

    def _forget(self, session_id: str, http: _HttpSession | None = None) -> None:
        """Stop serving ``session_id`` (only if it is still ``http``, when given)."""
        if http is None or self._sessions.get(session_id) is http:
            self._sessions.pop(session_id, None)


def _client_params(session: Session) -> InitializeRequestParams | None:
    client = session.client
    try:
        return InitializeRequestParams(
            protocol_version=client.protocol_version or LATEST_HANDSHAKE_VERSION,
            capabilities=ClientCapabilities.model_validate(dict(client.capabilities)),
            client_info=Implementation(name=client.name or "", version=client.version or ""),
        )
    except ValidationError:
        return None


# -- the application ---------------------------------------------------------------------


class HttpApp:
    """The ASGI application: ``/mcp`` and the operations endpoints."""

    def __init__(
        self,
        *,
        layer: SessionLayer,
        principals: Principals,
        modern: StreamableHTTPSessionManager,
        sessions: _HttpSessions,
        max_message_size: int,
    ) -> None:
        self.layer = layer
        self.supervisor = layer.supervisor
        self.principals = principals
        self._modern = modern
        self._sessions = sessions
        mcp: Any = RequestBodyLimitMiddleware(self._serve_mcp, max_message_size)
        if principals.verifier is not None:  # the SDK's own bearer auth, as its app does
            mcp = AuthenticationMiddleware(
                AuthContextMiddleware(mcp), backend=BearerAuthBackend(principals.verifier)
            )
        self._mcp = mcp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope.get("http_version", "1.1") in ("1.0", "1.1"):
            send = _last_body_shielded(send)
        path = scope["path"]
        if path == MCP_PATH or path == MCP_PATH + "/":
            await self._mcp(scope, receive, send)
        elif path == "/healthz" and scope["method"] in ("GET", "HEAD"):
            await _respond(send, 200, b'{"status": "ok"}\n', b"application/json")
        elif path == "/readyz" and scope["method"] in ("GET", "HEAD"):
            doc = await health(self.supervisor)
            status = 200 if doc["status"] == "ok" else 503
            await _respond(send, status, json.dumps(doc).encode() + b"\n", b"application/json")
        elif path == "/metrics" and scope["method"] in ("GET", "HEAD"):
            text = self.supervisor.render_prometheus().encode()
            await _respond(send, 200, text, b"text/plain; version=0.0.4; charset=utf-8")
        else:
            await _respond(send, 404, b'{"error": "not found"}\n', b"application/json")

    async def _serve_mcp(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            principal = await self.principals.of(Request(scope, receive))
        except Exception:
            logger.exception("deciding the caller's principal failed")
            await _json_error(send, 500, INTERNAL_ERROR, "Could not authenticate the request")
            return
        if principal is None:
            await _json_error(
                send, 401, INVALID_REQUEST, "Unauthorized", [(b"www-authenticate", b"Bearer")]
            )
            return
        version = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == _PROTOCOL_HEADER), None
        )
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            with self.layer.request(principal, shared=self.principals.anonymous):
                await self._modern.handle_request(scope, receive, send)
            return
        await self._sessions.handle(principal, self.principals.anonymous, scope, receive, send)


def _last_body_shielded(send: Send) -> Send:
    """``send`` that delivers a response's last body message shielded from cancellation.

    anycorn arms a connection's keep-alive timer (which also closes the idle connection
    when a graceful shutdown starts) from inside that ``send``, in the caller's task.
    The SDK's handlers cancel their own task group as the response ends (their
    disconnect watchers see the stream close): the timer's start was cancelled with
    it, and the idle connection then held a draining server for its whole grace.
    Only for HTTP/1.x: there anycorn shields its socket writes already, so this waits
    no longer than before; an HTTP/2 send can wait for the peer's flow-control
    window, which must stay cancellable (a second signal stops at once).
    """

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return sending


async def _lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol: nothing to do (serve_http owns start and stop)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json_error(
    send: Send,
    status: int,
    code: int,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=code, message=message))
    payload = body.model_dump_json(by_alias=True, exclude_unset=True).encode()
    await _respond(send, status, payload, b"application/json", headers)


async def _send_and_report_status(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> int | None:
    status: int | None = None

    async def watch(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, watch)
    return status


# -- serving -------------------------------------------------------------------------------


def loopback(host: str) -> bool:
    return host in _LOOPBACK


def _security(host: str) -> TransportSecuritySettings | None:
    """The SDK's DNS-rebinding protection, on for a loopback address (as the SDK does)."""
    if not loopback(host):
        return None
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )


async def serve_http(
    server: MCPServer[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: Settings | None = None,
    hooks: Hooks | None = None,
    store: SessionStore | str | None = None,
    supervisor: Supervisor | None = None,
    bearer_tokens: Mapping[str, str] | str | Path | None = None,
    principal_from: PrincipalFrom | None = None,
    token_verifier: TokenVerifier | None = None,
    allow_anonymous: bool = False,
    session_tools: bool = True,
    session_resources: bool = True,
    max_message_size: int = 4 * 1024 * 1024,
    shutdown_grace: float | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server`` over MCP Streamable HTTP at ``http://host:port/mcp`` with the
    session layer, until cancelled (or SIGINT/SIGTERM under :func:`run_http`).

    ``bearer_tokens`` (a digest map from :func:`load_bearer_tokens`, or the
    path of such a file) requires ``Authorization: Bearer``; the matching
    token's principal owns what the request opens. ``token_verifier`` (the
    SDK's ``TokenVerifier``) authenticates with the SDK's own bearer auth;
    the principal is the token's subject (else client id), qualified by its
    issuer. ``principal_from`` maps a request to a principal in your own way
    (``None``: 401); with a verifier, ``request.user`` is the SDK's
    ``AuthenticatedUser``. Without either,
    every caller is ``anonymous``, which a non-loopback ``host`` refuses
    unless ``allow_anonymous``. ``task_status.started`` gets the bound URLs.

    With ``handle_signals``, SIGINT or SIGTERM drains: no new connections,
    requests in flight get ``shutdown_grace`` seconds to be answered, idle
    connections and streams that only listen (GET, ``subscriptions/listen``)
    end at once, then sessions shut down and this returns. A second signal,
    or cancelling it, stops at once.
    """
    if isinstance(bearer_tokens, str | Path):
        bearer_tokens = load_bearer_tokens(bearer_tokens)
    principals = Principals(tokens=bearer_tokens, hook=principal_from, verifier=token_verifier)
    if principals.anonymous and not loopback(host) and not allow_anonymous:
        raise ValueError(
            f"serving {host} without authentication: give bearer tokens, or allow anonymous callers"
        )
    if max_message_size <= 0:
        raise ValueError("max_message_size must be positive")
    if isinstance(store, str):
        from ._store_url import store_from_url

        store = store_from_url(store)
    if session_tools:
        await install_session_tools(server)
    if session_resources:
        await install_session_resources(server)
    settings = settings or (supervisor.settings if supervisor is not None else Settings())
    grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
    options = _Options(principals, host, port, max_message_size, grace, handle_signals)
    if supervisor is not None:
        await _serve(server, supervisor, options, task_status)
        return
    async with open_supervisor(settings, hooks=hooks, store=store) as own:
        aborted = await _serve(server, own, options, task_status)
        if aborted:  # a second signal: do not wait for the store either
            own.abandon_store_waits()
            await own.shutdown(grace=0)
        elif handle_signals:
            # Serving is over, its signal handler gone: a signal while the sessions
            # shut down must not kill the process, only stop waiting for the store.
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_abandon_on_signal, signals, own)
                    await own.shutdown(grace=grace)
                    nursery.cancel_scope.cancel()
        else:
            await own.shutdown(grace=grace)


@attrs.frozen
class _Options:
    principals: Principals
    host: str
    port: int
    max_message_size: int
    grace: float
    handle_signals: bool


async def _serve(
    server: MCPServer[Any],
    supervisor: Supervisor,
    options: _Options,
    task_status: trio.TaskStatus[list[str]],
) -> bool:
    """Serve until drained (or cancelled); True if a second signal cut the drain short."""
    layer = SessionLayer(server, supervisor, ANONYMOUS)
    await layer.refresh_tools()
    security = _security(options.host)
    modern = StreamableHTTPSessionManager(
        app=_lowlevel(server), stateless=True, security_settings=security
    )
    server.middleware.append(layer)
    try:
        with trio.CancelScope() as abort:
            await _serve_app(server, layer, modern, security, options, abort, task_status)
        return abort.cancelled_caught
    finally:
        server.middleware.remove(layer)


async def _serve_app(
    server: MCPServer[Any],
    layer: SessionLayer,
    modern: StreamableHTTPSessionManager,
    security: TransportSecuritySettings | None,
    options: _Options,
    abort: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    import anycorn

    host, port = options.host, options.port
    async with modern.run():
        sessions = _HttpSessions(server, layer, security, modern_lifespan_state(modern))
        app = HttpApp(
            layer=layer,
            principals=options.principals,
            modern=modern,
            sessions=sessions,
            max_message_size=options.max_message_size,
        )
        config = anycorn.Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.graceful_timeout = options.grace
        stopping = trio.Event()
        async with sessions.running(), trio.open_nursery() as nursery:
            if options.handle_signals:
                await nursery.start(_stop_on_signal, stopping, abort)
            nursery.start_soon(_end_listen_streams, stopping, server, sessions)
            serving = partial(anycorn.serve, cast(Any, app), config, shutdown_trigger=stopping.wait)
            async with trio.open_nursery() as server_nursery:
                urls: list[str] = await server_nursery.start(serving)
                logger.info("serving MCP over Streamable HTTP at %s", ", ".join(
                    url + MCP_PATH for url in urls))  # fmt: skip
                task_status.started(urls)
            nursery.cancel_scope.cancel()


async def _end_listen_streams(
    stopping: trio.Event, server: MCPServer[Any], sessions: _HttpSessions
) -> None:
    """Once draining, end the streams that only listen: a handshake-era session's GET
    stream and 2026-07-28 ``subscriptions/listen`` streams (each gets its graceful
    final frame). They answer no call, and anycorn's graceful shutdown would wait for
    them to the end of the grace."""
    await stopping.wait()
    sessions.drain()
    entry = _lowlevel(server).get_request_handler("subscriptions/listen")
    if entry is not None and isinstance(entry.handler, ListenHandler):
        entry.handler.close()


def modern_lifespan_state(manager: StreamableHTTPSessionManager) -> Any:
    """The lifespan state the SDK's manager entered (its loops need the same one)."""
    return manager._lifespan_state


def run_http(server: MCPServer[Any], **kwargs: Any) -> None:
    """Serve ``server`` over Streamable HTTP (blocks; runs trio) until SIGINT/SIGTERM.

    Takes the keyword arguments of :func:`serve_http`.
    """
    kwargs.setdefault("handle_signals", True)
    trio.run(partial(serve_http, server, **kwargs))


async def _abandon_on_signal(signals: AsyncIterator[int], supervisor: Supervisor) -> None:
    async for signum in signals:
        logger.info("%s while stopping: not waiting for the store", signal.Signals(signum).name)
        supervisor.abandon_store_waits()


async def _stop_on_signal(
    stopping: trio.Event,
    abort: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGINT/SIGTERM drains; the next stops serving at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping.is_set():
                logger.info("%s while draining: stopping now", name)
                abort.cancel()
                return
            logger.info("%s: draining", name)
            stopping.set()
