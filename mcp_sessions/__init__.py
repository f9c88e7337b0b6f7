"""Session management for Model Context Protocol servers, on Trio structured concurrency."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import (
        InvalidArguments,
        InvalidTransition,
        LimitExceeded,
        MetadataTooLarge,
        SessionClosed,
        SessionError,
        SessionExpired,
        SessionGone,
        SessionNotFound,
        SessionRequired,
        SessionSetupFailed,
        SettingsError,
        ShuttingDown,
        StateTooLarge,
        TooLarge,
        UpstreamBusy,
        UpstreamError,
        UpstreamFailed,
        UpstreamTimeout,
        UpstreamUnavailable,
        VersionConflict,
    )
    from ._gateway import Gateway, GatewayServer, run_gateway, serve_gateway
    from ._gateway_config import GatewayConfig, GatewayConfigError
    from ._gateway_config import load_config as load_gateway_config
    from ._gateway_config import parse_config as parse_gateway_config
    from ._http import load_bearer_tokens, run_http, serve_http
    from ._metrics import HistogramSnapshot, RuntimeStatistics, render_prometheus
    from ._runtime import (
        ClientInfo,
        Hooks,
        RequestScope,
        Session,
        SessionKind,
        SessionSnapshot,
        Supervisor,
        Tombstone,
        TransitionEvent,
        hash_handle,
        open_supervisor,
    )
    from ._server import (
        SESSION_TOOLS,
        CorrelationFilter,
        SessionContext,
        SessionLayer,
        current_session,
        default_principal,
        run_stdio,
        serve_stdio,
        session_context,
    )
    from ._settings import DEFAULT_MAX_MESSAGE_SIZE, LimitPolicy, Settings
    from ._state import Event, SessionState, TerminationReason
    from ._store import (
        InstanceRecord,
        Limits,
        MemoryStore,
        SchemaTooNew,
        SessionRecord,
        SessionStore,
        StoreError,
        StoreHealth,
        StoreUnavailable,
        Touch,
    )
    from ._store_pg import PostgresStore
    from ._store_sqlite import SQLiteStore
    from ._store_url import store_from_url
    from ._transport import StdioTransport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "SESSION_TOOLS",
    "ClientInfo",
    "CorrelationFilter",
    "Event",
    "Gateway",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayServer",
    "HistogramSnapshot",
    "Hooks",
    "InstanceRecord",
    "InvalidArguments",
    "InvalidTransition",
    "LimitExceeded",
    "LimitPolicy",
    "Limits",
    "MemoryStore",
    "MetadataTooLarge",
    "PostgresStore",
    "RequestScope",
    "RuntimeStatistics",
    "SQLiteStore",
    "SchemaTooNew",
    "Session",
    "SessionClosed",
    "SessionContext",
    "SessionError",
    "SessionExpired",
    "SessionGone",
    "SessionKind",
    "SessionLayer",
    "SessionNotFound",
    "SessionRecord",
    "SessionRequired",
    "SessionSetupFailed",
    "SessionSnapshot",
    "SessionState",
    "SessionStore",
    "Settings",
    "SettingsError",
    "ShuttingDown",
    "StateTooLarge",
    "StdioTransport",
    "StoreError",
    "StoreHealth",
    "StoreUnavailable",
    "Supervisor",
    "TerminationReason",
    "Tombstone",
    "TooLarge",
    "Touch",
    "TransitionEvent",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamFailed",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "VersionConflict",
    "__version__",
    "current_session",
    "default_principal",
    "hash_handle",
    "load_bearer_tokens",
    "load_gateway_config",
    "open_supervisor",
    "parse_gateway_config",
    "render_prometheus",
    "run_gateway",
    "run_http",
    "run_stdio",
    "serve_gateway",
    "serve_http",
    "serve_stdio",
    "session_context",
    "store_from_url",
]


#: Where each public name lives. Imported on first use, so that the command
#: line's admin commands (``status``, ``check``, ...) never load the MCP SDK.
_LAZY: dict[str, str] = {
    "Gateway": "_gateway",
    "GatewayServer": "_gateway",
    "run_gateway": "_gateway",
    "serve_gateway": "_gateway",
    "GatewayConfig": "_gateway_config",
    "GatewayConfigError": "_gateway_config",
    "UpstreamBusy": "_errors",
    "UpstreamError": "_errors",
    "UpstreamFailed": "_errors",
    "UpstreamTimeout": "_errors",
    "UpstreamUnavailable": "_errors",
    "PostgresStore": "_store_pg",
    "ClientInfo": "_runtime",
    "CorrelationFilter": "_server",
    "DEFAULT_MAX_MESSAGE_SIZE": "_settings",
    "Event": "_state",
    "HistogramSnapshot": "_metrics",
    "Hooks": "_runtime",
    "InstanceRecord": "_store",
    "InvalidArguments": "_errors",
    "InvalidTransition": "_errors",
    "LimitExceeded": "_errors",
    "LimitPolicy": "_settings",
    "Limits": "_store",
    "MemoryStore": "_store",
    "MetadataTooLarge": "_errors",
    "RequestScope": "_runtime",
    "RuntimeStatistics": "_metrics",
    "SESSION_TOOLS": "_server",
    "SQLiteStore": "_store_sqlite",
    "SchemaTooNew": "_store",
    "Session": "_runtime",
    "SessionClosed": "_errors",
    "SessionContext": "_server",
    "SessionError": "_errors",
    "SessionExpired": "_errors",
    "SessionGone": "_errors",
    "SessionKind": "_runtime",
    "SessionLayer": "_server",
    "SessionNotFound": "_errors",
    "SessionRecord": "_store",
    "SessionRequired": "_errors",
    "SessionSetupFailed": "_errors",
    "SessionSnapshot": "_runtime",
    "SessionState": "_state",
    "SessionStore": "_store",
    "Settings": "_settings",
    "SettingsError": "_errors",
    "ShuttingDown": "_errors",
    "StateTooLarge": "_errors",
    "StdioTransport": "_transport",
    "StoreError": "_store",
    "StoreHealth": "_store",
    "StoreUnavailable": "_store",
    "Supervisor": "_runtime",
    "TerminationReason": "_state",
    "Tombstone": "_runtime",
    "TooLarge": "_errors",
    "Touch": "_store",
    "TransitionEvent": "_runtime",
    "VersionConflict": "_errors",
    "current_session": "_server",
    "default_principal": "_server",
    "hash_handle": "_runtime",
    "load_bearer_tokens": "_http",
    "open_supervisor": "_runtime",
    "render_prometheus": "_metrics",
    "run_http": "_http",
    "run_stdio": "_server",
    "serve_http": "_http",
    "serve_stdio": "_server",
    "session_context": "_server",
    "store_from_url": "_store_url",
}


#: Public names that are another module's name for something.
_ALIASES: dict[str, tuple[str, str]] = {
    "load_gateway_config": ("_gateway_config", "load_config"),
    "parse_gateway_config": ("_gateway_config", "parse_config"),
}


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        module_name, attribute = _ALIASES[name]
        value = getattr(importlib.import_module(f".{module_name}", __name__), attribute)
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))
