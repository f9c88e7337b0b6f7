"""Expiry with a store: the reconciler, the sweeper, and the settling window after a clock step.

Theory of operation
===================

:class:`~mcp_sessions._sync_store.DurableSync` owns one of each and hands
each what it works with (the store, the registry, the lifecycle, callables of
its own); none of them holds the sync.

- :class:`Reconciler` owns the reconciler task, one of the supervisor's store
  tasks. A session this process holds idles out on trio's clock, and the
  store's wall-clock times carry only what other processes did. When the
  scanner finds a stored session due here, it is queued here
  (:meth:`~Reconciler.confirm_expiry`) and left unscheduled meanwhile; the
  task asks the store to end it unless a later use was written than the last
  one this process knows of (``unchanged_since``), so a wall-clock step can
  neither end it early nor keep it past its bound. Use written elsewhere is
  taken in and the session waits again. If the store cannot answer, a session
  still due here ends here, and the store's sweep ends its record when it can.
- :class:`Sweeper` owns the sweeper task: once per ``sweep_interval`` the
  holder of the store's sweep lease (one process per interval) ends stored
  sessions whose deadline passed, loaded anywhere or nowhere, and purges
  records older than ``tombstone_retention``. This process's own unwritten
  use is flushed first.
- :class:`SettlingWindow` has no task: it is the reaction to a wall-clock
  step. What this process knew of the store's times is forgotten, and its
  sessions' use (and lifetimes) are rewritten in the new wall time at once.
  Other processes sharing the store need time to notice and do the same, so
  for ``cleanup_interval + 2 * touch_interval`` after a step nothing is idled
  out on stored times: the sweeper skips its sweep, and the sync neither
  ends a session idle at resolve nor evicts the longest-idle one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

import trio

from ._clock import RuntimeClock
from ._instances import InstanceLease
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics
from ._registry import Registry
from ._session import Session
from ._settings import Settings
from ._state import TerminationReason
from ._store import SessionRecord, SessionStore, StoreUnavailable
from ._sync_stored import _stored

__all__ = ["Reconciler", "SettlingWindow", "Sweeper"]

logger = logging.getLogger("mcp_sessions")

_T = TypeVar("_T")


class Call(Protocol):
    """Runs one store operation, noting whether the store could be reached (and, for a
    ``write``, whether it could be written to)."""

    async def __call__(self, op: Awaitable[_T], *, write: bool = True) -> _T: ...


#: The store says the session ended (or ends) elsewhere: end it here as told.
EndedElsewhere = Callable[[Session, TerminationReason | None], None]


class SettlingWindow:
    """What a wall-clock step changes here, and how long stored times are not trusted after it."""

    def __init__(
        self,
        *,
        registry: Registry,
        settings: Settings,
        rewrite: Callable[[Iterable[Session]], None],
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._rewrite = rewrite
        self._stepped_at = -math.inf

    def stepped(self, step: float) -> None:
        """The wall clock stepped (a :meth:`RuntimeClock.on_step` listener)."""
        # What we knew of the store's times is in the old wall time (or, learnt since
        # the step and before we noticed it, in the new one: we cannot tell), so it
        # is forgotten; our sessions' last use is written again in the new wall time
        # at once, and until every process sharing the store has had time to do the
        # same, nothing is idled out on stored times (see settling).
        for session in self._registry:
            st = _stored(session)
            if st is not None:
                st.known_active = -math.inf
                st.reframe = True
        if not self.settling():  # steps in a row do not hold the window open
            self._stepped_at = trio.current_time()
        self._rewrite(self._registry)

    def settling(self) -> bool:
        """Whether the wall clock stepped too recently to judge idleness by stored times:
        other processes may not have noticed yet, nor rewritten their sessions' use."""
        settings = self._settings
        window = settings.cleanup_interval + 2 * settings.touch_interval
        return trio.current_time() < self._stepped_at + window


class Reconciler:
    """Confirms with the store the expiries the scanner found due here."""

    def __init__(
        self,
        store: SessionStore,
        *,
        lifecycle: Lifecycle,
        metrics: RuntimeMetrics,
        clock: RuntimeClock,
        grace: float,
        call: Call,
        take_in: Callable[[Session, SessionRecord], None],
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._clock = clock
        self._grace = grace
        self._call = call
        self._take_in = take_in
        self._expiring: dict[Session, None] = {}  # due here; the store must confirm (in order)
        self._wake = trio.Event()

    def confirm_expiry(self, session: Session) -> bool:
        """The scanner found it due: True to end it now, False if the store must confirm."""
        st = _stored(session)
        if st is None or st.end_written:
            return True
        self._expiring[session] = None
        self._wake.set()
        return False

    def confirming(self, session: Session) -> bool:
        return session in self._expiring

    async def run(self) -> None:
        """The reconciler task (owned by the supervisor's nursery): confirm expiries
        with the store, which knows about use in other processes."""
        while True:
            if not self._expiring:
                await self._wake.wait()
                self._wake = trio.Event()
            while self._expiring:
                session = next(iter(self._expiring))
                if session.live:
                    await self._reconcile(session)
                    self._lifecycle.reschedule(session)  # never left unscheduled
                self._expiring.pop(session, None)

    async def _reconcile(self, session: Session) -> None:
        local = self._lifecycle.due(session, trio.current_time())
        if local is None:
            return
        st = _stored(session)
        assert st is not None
        store = self._store
        # Idle here by trio's clock: the store ends it unless someone else's later
        # use was written (a wall-clock comparison alone would trust a stepped clock).
        unchanged_since = st.known_active if local is TerminationReason.IDLE_TIMEOUT else None
        reason: TerminationReason | None
        try:
            reason = await self._call(
                store.expire(
                    session.id,
                    self._clock.wall(),
                    grace=self._grace,
                    unchanged_since=unchanged_since,
                )
            )
            if reason is None:
                record: SessionRecord | None = await self._call(store.load(session.id), write=False)
                if record is not None and record.live:
                    self._take_in(session, record)  # used elsewhere meanwhile: wait again
                    return
                reason = record.termination_reason if record is not None else local
            st.end_written = True
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                self._metrics.cleanup_errors += 1
                logger.exception("cleanup failed for session %s", session.id,
                                 extra={"session_id": session.id})  # fmt: skip
            # The store could not confirm. If it is still due here, end it here;
            # the store's sweep ends the record when it can.
            reason = self._lifecycle.due(session, trio.current_time())
            if reason is None:
                return
        if session.live:
            self._lifecycle.end_as_told(session, reason or local)


class Sweeper:
    """Ends stored sessions whose deadline passed (opened anywhere); purges old records."""

    def __init__(
        self,
        store: SessionStore,
        *,
        registry: Registry,
        metrics: RuntimeMetrics,
        clock: RuntimeClock,
        settings: Settings,
        grace: float,
        instance: InstanceLease,
        window: SettlingWindow,
        flush: Callable[[], Awaitable[None]],
        call: Call,
        ended_elsewhere: EndedElsewhere,
    ) -> None:
        self._store = store
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._settings = settings
        self._grace = grace
        self._instance = instance
        self._window = window
        self._flush = flush
        self._call = call
        self._ended_elsewhere = ended_elsewhere

    async def run(self) -> None:
        """The sweeper task (owned by the supervisor's nursery): one sweep per interval."""
        store, interval = self._store, self._settings.sweep_interval
        while True:
            await trio.sleep(interval)
            try:
                self._clock.check_step()  # a step rewrites our sessions' use first
                if self._window.settling():
                    continue  # others may still hold pre-step times: sweep next time
                await self._flush()  # our own recent use first
                now = self._clock.wall()
                # One process sweeps per interval: the holder of the sweep lease.
                ended: list[tuple[str, TerminationReason]] = await self._call(
                    store.sweep(now, grace=self._grace, holder=self._instance.id, lease=interval)
                )
                for session_id, reason in ended:
                    session = self._registry.get(session_id)
                    if session is not None and session.live:
                        self._ended_elsewhere(session, reason)
                await self._call(store.purge(now - self._settings.tombstone_retention))
            except Exception as exc:
                self._metrics.cleanup_errors += 1
                logger.warning("store sweep failed: %s", exc)
