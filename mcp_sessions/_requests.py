"""Request accounting: in-flight counts, the ACTIVE/IDLE flips, request metrics, cancellation.

Theory of operation
===================

A request runs in the caller's task (the SDK's), inside a
:class:`RequestScope`. :class:`Requests` is the one writer of a session's
activity: requests in flight, last activity, request and error counts, and
the set of cancel scopes of its running requests. Entering the first
request of an IDLE session asks the lifecycle for ACTIVE; leaving the last
asks for IDLE. Ending a session cancels its requests' scopes (except the one
that is doing the ending: a ``session_close`` tool is not cancelled by its
own close); the request then leaves with :class:`SessionClosed` /
:class:`SessionExpired` so its caller answers with an error.

Every activity is reported to the store synchronisation (``on_activity``),
which writes it coalesced: a request never waits on the store for that.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from types import TracebackType

import trio

from ._errors import ShuttingDown, gone
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics
from ._session import LIVE_STATES, Session
from ._state import SessionState

__all__ = ["RequestScope", "Requests"]

_S = SessionState

# The cancel scope of the request running in the current task, so that a
# request which closes its own session is not cancelled by that close.
_current_request: contextvars.ContextVar[trio.CancelScope | None] = contextvars.ContextVar(
    "mcp_sessions_current_request", default=None
)


class Requests:
    """In-flight accounting for every session of one runtime."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: RuntimeMetrics,
        on_activity: Callable[[Session], None],
    ) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._on_activity = on_activity
        self.in_flight = 0
        self.accepting = True
        self._quiet: trio.Event | None = None  # set when nothing is in flight

    def stop_accepting(self) -> None:
        """Refuse new requests with :class:`ShuttingDown` from now on."""
        self.accepting = False

    async def wait_quiet(self) -> None:
        """Return when no request is in flight."""
        while self.in_flight:
            if self._quiet is None:
                self._quiet = trio.Event()
            await self._quiet.wait()

    def begin(self, session: Session, scope: trio.CancelScope) -> None:
        if session._state not in LIVE_STATES:
            raise gone(session.id, session.reason)
        if not self.accepting:
            raise ShuttingDown()
        session._in_flight += 1
        self.in_flight += 1
        session._last_active = trio.current_time()
        if session._in_flight == 1 and session._state is _S.IDLE:
            self._lifecycle.request_started(session)
        scopes = session._scopes
        if scopes is None:
            scopes = session._scopes = set()
        scopes.add(scope)
        self._on_activity(session)

    def end(self, session: Session, scope: trio.CancelScope, started: float, failed: bool) -> None:
        now = trio.current_time()
        if session._scopes is not None:
            session._scopes.discard(scope)
        session._in_flight -= 1
        self.in_flight -= 1
        session._last_active = now
        session._requests += 1
        metrics = self._metrics
        metrics.requests += 1
        metrics.request_duration.observe(now - started)
        if failed:
            session._errors += 1
            metrics.request_errors += 1
        self._on_activity(session)
        if session._in_flight == 0 and session._state is _S.ACTIVE:
            self._lifecycle.request_finished(session, now)
        if self.in_flight == 0 and self._quiet is not None:
            self._quiet.set()
            self._quiet = None

    def cancel(self, session: Session) -> None:
        """Cancel the session's running requests (but not the one calling this)."""
        if session._scopes:
            current = _current_request.get()
            for scope in session._scopes:
                if scope is not current:
                    scope.cancel()

    @staticmethod
    def seed(session: Session, *, last_active: float, requests: int, errors: int) -> None:
        """Start a session brought in from the store with its stored activity."""
        session._last_active = last_active
        session._requests = requests
        session._errors = errors

    @staticmethod
    def saw_activity(session: Session, last_active: float) -> None:
        """Take in use seen elsewhere (never moves backwards)."""
        if last_active > session._last_active:
            session._last_active = last_active


class RequestScope:
    """An async context manager around one request in a session.

    Entering it refuses ended sessions (:class:`SessionExpired` /
    :class:`SessionClosed`) and a stopping runtime (:class:`ShuttingDown`),
    counts the request in flight (IDLE -> ACTIVE on the first one) and opens a
    cancel scope registered with the session. Leaving it counts the request
    and its duration, and on the last one moves ACTIVE -> IDLE. If the session
    ended while the request ran, the body was cancelled and leaving raises the
    matching :class:`SessionGone`, so the caller answers with an error.
    """

    __slots__ = ("_failed", "_requests", "_scope", "_start", "_token", "session")

    def __init__(self, requests: Requests, session: Session) -> None:
        self._requests = requests
        self.session = session
        self._scope = trio.CancelScope()
        self._start = 0.0
        self._token: contextvars.Token[trio.CancelScope | None] | None = None
        self._failed = False

    def mark_failed(self) -> None:
        """Count this request as an error even though it returns normally (a tool error result)."""
        self._failed = True

    @property
    def cancel_scope(self) -> trio.CancelScope:
        return self._scope

    async def __aenter__(self) -> RequestScope:
        self._requests.begin(self.session, self._scope)
        self._start = trio.current_time()
        self._scope.__enter__()
        self._token = _current_request.set(self._scope)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._token is not None
        _current_request.reset(self._token)
        try:
            self._scope.__exit__(exc_type, exc, tb)
        finally:
            failed = exc is not None or self._failed
            self._requests.end(self.session, self._scope, self._start, failed)
        if self._scope.cancelled_caught:
            # Our scope caught the cancellation: the session ended under us.
            raise gone(self.session.id, self.session.reason) from None
        return False
