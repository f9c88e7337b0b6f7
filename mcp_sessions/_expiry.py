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
here may be up to one touch interval early.

This module imports no trio and does no I/O.
"""

from __future__ import annotations

import math

from ._state import TerminationReason

__all__ = ["DUE_SQL", "REASON_SQL", "due", "next_deadline"]

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
    # Written as the SQL is (``last_active + idle_timeout <= now - grace``), so
    # both round alike and the SQL can use an index on the idle deadline.
    if idle_since is not None and idle_since + idle_timeout <= now - grace:
        return _IDLE
    return None


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
    idle_end = bound + grace
    # ``due`` compares ``bound <= now - grace``; ``(bound + grace) - grace`` can
    # round below ``bound``: step up to the first float for which it does not.
    while idle_end - grace < bound:
        idle_end = math.nextafter(idle_end, math.inf)
    return min(expires_at, idle_end)


#: The rule in SQL, over the ``sessions`` table. Parameters, in order:
#: ``now`` (for the lifetime) and ``now - grace`` (for the idle bound). A
#: stored session is idle (can idle out) in state ``'idle'``; its
#: ``idle_since`` is ``last_active``.
DUE_SQL = (
    "state <> 'terminated' AND (expires_at <= %s "
    "OR (state = 'idle' AND last_active + idle_timeout <= %s))"
)

#: The reason a due row ends with (the lifetime wins, as in :func:`due`). Parameter: ``now``.
REASON_SQL = f"CASE WHEN expires_at <= %s THEN '{_LIFETIME.value}' ELSE '{_IDLE.value}' END"
