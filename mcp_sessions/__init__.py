"""Session management for Model Context Protocol servers, on Trio structured concurrency."""

from __future__ import annotations

from ._errors import (
    InvalidTransition,
    LimitExceeded,
    SessionClosed,
    SessionError,
    SessionExpired,
    SessionGone,
    SessionNotFound,
    SessionRequired,
    SessionSetupFailed,
    SettingsError,
    ShuttingDown,
    VersionConflict,
)
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
    "InvalidTransition",
    "LimitExceeded",
    "LimitPolicy",
    "RequestScope",
    "RuntimeStatistics",
    "Session",
    "SessionClosed",
    "SessionContext",
    "SessionError",
    "SessionExpired",
    "SessionGone",
    "SessionKind",
    "SessionLayer",
    "SessionNotFound",
    "SessionRequired",
    "SessionSetupFailed",
    "SessionSnapshot",
    "SessionState",
    "Settings",
    "SettingsError",
    "ShuttingDown",
    "StdioTransport",
    "Supervisor",
    "TerminationReason",
    "Tombstone",
    "TransitionEvent",
    "VersionConflict",
    "__version__",
    "current_session",
    "default_principal",
    "hash_handle",
    "open_supervisor",
    "render_prometheus",
    "run_stdio",
    "serve_stdio",
    "session_context",
]
