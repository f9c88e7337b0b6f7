"""The session's own task and its background work.

Theory of operation
===================

Each session has one task in the supervisor's nursery (the supervisor
starts it; this module is its body). The task runs the setup (or resume)
hook, reports ``started``, and parks: waiting to be rescheduled is far
cheaper than waiting to be cancelled, which matters when 100 000 sessions
expire at once. The session's nursery is opened when it is first needed:
around the setup hook if there is one (it may start background work and
wait on it), or when background work is first asked for; a session that
never runs any (most do not) costs a parked task and nothing more. :meth:`SessionTasks.stop` -- the
lifecycle's ``on_terminating`` -- cancels the session's requests and wakes
the task (cancelling the nursery too when background work runs). The task
then writes the end to the store, runs teardown once (shielded) and hands
the session back to the supervisor to finish (TERMINATED, tombstone, out of
the registry). So no session reaches TERMINATED with its task alive.

Background work (``Session.start_soon``) runs in the session's nursery under
a guard: a failure is logged and counted and ends that session with
``error``, never anything else.

:class:`SessionTasks` is the one writer of a session's ``_nursery``,
``_parked``, ``_background`` and ``_torn_down``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ._hooks import HookRunner
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics
from ._requests import Requests
from ._session import Session
from ._state import TerminationReason
from ._sync import StoreSync

__all__ = ["SessionTasks"]

logger = logging.getLogger("mcp_sessions")


class SessionTasks:
    """The bodies of session tasks and their background work."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        requests: Requests,
        hooks: HookRunner,
        sync: StoreSync,
        metrics: RuntimeMetrics,
        finished: Callable[[Session], None],
    ) -> None:
        self._lifecycle = lifecycle
        self._requests = requests
        self._hooks = hooks
        self._sync = sync
        self._metrics = metrics
        self._finished = finished

    async def run(
        self, session: Session, started: trio.Event, ready_at: float | None = None
    ) -> None:
        """Run the session from creation until it is TERMINATED; set ``started`` once its
        setup (or resume) hook is done. With ``ready_at``, the session goes on to be
        ready (idle since then) right after, whoever is still waiting."""
        hooks, lifecycle = self._hooks, self._lifecycle
        try:
            if hooks.has_setup(session):
                # A setup hook may start background work and wait on it: it
                # runs inside the session's nursery.
                async with trio.open_nursery() as nursery:
                    session._nursery = nursery
                    if session.live and not await hooks.setup(session):
                        lifecycle.terminate(session, TerminationReason.ERROR)
                    if ready_at is not None and session.live:
                        lifecycle.ready(session, idle_since=ready_at)
                    started.set()
                    await _hold(session, nursery)
            else:
                if ready_at is not None and session.live:
                    lifecycle.ready(session, idle_since=ready_at)
                started.set()
                # Parked without a nursery until background work is asked for:
                # most sessions never start any, and need not pay for one.
                while session.live:
                    await _park(session)
                    if session._pending and session.live:
                        async with trio.open_nursery() as nursery:
                            session._nursery = nursery
                            pending, session._pending = session._pending, None
                            for fn, args, name in pending:
                                nursery.start_soon(self._guard, session, fn, args, name=name)
                            await _hold(session, nursery)
        finally:
            if session._pending:  # asked for, never started: the session ended first
                session._background -= len(session._pending)
                session._pending = None
            if session.live:
                # Cancelled from outside (the supervisor itself is being
                # cancelled) rather than terminated: end it as a shutdown.
                lifecycle.terminate(session, TerminationReason.SHUTDOWN)
            # Ended (or cancelled) while its setup ran: the creator still hears
            # back, and sees the session ending.
            started.set()
            if self._sync.has_end_to_write(session) or hooks.hooks.teardown is not None:
                with trio.CancelScope(shield=True):
                    await self._sync.ended(session)
                    if not session._torn_down:
                        session._torn_down = True
                        await hooks.teardown(session)
            session._torn_down = True
            self._finished(session)

    def stop(self, session: Session) -> None:
        """The lifecycle's ``on_terminating``: cancel its requests, wake its task."""
        self._requests.cancel(session)
        parked = session._parked
        if parked is not None:
            # The usual case: the task is parked with nothing to cancel but its
            # own wait. Waking it is far cheaper than a cancellation.
            session._parked = None
            trio.lowlevel.reschedule(parked)
        nursery = session._nursery
        if nursery is not None and (parked is None or session._background):
            nursery.cancel_scope.cancel()

    def start_background(
        self,
        session: Session,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        name: str | None,
    ) -> None:
        session.check_live()
        session._background += 1
        task_name = name or _task_name(fn)
        nursery = session._nursery
        if nursery is not None:
            nursery.start_soon(self._guard, session, fn, args, name=task_name)
            return
        # No nursery yet: hand the work to the session's task, which opens one.
        if session._pending is None:
            session._pending = []
        session._pending.append((fn, args, task_name))
        parked = session._parked
        if parked is not None:
            session._parked = None
            trio.lowlevel.reschedule(parked)

    async def _guard(
        self, session: Session, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await fn(*args)
        except Exception:
            logger.exception("background task %s of session %s failed", _task_name(fn),
                             session.id, extra={"session_id": session.id})  # fmt: skip
            self._metrics.background_errors += 1
            self._lifecycle.terminate(session, TerminationReason.ERROR)
        finally:
            session._background -= 1


async def _hold(session: Session, nursery: trio.Nursery) -> None:
    """Park inside the session's nursery until the session ends; then stop its work."""
    while session.live:
        await _park(session)
    if session._background:
        nursery.cancel_scope.cancel()


async def _park(session: Session) -> None:
    """Sleep until :meth:`SessionTasks.stop` wakes us (or we are cancelled)."""
    session._parked = trio.lowlevel.current_task()

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        session._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


def _task_name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
