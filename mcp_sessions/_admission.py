"""Admission: may a new session be created now, and at whose expense.

Theory of operation
===================

One synchronous function, :func:`decide`, looks at the registry and the
settings and returns a decision; the caller does the I/O after (closing an
evicted session takes awaits). That is httpcore's
``_assign_requests_to_connections`` shape: decide on a consistent view, then
act, then decide again.

- :class:`Admit`: there is room.
- :class:`Evict`: the scope is full and ``LimitPolicy.EVICT_IDLE`` names the
  longest-idle session in it; end that one with ``evicted`` and ask again.
- :class:`Reject`: raise ``error`` (:class:`LimitExceeded`, or
  :class:`ShuttingDown` when the runtime no longer admits).

The global limit is checked before the per-principal one, so an eviction
under a full runtime may take another principal's idle session.

With a store, the store counts (every process's sessions, atomically with the
insert; see :class:`~mcp_sessions._store.Limits`) and ``counted_here`` is
False: this process's registry may still hold copies of sessions ended
elsewhere, and must not refuse on their account.
"""

from __future__ import annotations

import attrs

from ._errors import LimitExceeded, SessionError, ShuttingDown
from ._registry import Registry
from ._session import Session
from ._settings import LimitPolicy, Settings

__all__ = ["Admit", "Decision", "Evict", "Reject", "decide"]


@attrs.frozen
class Admit:
    """There is room: create the session."""


@attrs.frozen
class Evict:
    """End ``victim`` (reason ``evicted``), then ask again."""

    victim: Session


@attrs.frozen
class Reject:
    """Refuse with ``error``."""

    error: SessionError


Decision = Admit | Evict | Reject
_ADMIT = Admit()


def decide(
    registry: Registry,
    settings: Settings,
    principal: str,
    *,
    admitting: bool,
    counted_here: bool = True,
) -> Decision:
    """Whether a session of ``principal`` may be created now."""
    if not admitting:
        return Reject(ShuttingDown())
    if not counted_here:
        return _ADMIT
    if len(registry) >= settings.max_sessions:
        scope, limit, victim_of = "global", settings.max_sessions, None
    elif registry.count_for(principal) >= settings.max_sessions_per_principal:
        scope, limit, victim_of = (
            f"principal {principal!r}",
            settings.max_sessions_per_principal,
            principal,
        )
    else:
        return _ADMIT
    evicting = settings.limit_policy is LimitPolicy.EVICT_IDLE
    if evicting:
        victim = registry.longest_idle(victim_of)
        if victim is not None:
            return Evict(victim)
    return Reject(LimitExceeded.at(scope, limit, evicting=evicting))
