"""The one expiry rule: is a session due, and why.

Theory of operation
===================

A session ends on its own for one of two reasons: its absolute lifetime ran
out (``expires_at``), or it stayed idle for its ``idle_timeout`` (counted from
when it last went idle, ``idle_since``). The lifetime wins when both apply.
A session that is not idle (a request in flight, or still INITIALIZING)
cannot idle out.

Everything that decides expiry asks :func:`due`: the scanner (on trio's
clock, with the session's local times), the store-synchronisation component
when it brings a stored session in or confirms an expiry (on the wall clock,
with the record's times), :meth:`SessionRecord.due`, the in-memory store, and
the SQL stores, whose ``WHERE`` clause is :data:`DUE_SQL` -- written next to
the Python rule and pinned to it by a test (``tests/test_expiry.py``).

``grace`` widens only the idle bound: with a store shared by several
processes, use elsewhere is written coalesced, so an idle deadline seen from
here may be early by up to the time that use waits to be written. A session
is written at least every ``min(touch_interval, idle_timeout / 4)``, so that
is its allowance: ``grace`` is the cap (the touch interval) and the rule
takes ``min(grace, idle_timeout / 4)``. A session with a one-second idle
timeout gets a quarter second, not the whole touch interval.

This module imports no trio and does no I/O.
"""

from __future__ import annotations

import math

from ._state import TerminationReason

__all__ = [
    "DUE_SQL",
    "IDLE_DUE_SQL",
    "LIFETIME_DUE_SQL",
    "REASON_SQL",
    "due",
    "due_params",
    "idle_allowance",
    "idle_due_params",
    "next_deadline",
]

_LIFETIME = TerminationReason.LIFETIME_EXCEEDED
_IDLE = TerminationReason.IDLE_TIMEOUT


def due(
    now: float,
    *,
    expires_at: float,
    idle_since: float | None,
    idle_timeout: float,
    grace: float = 0.0,
) -> TerminationReason | None:
    """Why a live session should end at ``now``, or ``None`` if it should not.

    ``idle_since`` is ``None`` when the session is not idle.
    """
    if expires_at <= now:
        return _LIFETIME
    # Written as the SQL is, so both round alike and the SQL can range-scan an
    # index on the idle deadline (``last_active + idle_timeout <= now``) before
    # it applies the allowance, ``min(grace, idle_timeout / 4)``.
    if idle_since is not None:
        bound = idle_since + idle_timeout
        if bound <= now and (bound <= now - grace or bound + idle_timeout * 0.25 <= now):
            return _IDLE
    return None


def idle_allowance(idle_timeout: float, grace: float) -> float:
    """How much longer than its idle timeout a session may live: ``min(grace, idle_timeout/4)``."""
    return min(grace, idle_timeout * 0.25)


def next_deadline(
    *, expires_at: float, idle_since: float | None, idle_timeout: float, grace: float = 0.0
) -> float:
    """The earliest time at which :func:`due` says yes, given no further activity.

    Exact under float rounding: :func:`due` is true at the returned time (a
    scanner that sleeps until it never wakes up to find nothing due).
    """
    if idle_since is None:
        return expires_at
    bound = idle_since + idle_timeout
    by_grace = bound + grace
    # ``due`` compares ``bound <= now - grace``; ``(bound + grace) - grace`` can
    # round below ``bound``: step up to the first float for which it does not.
    while by_grace - grace < bound:
        by_grace = math.nextafter(by_grace, math.inf)
    # The quarter-timeout branch compares ``bound + idle_timeout * 0.25 <= now``: exact.
    by_quarter = bound + idle_timeout * 0.25
    return min(expires_at, by_grace, by_quarter)


#: The lifetime half of the rule. Parameter: ``now``. Range-scans the index on
#: ``expires_at`` of live rows.
LIFETIME_DUE_SQL = "state <> 'terminated' AND expires_at <= %s"

#: The idle half. Parameters: :func:`idle_due_params`. A stored session is
#: idle (can idle out) in state ``'idle'``; its ``idle_since`` is
#: ``last_active``. Range-scans the index on ``last_active + idle_timeout`` of
#: idle rows, then applies the allowance to what the range holds.
IDLE_DUE_SQL = (
    "state = 'idle' AND last_active + idle_timeout <= %s AND "
    "(last_active + idle_timeout <= %s OR last_active + idle_timeout + idle_timeout * 0.25 <= %s)"
)

#: The whole rule in SQL, over the ``sessions`` table. Parameters: :func:`due_params`.
DUE_SQL = "state <> 'terminated' AND (expires_at <= %s OR (" + IDLE_DUE_SQL + "))"


def idle_due_params(now: float, grace: float) -> tuple[float, float, float]:
    """The parameters of :data:`IDLE_DUE_SQL`, in order."""
    return (now, now - grace, now)


def due_params(now: float, grace: float) -> tuple[float, ...]:
    """The parameters of :data:`DUE_SQL`, in order."""
    return (now, *idle_due_params(now, grace))


#: The reason a due row ends with (the lifetime wins, as in :func:`due`). Parameter: ``now``.
REASON_SQL = f"CASE WHEN expires_at <= %s THEN '{_LIFETIME.value}' ELSE '{_IDLE.value}' END"
