"""Serving an ``MCPServer`` over stdio with the session layer.

Theory of operation
===================

::

    run_stdio(server) -> trio.run(serve_stdio)
      serve_stdio:  install the built-in tools and resources  ->  open_supervisor (unless given)
                    ->  add a SessionLayer to server.middleware
                    ->  serve_connection: layer.connection() around Server.run over the transport
                    ->  remove the layer; shut the supervisor down gracefully

Who owns what: :func:`serve_stdio` owns the file descriptors it claims, the
signal forwarder, the supervisor it opens (not one it is given) and the layer
it adds; the :class:`StdioTransport` owns the reader and writer tasks; the
SDK's ``Server.run`` owns the server lifespan and the dispatch loop (both
eras); the layer owns the connection and its session.

The SDK has no public way from an ``MCPServer`` to the low-level ``Server``
that ``Server.run`` needs; :func:`_lowlevel` is the one place that reaches for
it. Library code never writes to stdout: on stdio it is the protocol wire, and
logs go to stderr.
"""

from __future__ import annotations

import gc
import getpass
import logging
import os
from collections.abc import Callable
from typing import Any

import attrs
import trio
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.mcpserver import MCPServer
from mcp.server.models import InitializationOptions

from ._layer import SessionLayer
from ._resources import install_session_resources
from ._runtime import Hooks, Supervisor, open_supervisor
from ._settings import Settings
from ._stopping import MIN_STORE_WAIT_S
from ._store import SessionStore
from ._tools import install_session_tools
from ._transport import DEFAULT_MAX_MESSAGE_SIZE, StdioTransport, claim_stdio, forward_signals

__all__ = ["default_principal", "run_stdio", "serve_connection", "serve_stdio"]

logger = logging.getLogger("mcp_sessions.server")


def default_principal() -> str:
    """The principal of a stdio connection by default: the OS user."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return f"uid:{os.getuid()}"


def initialization_options(server: MCPServer[Any]) -> InitializationOptions:
    """What the handshake advertises. A server with a ``notification_options``
    attribute (the gateway: its lists change when an upstream's do) says there
    which ``list_changed`` notifications it sends to handshake-era clients."""
    options = getattr(server, "notification_options", None)
    return _lowlevel(server).create_initialization_options(
        options if isinstance(options, NotificationOptions) else None
    )


def _lowlevel(server: MCPServer[Any]) -> Server[Any]:
    """The low-level ``Server`` behind ``server``: the one private SDK attribute we read.

    ``Server.run(read, write, options)`` is the public way to serve one
    connection over streams of our own (it enters the lifespan and runs
    ``serve_dual_era_loop``), but ``MCPServer`` only exposes its stdio, SSE
    and HTTP runners, which bring their own transports. The SDK reads this
    attribute itself for the same reason (``mcp/client/_memory.py``: "TODO:
    Make `lowlevel_server` public").
    """
    return server._lowlevel_server


async def serve_connection(
    server: MCPServer[Any],
    layer: SessionLayer,
    transport: StdioTransport,
    *,
    on_served: Callable[[], None] | None = None,
) -> None:
    """Serve one connection (one stream pair) with ``layer``; end its session at EOF.

    ``on_served`` is called when the transport is done, before the connection
    session ends.
    """
    lowlevel = _lowlevel(server)

    async def loop(read_stream: Any, write_stream: Any) -> None:
        await lowlevel.run(read_stream, write_stream, initialization_options(server))

    async with layer.connection():
        try:
            await transport.serve(loop)
        finally:
            if on_served is not None:
                on_served()


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
        await install_session_tools(server)
    if session_resources:
        await install_session_resources(server)
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
                    # The process stops with this connection: from then on the store
                    # gets one grace period in all, and nothing after a hard stop.
                    transport.on_hard_stop = own.abandon_store_waits
                    if transport.broken:  # (already, while the store opened)
                        own.abandon_store_waits()

                    def served() -> None:
                        own.limit_store_waits(max(grace, MIN_STORE_WAIT_S))

                    await _serve_with(server, own, principal, transport, on_served=served)
                    await own.shutdown(grace=0 if transport.broken else grace)
            nursery.cancel_scope.cancel()
    finally:
        if restore is not None:
            await stdin.aclose()
            await stdout.aclose()
            restore()
    logger.info("stdio server stopped (%s)", transport.stop_reason)


async def _serve_with(
    server: MCPServer[Any],
    supervisor: Supervisor,
    principal: str | None,
    transport: StdioTransport,
    *,
    on_served: Callable[[], None] | None = None,
) -> None:
    layer = SessionLayer(server, supervisor, principal or default_principal())
    await layer.refresh_tools()  # after the built-in tools are installed
    middleware = server.middleware
    middleware.append(layer)
    try:
        await serve_connection(server, layer, transport, on_served=on_served)
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
    # Start-up is over (imports, the server and its tools): keep what exists now
    # out of the cyclic collector's full passes, which otherwise rescan it for
    # every few thousand sessions created (CPython's advice for long-lived servers).
    gc.collect()
    gc.freeze()
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
