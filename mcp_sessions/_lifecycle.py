"""The lifecycle: the only writer of a session's state and reason.

Theory of operation
===================

Every state change of every session goes through :class:`Lifecycle`, which
asks :func:`mcp_sessions._state.apply` for the new state (so every move is
checked against the one table) and then keeps what follows from a state in
step with it, synchronously, before any other task runs:

- the live-by-state gauge and the created / expired counters;
- the registry's idle order (eviction) and the deadline schedule: a session
  is scheduled by its next deadline under the expiry rule on entering
  INITIALIZING, IDLE or ACTIVE, and dropped from the schedule the moment it
  starts ending (so an ended session is reachable from nothing);
- one :class:`TransitionEvent` per change for the observers;
- on entering TERMINATING, ``on_terminating(session)``: the supervisor
  wires it to cancel the session's requests and wake its task.

Ending is two halves. :meth:`terminate` is synchronous: TERMINATING, the
reason, the cancellations. The session's own task then runs its teardown
and calls :meth:`finished` (TERMINATED), so a session never reaches
TERMINATED while its task is alive, and teardown runs once, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from . import _expiry
from ._deadlines import DeadlineSchedule
from ._metrics import RuntimeMetrics
from ._registry import Registry
from ._session import LIVE_STATES, Session, SessionKind
from ._state import (
    TRANSITIONS,
    Event,
    SessionState,
    TerminationReason,
    apply,
    ready_event,
    termination_event,
)

__all__ = ["Lifecycle", "TransitionEvent"]

logger = logging.getLogger("mcp_sessions")
_S = SessionState
_EXPIRY = frozenset({TerminationReason.IDLE_TIMEOUT, TerminationReason.LIFETIME_EXCEEDED})


@attrs.frozen(kw_only=True)
class TransitionEvent:
    """What observers receive: one per state change (and one on creation)."""

    session_id: str
    kind: SessionKind
    principal: str
    #: ``None`` for the creation event.
    previous: SessionState | None
    state: SessionState
    #: ``None`` for the creation event.
    event: Event | None
    reason: TerminationReason | None
    #: Wall-clock time of the change.
    at: float


class Lifecycle:
    """Moves sessions through the state table and keeps what depends on state in step."""

    def __init__(
        self,
        *,
        registry: Registry,
        schedule: DeadlineSchedule[str],
        metrics: RuntimeMetrics,
        wall_clock: Callable[[], float],
        on_terminating: Callable[[Session], None],
        emit: Callable[[TransitionEvent], None] | None = None,
        idle_grace: float = 0.0,
    ) -> None:
        self._registry = registry
        self._schedule = schedule
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._on_terminating = on_terminating
        self._emit = emit
        #: Added to the idle bound (a shared store's allowance for unwritten use elsewhere).
        self.idle_grace = idle_grace
        #: A durable store keeps handle sessions across a shutdown (they resume after a
        #: restart): their end here is logged as leaving, not as terminating.
        self.keeps_handles = False

    # -- the expiry rule, on local times ----------------------------------------------

    def due(self, session: Session, now: float) -> TerminationReason | None:
        """Why ``session`` should end at ``now`` (trio's clock), if it should."""
        if session._state not in LIVE_STATES:
            return None
        return _expiry.due(
            now,
            expires_at=session.lifetime_end,
            idle_since=session.idle_since,
            idle_timeout=session.idle_timeout,
            grace=self.idle_grace,
        )

    def next_deadline(self, session: Session) -> float:
        return _expiry.next_deadline(
            expires_at=session.lifetime_end,
            idle_since=session.idle_since,
            idle_timeout=session.idle_timeout,
            grace=self.idle_grace,
        )

    def reschedule(self, session: Session) -> None:
        """Make sure the schedule wakes the scanner by the session's next deadline."""
        if session._state in LIVE_STATES:
            self._schedule.ensure_by(session.id, self.next_deadline(session))

    def time_lost(self, session: Session, seconds: float) -> None:
        """The machine slept ``seconds`` that trio's clock did not count: the session's
        local times (last use, idle since, lifetime end) are that much longer ago."""
        session.lifetime_end -= seconds
        session._last_active -= seconds
        session._idle_since -= seconds
        self.reschedule(session)

    def used_elsewhere(self, session: Session, at: float) -> None:
        """Another process used the session at ``at``: an IDLE one's idle clock restarts then."""
        if session._state is _S.IDLE and at > session._idle_since:
            session._idle_since = at
            self.reschedule(session)

    # -- transitions ----------------------------------------------------------------------

    def created(self, session: Session) -> None:
        """A new INITIALIZING session (already registered).

        It is scheduled once its setup is done (:meth:`ready` or
        :meth:`reschedule`), so a session that goes straight to IDLE costs one
        schedule entry, not two; setup has its own timeout.
        """
        self._metrics.live[_S.INITIALIZING] += 1
        RuntimeMetrics.bump(self._metrics.created, session.kind.value)
        if self._emit is not None:
            self._event(session, None, None, None)

    def ready(self, session: Session, idle_since: float) -> None:
        """INITIALIZING -> IDLE, or ACTIVE with a request in flight. Raises if it has ended."""
        session.check_live()
        self._transition(session, ready_event(session._in_flight))
        if session._state is _S.IDLE:
            self._enter_idle(session, idle_since)

    def request_started(self, session: Session) -> None:
        """IDLE -> ACTIVE (the first request in flight)."""
        self._transition(session, Event.REQUEST_STARTED)

    def request_finished(self, session: Session, now: float) -> None:
        """ACTIVE -> IDLE (the last request in flight finished at ``now``)."""
        self._transition(session, Event.LAST_REQUEST_FINISHED)
        self._enter_idle(session, now)

    def terminate(self, session: Session, reason: TerminationReason) -> bool:
        """Start ending a live session; False if it was already ending (or cannot end so)."""
        if session._state not in LIVE_STATES:
            return False
        event = termination_event(reason)
        session._reason = reason
        try:
            self._transition(session, event, reason)
        except BaseException:
            session._reason = None
            raise
        self._schedule.cancel(session.id)
        level = logging.WARNING if reason is TerminationReason.ERROR else logging.INFO
        if logger.isEnabledFor(level):
            if self.keeps_handles and self.kept(session):
                message = "session %s leaving this process (%s); kept in the store"
            else:
                message = "session %s terminating: %s"
            logger.log(level, message, session.id, reason.value,
                       extra={"session_id": session.id})  # fmt: skip
        self._on_terminating(session)
        return True

    @staticmethod
    def kept(session: Session) -> bool:
        """Whether a durable store keeps ``session`` past its end here: one with a handle
        (a handle session, or an HTTP session) ended by a shutdown resumes after a restart."""
        if session._reason is not TerminationReason.SHUTDOWN:
            return False
        return session.kind is SessionKind.HANDLE or session.handle_hash is not None

    def end_as_told(self, session: Session, reason: TerminationReason | None) -> bool:
        """End a session that the store says has ended, whatever its state here.

        A reason the table does not allow from its state here (an idle
        timeout of a session still INITIALIZING here, say) ends it ``closed``.
        """
        if session._state not in LIVE_STATES:
            return False
        reason = reason or TerminationReason.CLOSED
        if termination_event(reason) not in TRANSITIONS[session._state]:
            reason = TerminationReason.CLOSED
        return self.expire(session, reason)

    def expire(self, session: Session, reason: TerminationReason) -> bool:
        """End a session for a timeout (counted as expired)."""
        ended = self.terminate(session, reason)
        if ended and session._reason in _EXPIRY:
            self._metrics.expired += 1
        return ended

    def finished(self, session: Session) -> None:
        """TERMINATING -> TERMINATED (its task has torn it down)."""
        self._transition(session, Event.TEARDOWN_DONE, session._reason)
        kind, reason = session.kind.value, session._reason
        key = (kind, reason.value if reason is not None else "unknown")
        cells = self._metrics.terminated
        cells[key] = cells.get(key, 0) + 1
        if session._done is not None:
            session._done.set()

    # -- internals ----------------------------------------------------------------------

    def _transition(
        self, session: Session, event: Event, reason: TerminationReason | None = None
    ) -> None:
        previous = session._state
        new = apply(previous, event)  # raises InvalidTransition, state unchanged
        session._state = new
        live = self._metrics.live
        live[previous] -= 1
        if new is not _S.TERMINATED:
            live[new] += 1
        if previous is _S.IDLE:
            self._registry.idle_left(session)
        elif previous is _S.INITIALIZING and session._ready is not None:
            session._ready.set()
        if self._emit is not None:
            self._event(session, previous, event, reason)

    def _enter_idle(self, session: Session, since: float) -> None:
        session._idle_since = since
        self._registry.idle_entered(session)
        self._schedule.ensure_by(session.id, self.next_deadline(session))

    def _event(
        self,
        session: Session,
        previous: SessionState | None,
        event: Event | None,
        reason: TerminationReason | None,
    ) -> None:
        assert self._emit is not None
        self._emit(
            TransitionEvent(
                session_id=session.id,
                kind=session.kind,
                principal=session.principal,
                previous=previous,
                state=session._state,
                event=event,
                reason=reason if reason is not None else session._reason,
                at=self._wall_clock(),
            )
        )
