"""The built-in resources: ``sessions://health`` (JSON) and ``sessions://metrics`` (Prometheus).

Theory of operation
===================

Both are read-only views of the supervisor serving the request (found with
:func:`served`, set by the session layer): health asks the store with a
timeout and summarises :meth:`Supervisor.statistics`; metrics is
:meth:`Supervisor.render_prometheus`. They own nothing and change nothing.
:func:`install_session_resources` registers them through the public
``MCPServer.add_resource``, skipping a URI the server already lists.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resources import FunctionResource

from ._context import iso, served
from ._runtime import Supervisor
from ._state import SessionState

__all__ = ["HEALTH_URI", "METRICS_URI", "health", "install_session_resources"]

HEALTH_URI = "sessions://health"
METRICS_URI = "sessions://metrics"
#: How long health waits for the store before calling it unhealthy.
STORE_HEALTH_TIMEOUT = 5.0


async def health(supervisor: Supervisor) -> dict[str, Any]:
    """The health document: status, live sessions by state, store, cleanup, uptime."""
    store = supervisor.store
    store_info: dict[str, Any] = {"backend": "none", "healthy": True}
    if store is not None:
        with trio.move_on_after(STORE_HEALTH_TIMEOUT):
            h = await supervisor.store_health()
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
    stats = supervisor.statistics()
    status = "ok" if store_info["healthy"] else "degraded"
    return {
        "status": status if supervisor.admitting else "stopping",
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
            "last_run": iso(supervisor.last_cleanup),
            "runs": stats.cleanup_runs,
            "expired": stats.expired,
        },
        "uptime_s": round(stats.uptime, 3),
    }


async def _health_resource() -> str:
    return json.dumps(await health(served().supervisor), sort_keys=True)


async def _metrics_resource() -> str:
    return served().supervisor.render_prometheus()


async def install_session_resources(server: MCPServer[Any]) -> None:
    """Register ``sessions://health`` and ``sessions://metrics`` on ``server`` (idempotent)."""
    present = {str(resource.uri) for resource in await server.list_resources()}
    resources = [
        FunctionResource.from_function(
            _health_resource,
            uri=HEALTH_URI,
            name="sessions-health",
            description="Health of the session runtime (JSON)",
            mime_type="application/json",
        ),
        FunctionResource.from_function(
            _metrics_resource,
            uri=METRICS_URI,
            name="sessions-metrics",
            description="Session runtime metrics (Prometheus text)",
            mime_type="text/plain; version=0.0.4",
        ),
    ]
    for resource in resources:
        if str(resource.uri) not in present:
            server.add_resource(resource)
