"""The runtime's invariants, checked from outside (``Supervisor.check_invariants``).

What DESIGN.md promises, as assertions over the passive parts: the
registry's indexes agree; live sessions are within the limits; the
per-state gauge matches the sessions and the counters add up (created =
live + terminated); ACTIVE exactly when requests are in flight; every live
session is scheduled no later than its next deadline (so nothing outlives
it by more than one scan interval); the schedule holds no more than about
twice its live entries. The stateful test checks them after every step.
"""

from __future__ import annotations

from ._deadlines import DeadlineSchedule
from ._lifecycle import Lifecycle
from ._metrics import RuntimeStatistics
from ._registry import Registry
from ._session import LIVE_STATES
from ._settings import Settings
from ._state import SessionState
from ._sync import StoreSync

__all__ = ["check"]

_S = SessionState


def check(
    settings: Settings,
    stats: RuntimeStatistics,
    *,
    registry: Registry,
    schedule: DeadlineSchedule[str],
    lifecycle: Lifecycle,
    sync: StoreSync,
) -> None:
    """Raise AssertionError if an invariant does not hold. O(live sessions)."""
    registry.check()
    live = list(registry)
    assert len(live) <= settings.max_sessions, "global limit exceeded"
    per: dict[str, int] = {}
    by_state: dict[SessionState, int] = dict.fromkeys(SessionState, 0)
    for session in live:
        per[session.principal] = per.get(session.principal, 0) + 1
        by_state[session.state] += 1
        if session.state in (_S.ACTIVE, _S.IDLE):
            assert (session.state is _S.ACTIVE) == (session.in_flight > 0), f"{session}"
        scheduled = schedule.deadline(session.id)
        if session.state is _S.INITIALIZING and scheduled is None:
            pass  # its setup hook is still running (bounded by setup_timeout)
        elif scheduled is None and sync.confirming(session):
            pass  # found due; the store is confirming it
        elif session.state in LIVE_STATES:
            assert scheduled is not None, f"{session} has no deadline"
            due = lifecycle.next_deadline(session)
            assert scheduled <= due, f"{session} scheduled {scheduled} after {due}"
    assert max(per.values(), default=0) <= settings.max_sessions_per_principal
    assert stats.live_by_state == by_state, f"{stats.live_by_state} != {by_state}"
    assert stats.created_total == stats.live + stats.terminated_total, "counters"
    assert schedule.entries <= 2 * len(schedule) + 1024, "schedule bloat"
