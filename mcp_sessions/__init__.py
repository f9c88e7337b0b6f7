"""Session management for Model Context Protocol servers, on Trio structured concurrency."""

from __future__ import annotations

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
    VersionConflict,
)
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
from ._settings import LimitPolicy, Settings
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
from ._store_sqlite import SQLiteStore
from ._store_url import store_from_url
from ._transport import DEFAULT_MAX_MESSAGE_SIZE, StdioTransport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "SESSION_TOOLS",
    "ClientInfo",
    "CorrelationFilter",
    "Event",
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
    "VersionConflict",
    "__version__",
    "current_session",
    "default_principal",
    "hash_handle",
    "load_bearer_tokens",
    "open_supervisor",
    "render_prometheus",
    "run_http",
    "run_stdio",
    "serve_http",
    "serve_stdio",
    "session_context",
    "store_from_url",
]


def __getattr__(name: str) -> object:
    # PostgresStore imports psycopg: only pay for it when it is asked for.
    if name == "PostgresStore":
        from ._store_pg import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'mcp_sessions' has no attribute {name!r}")
