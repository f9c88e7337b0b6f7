"""The session runtime's public names, gathered from the modules that define them.

``_supervisor`` owns the tasks and wires the passive parts: ``_registry``,
``_deadlines``, ``_expiry``, ``_admission``, ``_lifecycle``, ``_requests``,
``_hooks`` and ``_sync`` (see the README's component map).
"""

from __future__ import annotations

from ._hooks import Hooks
from ._lifecycle import TransitionEvent
from ._registry import Tombstone
from ._requests import RequestScope
from ._session import ClientInfo, Session, SessionKind, SessionSnapshot, hash_handle
from ._supervisor import Supervisor, open_supervisor

__all__ = [
    "ClientInfo",
    "Hooks",
    "RequestScope",
    "Session",
    "SessionKind",
    "SessionSnapshot",
    "Supervisor",
    "Tombstone",
    "TransitionEvent",
    "hash_handle",
    "open_supervisor",
]
