"""Hooks: awaited setup / resume / teardown with timeouts, and ordered observer dispatch.

Theory of operation
===================

:class:`HookRunner` runs the awaited hooks for a session's task: ``setup``
(or ``resume`` for a session brought back from the store) while it is
INITIALIZING, bounded by ``setup_timeout``; ``teardown`` once while it is
TERMINATING, shielded and bounded by ``teardown_timeout``. A hook that
raises or times out is logged with the session id and counted; the runner
reports it, and the caller decides (a failed setup ends the session with
``error``). Nothing a hook does reaches the supervisor.

:class:`ObserverDispatcher` decouples observers from the request path: the
lifecycle hands it events synchronously (``emit``), a bounded queue holds
them, and one task (owned by the supervisor's nursery) delivers them in
order. A full queue drops the event and counts it; a failing observer is
counted and logged; neither ever blocks a request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from ._metrics import RuntimeMetrics
from ._state import TerminationReason

if TYPE_CHECKING:
    from ._lifecycle import TransitionEvent
    from ._session import Session

__all__ = ["HookRunner", "Hooks", "ObserverDispatcher"]

logger = logging.getLogger("mcp_sessions")

SetupHook = Callable[["Session"], Awaitable[None]]
TeardownHook = Callable[["Session", TerminationReason], Awaitable[None]]
Observer = Callable[["TransitionEvent"], Awaitable[None]]


@attrs.frozen(kw_only=True)
class Hooks:
    """Lifecycle hooks.

    ``setup`` and ``teardown`` are awaited (with the timeouts in
    :class:`Settings`); observers are called by the supervisor's dispatcher,
    in order, off the request path.
    """

    #: Runs while the session is INITIALIZING; raising or timing out ends it with ``error``.
    setup: SetupHook | None = None
    #: Runs once while the session is TERMINATING, shielded from cancellation.
    teardown: TeardownHook | None = None
    #: Called with every :class:`TransitionEvent`; a failure is counted, never propagated.
    observers: Sequence[Observer] = ()
    #: Runs instead of ``setup`` when a session is brought back from the store
    #: (after a restart, or opened by another process): restart what it needs.
    resume: SetupHook | None = None


class HookRunner:
    """Runs a session's awaited hooks with their timeouts; counts their failures."""

    def __init__(
        self,
        hooks: Hooks,
        metrics: RuntimeMetrics,
        *,
        setup_timeout: float,
        teardown_timeout: float,
    ) -> None:
        self.hooks = hooks
        self._metrics = metrics
        self._setup_timeout = setup_timeout
        self._teardown_timeout = teardown_timeout

    def has_setup(self, session: Session) -> bool:
        """Whether :meth:`setup` has a hook to run for this session."""
        return (self.hooks.resume if session.resumed else self.hooks.setup) is not None

    async def setup(self, session: Session) -> bool:
        """Run ``setup`` (or ``resume``); False if it raised or timed out."""
        name = "resume" if session.resumed else "setup"
        hook = self.hooks.resume if session.resumed else self.hooks.setup
        if hook is None:
            return True
        with trio.move_on_after(self._setup_timeout) as timeout:
            try:
                await hook(session)
            except Exception:
                logger.exception("%s hook failed for session %s", name, session.id,
                                 extra={"session_id": session.id})  # fmt: skip
                RuntimeMetrics.bump(self._metrics.hook_errors, name)
                return False
        if timeout.cancelled_caught and session.live:
            logger.error("%s hook timed out after %ss for session %s", name,
                         self._setup_timeout, session.id,
                         extra={"session_id": session.id})  # fmt: skip
            RuntimeMetrics.bump(self._metrics.hook_errors, name)
            return False
        return True

    async def teardown(self, session: Session) -> None:
        """Run ``teardown``, shielded and timed; failures are logged and counted."""
        teardown = self.hooks.teardown
        reason = session.reason
        if teardown is None or reason is None:
            return
        with trio.move_on_after(self._teardown_timeout, shield=True) as timeout:
            try:
                await teardown(session, reason)
            except Exception:
                logger.exception("teardown hook failed for session %s", session.id,
                                 extra={"session_id": session.id})  # fmt: skip
                RuntimeMetrics.bump(self._metrics.hook_errors, "teardown")
        if timeout.cancelled_caught:
            logger.error("teardown hook timed out for session %s", session.id,
                         extra={"session_id": session.id})  # fmt: skip
            RuntimeMetrics.bump(self._metrics.hook_errors, "teardown")


class ObserverDispatcher:
    """A bounded queue of transition events and the loop that delivers them in order."""

    def __init__(
        self, observers: Sequence[Observer], metrics: RuntimeMetrics, queue_size: int
    ) -> None:
        self._observers = tuple(observers)
        self._metrics = metrics
        self._send, self._receive = trio.open_memory_channel["TransitionEvent"](queue_size)
        self._done = trio.Event()

    def emit(self, event: TransitionEvent) -> None:
        """Queue an event (synchronous; drops and counts it when the queue is full)."""
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._metrics.observer_dropped += 1
        except trio.ClosedResourceError:
            pass

    async def run(self) -> None:
        """Deliver events until :meth:`aclose`; owned by the supervisor's nursery."""
        try:
            async with self._receive as receive:
                async for event in receive:
                    for observer in self._observers:
                        try:
                            await observer(event)
                        except Exception:
                            RuntimeMetrics.bump(self._metrics.hook_errors, "observer")
                            logger.exception("observer %r failed on %s", observer, event)
        finally:
            self._done.set()

    async def aclose(self) -> None:
        """Stop taking events and wait for the queued ones to go out (bound it from outside)."""
        await self._send.aclose()
        await self._done.wait()
