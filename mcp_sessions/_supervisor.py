"""The supervisor: owns the nursery and every task in it, and wires the passive parts.

Theory of operation
===================

::

    Supervisor.run()  (the supervisor nursery)
       |- scanner              pops due keys from the deadline schedule, asks the expiry rule
       |- observer dispatcher  delivers TransitionEvents in order (only with observers)
       |- store tasks          flusher, reconciler, sweeper, instance lease (with a store)
       '- one task per session, holding that session's nursery
             '- the session's background work (Session.start_soon)

The supervisor decides nothing by itself. Who decides, and who writes what:

=================  ===========================================================
registry           live sessions by id / handle hash / principal; tombstones
deadline schedule  when each session is next due (keys only)
expiry rule        "is this due, and why" (pure; shared with the stores' SQL)
admission          Admit / Evict / Reject, decided synchronously; I/O after
lifecycle          the one writer of state and reason; metrics; events
requests           the one writer of activity; ACTIVE/IDLE; cancellation
hooks              setup / resume / teardown with timeouts; observer dispatch
store sync         the one writer of the document; the store path
=================  ===========================================================

Request handlers are *not* the supervisor's: they run in the caller's task,
inside :meth:`Supervisor.request`, whose cancel scope the session holds.

A session's task (``_tasks.py``) is started in the supervisor's nursery and
scope; it runs the setup hook, sets ``started``, and parks (waiting to be
rescheduled is far cheaper than being cancelled, which matters when 100 000
sessions expire at once), opening the session's nursery only when it needs
one. The lifecycle's ``on_terminating`` wakes it; it then cancels its
background work, writes the end to the store, runs teardown (shielded), and
hands the session back here to finish: TERMINATED, tombstone, out of the
registry.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import trio
from prometheus_client.registry import Collector

from . import _admission
from ._clock import RuntimeClock
from ._deadlines import DeadlineSchedule
from ._errors import (
    LimitExceeded,
    MetadataTooLarge,
    SessionError,
    SessionNotFound,
    SessionSetupFailed,
    ShuttingDown,
    gone,
)
from ._hooks import HookRunner, Hooks, ObserverDispatcher
from ._invariants import check
from ._jsonmerge import json_size
from ._jsonvalue import check_json_value
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics, RuntimeStatistics, render_prometheus
from ._registry import Registry, Tombstone
from ._requests import Requests, RequestScope
from ._scanner import Scanner
from ._session import (
    NO_CLIENT,
    NO_METADATA,
    ClientInfo,
    Session,
    SessionKind,
    SessionSnapshot,
    hash_handle,
    new_session_id,
    snapshot_of,
)
from ._settings import LimitPolicy, Settings
from ._state import SessionState, TerminationReason
from ._stopping import MIN_STORE_WAIT_S, StoreWaits
from ._store import SessionRecord, SessionStore, StoreHealth
from ._sync import LocalSync, StoreSync
from ._sync_store import DurableSync
from ._tasks import SessionTasks

__all__ = ["Supervisor", "open_supervisor"]

logger = logging.getLogger("mcp_sessions")
_S = SessionState


class Supervisor:
    """Owns every live session and the tasks that serve them.

    Use :func:`open_supervisor`, or start :meth:`run` in a nursery of your own
    with ``await nursery.start(supervisor.run)`` and call :meth:`shutdown` to
    stop it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        hooks: Hooks | None = None,
        wall_clock: Callable[[], float] = time.time,
        store: SessionStore | None = None,
    ) -> None:
        self.settings = settings = settings or Settings()
        self.hooks = hooks = hooks or Hooks()
        self._metrics = metrics = RuntimeMetrics()
        self._clock = clock = RuntimeClock(wall_clock)
        self._registry = registry = Registry(
            track_idle=settings.limit_policy is LimitPolicy.EVICT_IDLE,
            retention=settings.tombstone_retention,
        )
        self._schedule: DeadlineSchedule[str] = DeadlineSchedule(settings.cleanup_interval)
        self._observers = (
            ObserverDispatcher(hooks.observers, metrics, settings.observer_queue_size)
            if hooks.observers
            else None
        )
        self._lifecycle = lifecycle = Lifecycle(
            registry=registry,
            schedule=self._schedule,
            metrics=metrics,
            wall_clock=wall_clock,
            on_terminating=self._on_terminating,
            emit=self._observers.emit if self._observers is not None else None,
        )
        self._hooks = HookRunner(
            hooks,
            metrics,
            setup_timeout=settings.setup_timeout,
            teardown_timeout=settings.teardown_timeout,
        )
        self._sync: StoreSync
        self._store_waits = StoreWaits()
        if store is None:
            self._sync = LocalSync(registry, metrics, clock, settings.max_state_bytes)
        else:
            durable = DurableSync(
                store,
                registry=registry,
                lifecycle=lifecycle,
                metrics=metrics,
                clock=clock,
                settings=settings,
                adopt=self._adopt,
            )
            lifecycle.idle_grace = durable.idle_grace
            lifecycle.keeps_handles = store.durable
            self._store_waits = durable.store_waits
            self._sync = durable
        self._requests = requests = Requests(lifecycle, metrics, self._sync.activity)
        self._tasks = SessionTasks(
            lifecycle=lifecycle,
            requests=requests,
            hooks=self._hooks,
            sync=self._sync,
            metrics=metrics,
            finished=self._finish,
        )
        self._scanner = Scanner(
            schedule=self._schedule,
            registry=registry,
            lifecycle=lifecycle,
            sync=self._sync,
            metrics=metrics,
            clock=clock,
            interval=settings.cleanup_interval,
        )
        clock.on_suspend(self._slept)
        self._nursery: trio.Nursery | None = None
        self._admitting = False
        self._stopping = False
        self._stopped = trio.Event()
        self._empty: trio.Event | None = None  # set when the registry empties
        self._collectors: list[Collector] = []

    # -- running -------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the supervisor until :meth:`shutdown` finishes (or this task is cancelled)."""
        if self._nursery is not None:
            raise RuntimeError("this supervisor is already running")
        self._clock.start()
        await self._sync.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._scanner.run, name="mcp_sessions.scanner")
                for name, task in self._sync.tasks():
                    nursery.start_soon(task, name=name)
                if self._observers is not None:
                    nursery.start_soon(self._observers.run, name="mcp_sessions.observers")
                self._admitting = True
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            # Cancelled from outside without a shutdown: sessions still end with
            # "shutdown" and run their teardown (each session task does that in
            # its own finally, shielded), so nothing is left half-done.
            self._admitting = False
            self._stopping = True
            self._requests.stop_accepting()
            with trio.CancelScope(shield=True):
                await self._sync.aclose()
            self._stopped.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully and return when everything has stopped.

        Stops admitting sessions and requests, lets in-flight requests finish
        for up to ``grace`` seconds (default ``settings.shutdown_grace``), then
        ends every session with ``shutdown`` (cancelling what still runs),
        waits for their teardowns, writes pending activity, delivers the
        remaining observer events and stops the supervisor's own tasks. Safe
        to call more than once, and from several tasks.
        """
        if self._nursery is None:
            raise RuntimeError("this supervisor is not running")
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._admitting = False
        self._requests.stop_accepting()
        grace = self.settings.shutdown_grace if grace is None else grace
        logger.info("shutting down: %d live sessions, %d requests in flight",
                    len(self._registry), self._requests.in_flight)  # fmt: skip
        with trio.move_on_after(grace):
            await self._requests.wait_quiet()
        # From here on the store gets one grace period in all, not a timeout per write.
        self.limit_store_waits(max(grace, MIN_STORE_WAIT_S))
        for session in self._registry:
            self._lifecycle.terminate(session, TerminationReason.SHUTDOWN)
        while len(self._registry):
            if self._empty is None:
                self._empty = trio.Event()
            await self._empty.wait()
        with self._store_waits.bounded(self.settings.teardown_timeout):
            await self._sync.flush()
        if self._observers is not None:
            with trio.move_on_after(self.settings.teardown_timeout):
                await self._observers.aclose()
        self._nursery.cancel_scope.cancel()
        await self._stopped.wait()

    def limit_store_waits(self, seconds: float) -> None:
        """The process is stopping: every wait on the store ends within ``seconds`` from now.

        Bounds the writes of a stop (sessions' ends, the last activity, the
        instance's removal, the store's queue) that a locked store would make
        wait out one timeout after another. Only ever shortens the bound.
        """
        self._store_waits.limit(trio.current_time() + seconds)

    def abandon_store_waits(self) -> None:
        """Stop at once: end every wait on the store now (a second signal, a gone client).

        Acknowledged writes are durable already; what is still being written
        may be lost, as in a crash.
        """
        if not self._store_waits.abandoned:
            logger.info("stopping at once: not waiting for the store")
        self._store_waits.abandon()

    # -- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        kind: SessionKind = SessionKind.HANDLE,
        principal: str,
        client: ClientInfo | None = None,
        metadata: Mapping[str, Any] | None = None,
        idle_timeout: float | None = None,
        handle: str | None = None,
        ready: bool = True,
    ) -> Session:
        """Create a session and start its task; return it once set up.

        The session is INITIALIZING while the ``setup`` hook runs; with
        ``ready=True`` (the default, right for handle sessions) it then moves
        on to IDLE. Handshake-era connection sessions pass ``ready=False`` and
        call :meth:`mark_ready` on ``notifications/initialized``.

        Raises :class:`LimitExceeded` at a limit (after trying to evict under
        ``LimitPolicy.EVICT_IDLE``; with a store, the limits count every
        process's sessions, atomically with the insert), :class:`InvalidArguments`
        for metadata that is not storable JSON, :class:`MetadataTooLarge`
        past ``max_metadata_bytes``, :class:`ShuttingDown` while stopping,
        :class:`SessionSetupFailed` if ``setup`` failed (the session has then
        ended with ``error``) and :class:`StoreUnavailable` if the store
        could not record it (it has then ended too).
        """
        if metadata:
            check_json_value(metadata, what="metadata", argument="metadata")
            size = json_size(metadata)
            if size > self.settings.max_metadata_bytes:
                raise MetadataTooLarge(size, self.settings.max_metadata_bytes)
        await self._admit(principal)
        await self._sync.check_room(principal)  # the store's count, before any setup runs
        if not self._admitting:  # (a shutdown began while the store answered)
            raise ShuttingDown()
        now = trio.current_time()
        session = Session(
            self,
            session_id=new_session_id(),
            kind=kind,
            principal=principal,
            client=client or NO_CLIENT,
            metadata=MappingProxyType(dict(metadata)) if metadata else NO_METADATA,
            idle_timeout=self.settings.idle_timeout if idle_timeout is None else idle_timeout,
            handle_hash=hash_handle(handle) if handle is not None else None,
            created_at=self._clock.wall(),
            now=now,
            lifetime_end=now + self.settings.max_lifetime,
        )
        await self._start(session, opener=True)
        if ready:
            self._lifecycle.ready(session, idle_since=trio.current_time())
        else:
            self._lifecycle.reschedule(session)
        try:
            await self._sync.created(session, ready=ready)
        except BaseException as exc:
            # Acknowledge only what is committed: end it here, the caller hears why
            # (a limit counted in the store is a refusal, not a failure).
            refused = isinstance(exc, LimitExceeded)
            self._lifecycle.terminate(
                session, TerminationReason.CLOSED if refused else TerminationReason.ERROR
            )
            with trio.CancelScope(shield=True):
                await self.wait_terminated(session)
            raise
        if not session.live:
            # Ended while the store recorded it (a shutdown, say). Its handle was
            # never handed out: end the record too (its task does, shielded).
            await self.wait_terminated(session)
            raise self._ended_during_creation(session)
        return session

    async def open_handle_session(
        self,
        *,
        principal: str,
        client: ClientInfo | None = None,
        metadata: Mapping[str, Any] | None = None,
        idle_timeout: float | None = None,
    ) -> tuple[Session, str]:
        """Create a handle session; return it and its secret handle.

        The handle is 256 bits from :mod:`secrets`, URL-safe. Only its SHA-256
        is kept: give the handle to the client and forget it.
        """
        handle = secrets.token_urlsafe(32)
        session = await self.create_session(
            kind=SessionKind.HANDLE,
            principal=principal,
            client=client,
            metadata=metadata,
            idle_timeout=idle_timeout,
            handle=handle,
        )
        return session, handle

    def mark_ready(self, session: Session) -> None:
        """INITIALIZING -> IDLE (or ACTIVE if a request is in flight).

        Raises :class:`SessionClosed`/:class:`SessionExpired` if it has ended.
        """
        self._lifecycle.ready(session, idle_since=trio.current_time())
        self._sync.ready(session)

    async def close(
        self, session: Session, reason: TerminationReason = TerminationReason.CLOSED
    ) -> None:
        """End a session and wait until it is TERMINATED (teardown done).

        Closing an ended session is a no-op. When called from a request in
        that same session (a ``session_close`` tool), that request is not
        cancelled.

        With a store, the end is committed there first. If the store cannot be
        reached, a ``closed`` (a client's request) raises
        :class:`StoreUnavailable` and the session stays open; any other reason
        ends the session here anyway (the store's sweep catches up later).
        """
        if session.live:
            with self._store_waits.bounded():  # a stop may not wait for the store
                await self._sync.closing(session, reason)
        if session.live:
            self._lifecycle.terminate(session, reason)
        await self.wait_terminated(session)

    def terminate(self, session: Session, reason: TerminationReason) -> bool:
        """Start ending a session without waiting; False if it was already ending."""
        return self._lifecycle.terminate(session, reason)

    async def wait_terminated(self, session: Session) -> None:
        """Wait until the session is TERMINATED (any number of tasks may wait)."""
        if session.state is _S.TERMINATED:
            return
        if session._done is None:
            session._done = trio.Event()
        await session._done.wait()

    def request(self, session: Session) -> RequestScope:
        """``async with supervisor.request(session):`` around one request.

        See :class:`RequestScope`.
        """
        return RequestScope(self._requests, session)

    async def patch_state(
        self, session: Session, patch: Mapping[str, Any], *, if_version: int | None = None
    ) -> int:
        """Apply a merge patch to ``session``'s state; see :meth:`Session.patch_state`.

        A patch that is not storable JSON (see :func:`check_json_value`) raises
        :class:`InvalidArguments` before any store sees it.
        """
        check_json_value(patch, what="state patch", argument="patch")
        return await self._sync.patch(session, patch, if_version)

    def start_background(
        self,
        session: Session,
        fn: Callable[..., Awaitable[object]],
        *args: object,
        name: str | None = None,
    ) -> None:
        """Run ``fn(*args)`` in the session's nursery; see :meth:`Session.start_soon`."""
        self._tasks.start_background(session, fn, args, name)

    # -- lookup --------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        """The live session with this public id.

        Raises :class:`SessionExpired`/:class:`SessionClosed` for a remembered
        ended one and :class:`SessionNotFound` otherwise.
        """
        session = self._registry.get(session_id)
        if session is not None and session.live:
            return session
        if session is not None:
            raise gone(session.id, session.reason)
        tomb = self._registry.tombstone(session_id)
        if tomb is not None:
            raise gone(tomb.id, tomb.reason)
        raise SessionNotFound()

    async def resolve_handle(self, handle: str, principal: str) -> Session:
        """The live session this handle names, if it belongs to ``principal``.

        Another principal's handle, a malformed one and an unknown one all
        raise the same :class:`SessionNotFound`: possession of a handle is not
        authentication. An ended one raises :class:`SessionExpired` or
        :class:`SessionClosed`.

        With a store, the store decides (it is the source of truth across
        processes): a session closed elsewhere is closed here too, one opened
        elsewhere (or before a restart) is brought back with its state, and
        one whose deadline passed meanwhile is expired. When the store says
        nothing was written elsewhere since the session was last checked,
        this costs no store round trip at all.
        """
        return await self._sync.resolve(hash_handle(handle), principal)

    async def list_records(
        self, principal: str, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[SessionRecord]:
        """The principal's live sessions as records, ordered by ``(created_at, id)``: from
        the store when there is one (every process's sessions), else this runtime's.

        A page: those after the key ``after``, at most ``limit``.
        """
        return await self._sync.list_records(principal, after=after, limit=limit)

    async def store_health(self) -> StoreHealth | None:
        """The store's health now (``None`` without a store). Never raises."""
        return await self._sync.health()

    @property
    def store(self) -> SessionStore | None:
        return self._sync.store

    @property
    def instance_id(self) -> str | None:
        """This runtime's instance in the store (its lease; see ``status``); None without one."""
        return self._sync.instance_id

    @property
    def store_error(self) -> str | None:
        """The last store failure this runtime saw, until a store call succeeds again."""
        return self._sync.error

    def sessions(self, principal: str | None = None) -> list[SessionSnapshot]:
        """Snapshots of the live sessions (of one principal, if given), oldest first."""
        return [
            s.snapshot() for s in self._registry if principal is None or s.principal == principal
        ]

    def tombstone(self, session_id: str) -> Tombstone | None:
        return self._registry.tombstone(session_id)

    def tombstones(self) -> list[Tombstone]:
        """What is remembered of recently ended sessions."""
        return self._registry.tombstones()

    def snapshot(self, session: Session) -> SessionSnapshot:
        """``session`` at this moment, with wall-clock times."""
        return snapshot_of(session, self._clock.wall_at)

    @property
    def live_count(self) -> int:
        return len(self._registry)

    @property
    def in_flight(self) -> int:
        return self._requests.in_flight

    @property
    def admitting(self) -> bool:
        return self._admitting

    @property
    def stopped(self) -> bool:
        """True once :meth:`run` has finished."""
        return self._stopped.is_set()

    @property
    def idle_grace(self) -> float:
        """How much longer than its idle timeout an idle session may live (a shared store's
        allowance for use elsewhere not yet written); 0 without a durable store."""
        return self._lifecycle.idle_grace

    @property
    def scheduled_deadlines(self) -> int:
        """Entries in the deadline schedule, stale ones included (for tests and tuning)."""
        return self._schedule.entries

    # -- metrics ---------------------------------------------------------------------------

    def statistics(self) -> RuntimeStatistics:
        """A consistent, frozen snapshot of the runtime's metrics."""
        started = self._nursery is not None
        uptime = trio.current_time() - self._clock.started_at if started else 0.0
        return RuntimeStatistics.from_cells(
            self._metrics, tombstones=self._registry.tombstone_count, uptime=uptime
        )

    def render_prometheus(self) -> str:
        """Prometheus text exposition of :meth:`statistics`, and of any added collectors."""
        return render_prometheus(self.statistics(), self._collectors)

    def add_collector(self, collector: Collector) -> None:
        """Expose a ``prometheus_client`` collector's metrics with the runtime's own.

        They then appear in ``sessions://metrics`` and HTTP's ``/metrics`` (the
        gateway adds its ``mcp_gateway_*`` metrics this way).
        """
        self._collectors.append(collector)

    def scan_once(self) -> int:
        """One cleanup tick now: end what is due, purge old tombstones. Returns sessions ended.

        A session that the store must confirm (it may be in use in another
        process) is handed to the store synchronisation and not counted.
        """
        return self._scanner.tick(trio.current_time())

    @property
    def last_cleanup(self) -> float | None:
        """Wall-clock time of the last scanner tick."""
        return self._scanner.last_run

    def check_invariants(self) -> None:
        """Raise AssertionError if any of the runtime's invariants does not hold.

        See :func:`mcp_sessions._invariants.check`. For tests; O(live sessions).
        """
        check(
            self.settings,
            self.statistics(),
            registry=self._registry,
            schedule=self._schedule,
            lifecycle=self._lifecycle,
            sync=self._sync,
        )

    # -- internals: admission and starting ---------------------------------------------------

    async def _admit(self, principal: str) -> None:
        while True:
            decision = _admission.decide(
                self._registry,
                self.settings,
                principal,
                admitting=self._admitting,
                counted_here=self._sync.store is None,
            )
            if isinstance(decision, _admission.Admit):
                return
            if isinstance(decision, _admission.Reject):
                raise decision.error
            victim = decision.victim
            logger.info("evicting longest-idle session %s to admit a new one", victim.id,
                        extra={"session_id": victim.id})  # fmt: skip
            await self.close(victim, TerminationReason.EVICTED)

    async def _start(
        self, session: Session, *, opener: bool, ready_at: float | None = None
    ) -> None:
        """Register a new session, start its task, and wait until its setup (or resume) ran.

        The task runs in the supervisor's nursery from its first step (not in
        the caller's cancel context, as ``nursery.start`` would have it): the
        supervisor's cancellation reaches its setup at once, and a caller
        giving up does not. If the caller that gives up is the session's
        ``opener`` (nobody else can have its handle yet), the session is closed;
        otherwise it goes on, and with ``ready_at`` becomes ready (idle since
        then) when its setup is done, whoever is still waiting.
        """
        nursery = self._nursery
        assert nursery is not None
        # Register before the first checkpoint, so limits see the slot taken.
        self._registry.add(session)
        self._lifecycle.created(session)
        started = trio.Event()
        nursery.start_soon(
            self._tasks.run, session, started, ready_at, name=f"mcp_sessions.session.{session.id}"
        )
        try:
            await started.wait()
        except BaseException:
            if opener and session.live:
                stopping = self._stopping or nursery.cancel_scope.cancel_called
                reason = TerminationReason.SHUTDOWN if stopping else TerminationReason.CLOSED
                self._lifecycle.terminate(session, reason)
            raise
        if not session.live:
            await self.wait_terminated(session)
            raise self._ended_during_creation(session)

    async def _adopt(self, record: SessionRecord) -> Session:
        """Bring a live stored session into this runtime (after a restart, or from elsewhere).

        Never refused by a limit: limits are about opening sessions, and this
        one is open already (the store counted it when it opened).
        """
        if not self._admitting:
            raise ShuttingDown()
        existing = self._registry.by_hash(record.handle_hash or "")
        if existing is not None and existing.live:
            return existing
        clock, now = self._clock, trio.current_time()
        session = Session(
            self,
            session_id=record.id,
            kind=SessionKind(record.kind),
            principal=record.principal,
            client=ClientInfo.from_json(record.client),
            metadata=MappingProxyType(dict(record.metadata)) if record.metadata else NO_METADATA,
            idle_timeout=record.idle_timeout,
            handle_hash=record.handle_hash,
            created_at=record.created_at,
            now=now,
            lifetime_end=clock.trio_at(record.expires_at),
            resumed=True,
        )
        # Its idle clock runs from its last activity anywhere, not from now.
        last_active = min(now, clock.trio_at(record.last_active))
        Requests.seed(session, last_active=last_active, requests=record.requests,
                      errors=record.errors)  # fmt: skip
        sync = self._sync
        assert isinstance(sync, DurableSync)
        sync.adopted(session, record)
        await self._start(session, opener=False, ready_at=last_active)
        logger.info("session %s resumed from the store", session.id,
                    extra={"session_id": session.id})  # fmt: skip
        return session

    def _ended_during_creation(self, session: Session) -> SessionError:
        if session.reason is TerminationReason.SHUTDOWN:
            return ShuttingDown()
        if session.reason is TerminationReason.ERROR:
            hook = "resume" if session.resumed else "setup"
            reason = session.reason.value
            return SessionSetupFailed(
                f"session {session.id} failed during {hook} and was closed ({reason})"
            )
        return gone(session.id, session.reason)

    def _slept(self, seconds: float) -> None:
        for session in self._registry:
            self._lifecycle.time_lost(session, seconds)

    def _on_terminating(self, session: Session) -> None:
        self._tasks.stop(session)

    def _finish(self, session: Session) -> None:
        """TERMINATING -> TERMINATED: leave a tombstone and drop out of the registry."""
        self._lifecycle.finished(session)
        self._registry.remove(session, terminated_at=self._clock.wall(), now=trio.current_time())
        session._scopes = None
        if not len(self._registry) and self._empty is not None:
            self._empty.set()
            self._empty = None


@contextlib.asynccontextmanager
async def open_supervisor(
    settings: Settings | None = None,
    *,
    hooks: Hooks | None = None,
    wall_clock: Callable[[], float] = time.time,
    store: SessionStore | None = None,
) -> AsyncIterator[Supervisor]:
    """Run a :class:`Supervisor` for the duration of the block.

    Leaving the block shuts it down gracefully (see :meth:`Supervisor.shutdown`).
    A ``store`` is opened (migrated) before the block and closed after it.
    An exception from the block comes out as itself, not wrapped in an
    exception group.
    """
    supervisor = Supervisor(settings, hooks=hooks, wall_clock=wall_clock, store=store)
    with _unwrap_single_group():
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown()


@contextlib.contextmanager
def _unwrap_single_group() -> Iterator[None]:
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__
