"""The scanner: one tick ends what the deadline schedule says is due.

Theory of operation
===================

The supervisor owns the scanner's task (:meth:`Scanner.run`), which ticks
on the grid of multiples of ``cleanup_interval`` -- the deadline schedule's
buckets -- so a session ends within one interval of its deadline and a tick
costs O(sessions due), not O(live sessions). Each due session is checked
against the expiry rule (an entry may be early: a session in use keeps one
entry, rescheduled when it pops). A session that only the store can confirm
(it may be in use in another process) is handed to the store
synchronisation instead of ended here. A tick also forgets tombstones whose
retention ran out, and checks whether the wall clock stepped.
"""

from __future__ import annotations

import logging

import trio

from ._clock import RuntimeClock
from ._deadlines import DeadlineSchedule
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics
from ._registry import Registry
from ._sync import StoreSync

__all__ = ["Scanner"]

logger = logging.getLogger("mcp_sessions")


class Scanner:
    """Ends due sessions, one tick at a time."""

    def __init__(
        self,
        *,
        schedule: DeadlineSchedule[str],
        registry: Registry,
        lifecycle: Lifecycle,
        sync: StoreSync,
        metrics: RuntimeMetrics,
        clock: RuntimeClock,
        interval: float,
    ) -> None:
        self._schedule = schedule
        self._registry = registry
        self._lifecycle = lifecycle
        self._sync = sync
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        #: Wall-clock time of the last tick.
        self.last_run: float | None = None

    async def run(self) -> None:
        """Tick forever on the interval's grid (owned by the supervisor's nursery)."""
        interval = self._interval
        while True:
            now = trio.current_time()
            tick = (now // interval + 1) * interval
            if tick <= now:  # float rounding: never wake up at the same instant again
                tick = (now // interval + 2) * interval
            await trio.sleep_until(tick)
            self.tick(trio.current_time())

    def tick(self, now: float) -> int:
        """End what is due at ``now``; purge old tombstones. Returns sessions ended here."""
        self._metrics.cleanup_runs += 1
        self._clock.check_step()
        self.last_run = self._clock.wall()
        lifecycle, registry, sync = self._lifecycle, self._registry, self._sync
        ended = 0
        for session_id in self._schedule.pop_due(now):
            session = registry.get(session_id)
            if session is None:
                continue
            try:
                reason = lifecycle.due(session, now)
                if reason is None:
                    lifecycle.reschedule(session)  # the entry was early
                elif sync.confirm_expiry(session):
                    ended += lifecycle.expire(session, reason)
            except Exception:
                self._metrics.cleanup_errors += 1
                logger.exception("cleanup failed for session %s", session.id,
                                 extra={"session_id": session.id})  # fmt: skip
        registry.purge_tombstones(now)
        return ended
