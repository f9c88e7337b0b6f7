"""The gateway: one MCP server in front of many, upstream sessions pooled in our runtime.

Theory of operation
===================

::

    serve_gateway(config)
       |- the downstream supervisor   the clients' sessions (as for any server)
       |- Gateway.running()
       |     |- the upstream supervisor  one session per upstream client session
       |     |     '- per session: the connection (child process or HTTP), its task
       |     '- per pool: upkeep         ``min`` kept warm, idle ones ended
       '- serve_stdio / serve_http(GatewayServer)

:class:`GatewayServer` is an ``MCPServer`` whose public ``list_*``, ``call_tool``,
``read_resource`` and ``get_prompt`` add the upstreams' tools, resources and
prompts as ``<upstream>__<name>`` and forward to :class:`~._pool.Pool` (one per
upstream). Its own tools (the built-in session tools, anything you add) stay.
Upstream tool errors, and upstream JSON-RPC errors, come back unchanged; the
gateway's own failures are tool errors with codes ``upstream_busy``,
``upstream_timeout``, ``upstream_error`` and ``upstream_unavailable``.

Upstream sessions are sessions of a second :class:`Supervisor` (in memory:
an upstream session is a live connection, nothing a restart could resume), so
they have the same states, reasons, tasks and accounting as the clients'
sessions; the gateway reports them in ``gateway://status`` and as
``mcp_gateway_*`` metrics in the downstream supervisor's Prometheus
exposition.

Session isolation: an isolated upstream's tools take an optional ``session``
argument, which the session layer resolves like any other (a handle, or the
handshake-era connection session). The upstream session is bound to that
downstream session by a background task *of the downstream session*, so when
that session ends, for whatever reason, its upstream session ends with it.

Exit: the downstream server stops first (requests drain), then every upstream
session ends with ``shutdown``, which stops each child's whole process group.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import json
import logging
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal, TypeVar

import trio
from mcp.client.client import Client
from mcp.server.context import CallNext, ServerRequestContext
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resources import FunctionResource
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    BlobResourceContents,
    CallToolResult,
    GetPromptResult,
    Tool,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from ._context import current_session, tool_error
from ._errors import SessionError, UpstreamError
from ._gateway_config import GatewayConfig
from ._hooks import Hooks
from ._pool import Pool
from ._settings import Settings
from ._state import SessionState, TerminationReason
from ._store import SessionStore
from ._supervisor import Supervisor, open_supervisor

__all__ = ["Gateway", "GatewayServer", "run_gateway", "serve_gateway"]

logger = logging.getLogger("mcp_sessions.gateway")

T = TypeVar("T")
SEPARATOR = "__"
STATUS_URI = "gateway://status"
#: Handshake-era client connections remembered for list-change notifications.
_MAX_CLIENTS = 1024
_BREAKER_VALUE = {"closed": 0, "half_open": 1, "open": 2}
_SESSION_PROPERTY = {
    "type": "string",
    "description": "Session handle (from session_open): this upstream keeps its state per "
    "session. Optional on a connection that has its own session.",
}


class GatewayMetrics:
    """The gateway's counters, in a registry of their own (added to the runtime's exposition)."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter("mcp_gateway_calls", "Calls forwarded to an upstream",
                             ["upstream"], registry=registry)  # fmt: skip
        self.errors = Counter("mcp_gateway_upstream_errors", "Forwarded calls that failed, by code",
                              ["upstream", "code"], registry=registry)  # fmt: skip
        self.waiting = Gauge("mcp_gateway_waiting", "Calls waiting for an upstream session",
                             ["upstream"], registry=registry)  # fmt: skip
        self.wait_seconds = Histogram(
            "mcp_gateway_wait_seconds",
            "Time calls waited in an upstream's queue",
            ["upstream"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
            registry=registry,
        )
        registry.register(_StateCollector(gateway))
        for pool in gateway.pools.values():
            pool.bind_metrics(self)


class _StateCollector:
    """Upstream sessions by state and breaker states, read when scraped."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterable[Metric]:
        sessions = GaugeMetricFamily(
            "mcp_gateway_upstream_sessions", "Upstream sessions by state",
            labels=["upstream", "state"],
        )  # fmt: skip
        breaker = GaugeMetricFamily(
            "mcp_gateway_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            labels=["upstream"],
        )
        now = trio.current_time()
        for name, pool in self._gateway.pools.items():
            counts = dict.fromkeys(SessionState, 0)
            for member in pool.members:
                counts[member.session.state] += 1
            for state, count in counts.items():
                sessions.add_metric([name, state.value], count)
            breaker.add_metric([name], _BREAKER_VALUE[pool.breaker.state(now).value])
        return [sessions, breaker]


class Gateway:
    """The pools of every upstream, and the supervisor of their sessions."""

    def __init__(self, config: GatewayConfig, *, hooks: Hooks | None = None) -> None:
        """``hooks``: the runtime's hooks (setup, teardown, observers) for upstream sessions."""
        self.config = config
        self.hooks = hooks
        self.pools: dict[str, Pool] = {u.name: Pool(self, u) for u in config.upstreams}
        self.metrics = GatewayMetrics(self)
        self._supervisor: Supervisor | None = None
        self._nursery: trio.Nursery | None = None
        self._bound: set[tuple[str, str]] = set()
        self._reserved = 0
        #: Called with "tools", "resources" or "prompts" when an upstream's list changes.
        self.on_change: list[Callable[[str], None]] = []
        self.stopping = False

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor of the upstream sessions (while :meth:`running`)."""
        if self._supervisor is None:
            raise RuntimeError("the gateway is not running")
        return self._supervisor

    @asynccontextmanager
    async def running(self, *, shutdown_grace: float = 5.0) -> AsyncIterator[Gateway]:
        """Run the pools for the block; at its end every upstream session ends (``shutdown``)."""
        settings = Settings(
            idle_timeout=364 * 24 * 3600.0,
            max_lifetime=364 * 24 * 3600.0,
            max_sessions=1_000_000,
            max_sessions_per_principal=1_000_000,
            cleanup_interval=0.5,
            setup_timeout=60.0,
            teardown_timeout=60.0,
            shutdown_grace=shutdown_grace,
        )
        async with (
            open_supervisor(settings, hooks=self.hooks) as supervisor,
            trio.open_nursery() as nursery,
        ):
            self._supervisor, self._nursery = supervisor, nursery
            for pool in self.pools.values():
                nursery.start_soon(pool.upkeep, name=f"gateway upkeep {pool.name}")
            try:
                yield self
            finally:
                self.stopping = True
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown()

    def announce(self, kind: str) -> None:
        """An upstream's ``kind`` list changed: tell whoever listens (the server)."""
        for listener in self.on_change:
            listener(kind)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the gateway's nursery (member starts requested by calls)."""
        if self._nursery is not None and not self.stopping:
            self._nursery.start_soon(fn, *args)

    def reserve(self, pool: Pool, *, evict: bool) -> bool:
        """Reserve room for one more of ``pool``'s members under the cap on child processes
        (HTTP upstreams are not processes); release it with :meth:`release` once the member
        is counted. At the cap, with ``evict``, the longest-idle shared member of any pool is
        ended (``evicted``) to make room."""
        if self.stopping:
            return False
        if not pool.config.is_stdio:
            return True
        live = self._reserved + sum(
            1 for p in self.pools.values() if p.config.is_stdio for m in p.members if m.session.live
        )
        if live >= self.config.max_processes:
            idle = [m for p in self.pools.values() if p.config.is_stdio
                    if (m := p.evictable()) is not None]  # fmt: skip
            if not evict or not idle:
                return False
            victim = min(idle, key=lambda m: m.last_used)
            self.supervisor.terminate(victim.session, TerminationReason.EVICTED)
        self._reserved += 1
        return True

    def release(self, pool: Pool) -> None:
        """Give back what :meth:`reserve` took."""
        if pool.config.is_stdio:
            self._reserved -= 1

    def bind(self, pool: Pool) -> str:
        """The calling tool's downstream session id; its end ends the upstream session.

        Raises :class:`SessionRequired` outside a session.
        """
        ctx = current_session()
        key = (ctx.id, pool.name)
        if key not in self._bound:
            self._bound.add(key)
            ctx.start_soon(self._hold_binding, pool, ctx.id, name=f"gateway binding {pool.name}")
        return ctx.id

    async def _hold_binding(self, pool: Pool, owner: str) -> None:
        """A downstream session's background task: when that session ends, so does its
        upstream session."""
        try:
            await trio.sleep_forever()
        finally:
            self._bound.discard((owner, pool.name))
            if self._supervisor is not None and not self.stopping:
                pool.end_owner(owner)

    def status(self) -> dict[str, Any]:
        """What ``gateway://status`` shows: per upstream, its sessions, queue and breaker."""
        return {name: pool.status() for name, pool in self.pools.items()}

    def pool_for(self, name: str) -> tuple[Pool, str] | None:
        """The pool and upstream name of a prefixed name (``notes__add``), if one matches."""
        prefix, sep, rest = name.partition(SEPARATOR)
        pool = self.pools.get(prefix)
        if not sep or pool is None or not rest:
            return None
        return pool, rest


class _HandshakeClients:
    """A middleware that keeps, per handshake-era client connection, the session its last
    request came in on (the SDK's ``ServerSession``; its notifications go out on the
    connection, not the request), to tell it of list changes.

    A connection is known by its ``client_params`` (one object per connection, from
    its ``initialize``); the most recent :data:`_MAX_CLIENTS` are kept. Telling a
    client that has gone is a no-op (the SDK drops it), and each client gets at most
    a second, so that one that does not read cannot hold up the others.
    """

    def __init__(self) -> None:
        self._sessions: collections.OrderedDict[int, Any] = collections.OrderedDict()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> Any:
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            params = ctx.session.client_params
            if params is not None:
                key = id(params)  # stable: the session we keep holds the connection
                self._sessions[key] = ctx.session
                self._sessions.move_to_end(key)
                while len(self._sessions) > _MAX_CLIENTS:
                    self._sessions.popitem(last=False)
        return await call_next(ctx)

    async def tell(self, kind: str) -> None:
        async with trio.open_nursery() as nursery:
            for session in list(self._sessions.values()):
                nursery.start_soon(self._tell_one, session, kind)

    @staticmethod
    async def _tell_one(session: Any, kind: str) -> None:
        send = getattr(session, f"send_{kind[:-1]}_list_changed", None)
        if send is None:
            return
        with trio.move_on_after(1.0), contextlib.suppress(Exception):
            await send()


class GatewayServer(MCPServer[Any]):
    """An ``MCPServer`` that also serves the upstreams of a :class:`Gateway`."""

    def __init__(self, gateway: Gateway, name: str = "mcp-sessions-gateway", **kwargs: Any):
        names = ", ".join(gateway.pools) or "none"
        kwargs.setdefault(
            "instructions",
            f"A gateway to MCP servers ({names}): their tools are named <server>__<tool>. "
            "Session tools: open a session with session_open and pass its handle as "
            "'session'.",
        )
        # Our own bus (the SDK's public seam): upstream changes go out on it to the
        # 2026-07-28 clients' subscriptions/listen streams.
        self._bus = InMemorySubscriptionBus()
        kwargs.setdefault("subscriptions", self._bus)
        super().__init__(name, **kwargs)
        self.gateway = gateway
        self._routes: dict[str, Pool] = {}
        #: Upstreams' resource templates, in listing order: the first that matches serves.
        self._template_routes: list[tuple[re.Pattern[str], Pool]] = []
        #: Handshake-era clients, told of changes by notification.
        self._clients = _HandshakeClients()
        self.middleware.append(self._clients)
        gateway.on_change.append(self._changed)
        self.add_resource(
            FunctionResource.from_function(
                self._status,
                uri=STATUS_URI,
                name="gateway-status",
                description="Upstream sessions by state, queues and circuit breakers (JSON)",
                mime_type="application/json",
            )
        )

    #: Handshake-era clients hear of list changes (which the upstreams' cause).
    notification_options = NotificationOptions(
        prompts_changed=True, resources_changed=True, tools_changed=True
    )

    async def _status(self) -> str:
        return json.dumps(self.gateway.status(), sort_keys=True)

    def _changed(self, kind: str) -> None:
        self.gateway.start_soon(self._tell, kind)

    async def _tell(self, kind: str) -> None:
        event: ServerEvent = (
            ToolsListChanged()
            if kind == "tools"
            else ResourcesListChanged()
            if kind == "resources"
            else PromptsListChanged()
        )
        await self._bus.publish(event)
        await self._clients.tell(kind)

    # -- the session layer asks which tools take its ``session`` --------------------------

    def session_parameter(self, tool: Tool) -> Literal["required", "optional"] | None:
        found = self.gateway.pool_for(tool.name)
        if found is not None:
            return "optional" if found[0].config.pool.isolation == "session" else None
        properties = tool.input_schema.get("properties")
        if not isinstance(properties, dict) or "session" not in properties:
            return None
        required = tool.input_schema.get("required")
        return "required" if isinstance(required, list) and "session" in required else "optional"

    # -- tools ---------------------------------------------------------------------------

    async def list_tools(self) -> list[Tool]:
        tools = await super().list_tools()
        for pool in self.gateway.pools.values():
            for tool in await self._listing(pool, "tools"):
                tools.append(_forwarded_tool(pool, tool))
        return tools

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        found = self.gateway.pool_for(name)
        if found is None:
            return await super().call_tool(name, arguments, context)
        pool, upstream_name = found
        arguments = dict(arguments)
        owner = None
        if pool.config.pool.isolation == "session":
            arguments.pop("session", None)
            try:
                owner = self.gateway.bind(pool)
            except SessionError as exc:
                return tool_error(exc)
        try:
            result: CallToolResult = await pool.call(
                partial(_call_tool, upstream_name, arguments, _progress_relay(context)),
                owner=owner,
            )
        except UpstreamError as exc:
            return tool_error(exc)
        return result

    # -- resources -----------------------------------------------------------------------

    async def list_resources(self) -> list[Any]:
        resources: list[Any] = await super().list_resources()
        routes: dict[str, Pool] = {}
        for pool in self.gateway.pools.values():
            for resource in await self._listing(pool, "resources"):
                uri = str(resource.uri)
                if uri in routes:
                    logger.warning("resource %s of %s is also %s's: served by %s",
                                   uri, pool.name, routes[uri].name, routes[uri].name)  # fmt: skip
                    continue
                routes[uri] = pool
                resources.append(
                    resource.model_copy(update={"name": pool.name + SEPARATOR + resource.name})
                )
        self._routes = routes
        return resources

    async def list_resource_templates(self) -> list[Any]:
        templates: list[Any] = await super().list_resource_templates()
        routes: list[tuple[re.Pattern[str], Pool]] = []
        for pool in self.gateway.pools.values():
            for template in await self._listing(pool, "resource_templates"):
                routes.append((_template_pattern(template.uri_template), pool))
                templates.append(
                    template.model_copy(update={"name": pool.name + SEPARATOR + template.name})
                )
        self._template_routes = routes
        return templates

    async def read_resource(self, uri: Any, context: Context[Any, Any] | None = None) -> Any:
        key = str(uri)
        # The gateway's own resources first: no upstream (or template of one) can shadow them.
        own = key.startswith(("sessions://", "gateway://"))
        pool = None if own else self._route(key)
        if pool is None and not own:
            await self.list_resources()
            await self.list_resource_templates()
            pool = self._route(key)
        if pool is None:
            return await super().read_resource(uri, context)
        try:
            result = await pool.call(lambda client: client.read_resource(key))
        except UpstreamError as exc:
            raise _rpc_error(exc) from None
        return [_contents(item) for item in result.contents]

    def _route(self, uri: str) -> Pool | None:
        """The upstream serving ``uri``: one that listed it, else one whose template matches."""
        pool = self._routes.get(uri)
        if pool is not None:
            return pool
        return next((p for pattern, p in self._template_routes if pattern.fullmatch(uri)), None)

    # -- prompts -------------------------------------------------------------------------

    async def list_prompts(self) -> list[Any]:
        prompts: list[Any] = await super().list_prompts()
        for pool in self.gateway.pools.values():
            prompts.extend(
                prompt.model_copy(update={"name": pool.name + SEPARATOR + prompt.name})
                for prompt in await self._listing(pool, "prompts")
            )
        return prompts

    async def get_prompt(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        context: Context[Any, Any] | None = None,
    ) -> Any:
        found = self.gateway.pool_for(name)
        if found is None:
            return await super().get_prompt(name, arguments, context)
        pool, upstream_name = found
        try:
            result: GetPromptResult = await pool.call(
                lambda client: client.get_prompt(upstream_name, arguments)
            )
        except UpstreamError as exc:
            raise _rpc_error(exc) from None
        return result

    # -- listings ------------------------------------------------------------------------

    async def _listing(self, pool: Pool, kind: str) -> list[Any]:
        """An upstream's tools, resources or prompts (cached until it says they changed).

        Whatever is not cached is listed in the same pooled call (one member
        taken, not three: under a tight process cap, listings must not evict
        each other). An upstream that cannot answer is left out (and logged),
        not an error for the whole listing.
        """
        cached = pool.listings.get(kind)
        if cached is not None:
            return list(cached)
        missing = [k for k in _KINDS if k not in pool.listings]
        generations = {k: pool.generations.get(k, 0) for k in missing}
        listed: dict[str, list[Any] | Exception]
        try:
            listed = dict(await pool.call(partial(_list_kinds, missing)))
        except (UpstreamError, MCPError) as exc:
            listed = {kind: exc}
        for k, items in listed.items():
            if isinstance(items, Exception):
                logger.warning("upstream %s: cannot list its %s: %s", pool.name, k, items)
            elif pool.generations.get(k, 0) == generations[k]:  # no change announced meanwhile
                pool.listings[k] = items
        found = listed[kind]
        return [] if isinstance(found, Exception) else list(found)


def _forwarded_tool(pool: Pool, tool: Tool) -> Tool:
    schema = copy.deepcopy(dict(tool.input_schema))
    if pool.config.pool.isolation == "session":
        properties = dict(schema.get("properties") or {})
        properties["session"] = dict(_SESSION_PROPERTY)
        schema["properties"] = properties
        if isinstance(schema.get("required"), list):
            schema["required"] = [r for r in schema["required"] if r != "session"]
    return tool.model_copy(update={"name": pool.name + SEPARATOR + tool.name,
                                   "input_schema": schema})  # fmt: skip


def _progress_relay(context: Context[Any, Any] | None) -> ProgressFnT | None:
    """Relay the upstream's progress to the caller, if the caller asked for progress."""
    if context is None:
        return None
    meta = context.request_context.meta
    if meta is None or meta.get("progress_token") is None:
        return None

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        await context.report_progress(progress, total, message)

    return relay


async def _call_tool(
    name: str, arguments: dict[str, Any], progress: ProgressFnT | None, client: Client
) -> CallToolResult:
    return await client.call_tool(name, arguments, progress_callback=progress)


#: What an upstream lists, and the capability that says it serves it.
_KINDS = {
    "tools": "tools",
    "resources": "resources",
    "resource_templates": "resources",
    "prompts": "prompts",
}


def _template_pattern(template: str) -> re.Pattern[str]:
    """A URI template (RFC 6570) as a pattern of the URIs it expands to: ``{name}`` is one
    segment, ``{+name}``/``{#name}`` any text, other operators any text without ``/``."""
    parts: list[str] = []
    for literal, expression in re.findall(r"([^{]*)(\{[^}]*\}|$)", template):
        parts.append(re.escape(literal))
        if expression:
            parts.append(".*" if expression[1:2] in ("+", "#") else "[^/]*")
    return re.compile("".join(parts))


async def _list_kinds(kinds: list[str], client: Client) -> dict[str, list[Any] | MCPError]:
    """Each of ``kinds``, all pages (empty for what the upstream does not serve), or the
    error its listing answered (each kind on its own: one failing leaves the others)."""
    capabilities = client.server_capabilities
    listed: dict[str, list[Any] | MCPError] = {}
    for kind in kinds:
        try:
            served = getattr(capabilities, _KINDS[kind])
            listed[kind] = await _list_all(kind, client) if served else []
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                raise  # the upstream went away: the pool's failure, not the listing's
            listed[kind] = [] if exc.code == METHOD_NOT_FOUND else exc
    return listed


async def _list_all(kind: str, client: Client) -> list[Any]:
    items: list[Any] = []
    cursor: str | None = None
    while True:
        if kind == "tools":
            page: Any = await client.list_tools(cursor=cursor)
            items += page.tools
        elif kind == "resources":
            page = await client.list_resources(cursor=cursor)
            items += page.resources
        elif kind == "resource_templates":
            page = await client.list_resource_templates(cursor=cursor)
            items += page.resource_templates
        else:
            page = await client.list_prompts(cursor=cursor)
            items += page.prompts
        cursor = page.next_cursor
        if not cursor:
            return items


def _rpc_error(exc: UpstreamError) -> MCPError:
    """Outside tools (resources, prompts) the gateway's failures are JSON-RPC errors."""
    return MCPError(code=INTERNAL_ERROR, message=f"{exc.code}: {exc.message}",
                    data={"code": exc.code, **exc.details()})  # fmt: skip


def _contents(item: Any) -> ReadResourceContents:
    if isinstance(item, BlobResourceContents):
        return ReadResourceContents(
            content=base64.b64decode(item.blob), mime_type=item.mime_type, meta=item.meta
        )
    return ReadResourceContents(content=item.text, mime_type=item.mime_type, meta=item.meta)


# -- serving -----------------------------------------------------------------------------


async def serve_gateway(
    config: GatewayConfig,
    *,
    transport: Literal["stdio", "http"] = "stdio",
    server: GatewayServer | None = None,
    settings: Settings | None = None,
    hooks: Hooks | None = None,
    store: SessionStore | str | None = None,
    handle_signals: bool | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **serve_kwargs: Any,
) -> None:
    """Serve the gateway for ``config`` over stdio (default) or Streamable HTTP.

    Takes the keyword arguments of :func:`serve_stdio` / :func:`serve_http`
    (``server``: a :class:`GatewayServer` of your own, with more tools).
    Returns when serving ends (stdin EOF, a signal); every upstream process
    group has been stopped by then. Over HTTP, ``task_status.started`` gets
    the bound URLs (as :func:`serve_http`'s).
    """
    if isinstance(store, str):
        from ._store_url import store_from_url

        store = store_from_url(store)
    settings = settings or Settings()
    gateway = server.gateway if server is not None else Gateway(config)
    server = server if server is not None else GatewayServer(gateway)
    if handle_signals is None:
        handle_signals = transport == "http" or serve_kwargs.get("stdin") is None
    with contextlib.ExitStack() as held:
        if handle_signals:
            # Held from here to the end: serving installs its own handlers while it
            # runs; a signal while the upstreams stop afterwards must not kill us.
            held.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
        async with open_supervisor(settings, hooks=hooks, store=store) as downstream:
            downstream.add_collector(gateway.metrics.registry)
            async with gateway.running(shutdown_grace=min(5.0, settings.shutdown_grace)):
                serve_kwargs["handle_signals"] = handle_signals
                if transport == "http":
                    from ._http import serve_http

                    await serve_http(server, supervisor=downstream, settings=settings,
                                     task_status=task_status, **serve_kwargs)  # fmt: skip
                else:
                    from ._stdio import serve_stdio

                    task_status.started([])
                    await serve_stdio(server, supervisor=downstream, settings=settings,
                                      **serve_kwargs)  # fmt: skip


def run_gateway(config: GatewayConfig, **kwargs: Any) -> None:
    """Run the gateway (blocks; runs trio); takes :func:`serve_gateway`'s keyword arguments."""
    from ._stdio import _ensure_standard_fds

    _ensure_standard_fds()
    try:
        trio.run(partial(serve_gateway, config, **kwargs))
    except KeyboardInterrupt:  # a SIGINT before our handler was installed
        logger.info("interrupted")
