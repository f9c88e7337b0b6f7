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
from ._settings import LimitPolicy, Settings
from ._state import Event, SessionState, TerminationReason

__version__ = "0.1.0"

__all__ = [
    "ClientInfo",
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
    "SessionError",
    "SessionExpired",
    "SessionGone",
    "SessionKind",
    "SessionNotFound",
    "SessionRequired",
    "SessionSetupFailed",
    "SessionSnapshot",
    "SessionState",
    "Settings",
    "SettingsError",
    "ShuttingDown",
    "Supervisor",
    "TerminationReason",
    "Tombstone",
    "TransitionEvent",
    "VersionConflict",
    "__version__",
    "hash_handle",
    "open_supervisor",
    "render_prometheus",
]
