"""The session runtime: sessions, the supervisor that owns them, and its tasks.

Ownership
=========

::

    Supervisor.run()  (one nursery: the supervisor nursery)
       |- cleanup scanner      deadline heap -> idle_timeout / lifetime_exceeded; tombstone purge
       |- observer dispatcher  bounded queue of TransitionEvents, delivered in order
       '- one task per live session, holding that session's nursery
             '- the session's background work (Session.start_soon)

Request handlers are *not* owned by the supervisor: they run in the transport's
task, inside :meth:`Supervisor.request`, which holds the session ACTIVE and
registers a cancel scope with it so that ending the session cancels them.

The only writer of ``Session.state`` is :meth:`Supervisor._transition`, which
asks :func:`mcp_sessions._state.apply` for the new state, so every move is
checked against the one table.

Ending a session happens in two halves. :meth:`Supervisor._terminate` is
synchronous: it moves the session to TERMINATING, records the reason, and
cancels the session's requests and its nursery. The session's own task then
wakes up, runs the ``teardown`` hook shielded with a timeout, moves to
TERMINATED, leaves a tombstone and drops out of the registry. So a session
never reaches TERMINATED while its task is still alive, and teardown runs in
exactly one place, exactly once.

Time: deadlines use ``trio.current_time()`` (so ``MockClock`` drives them);
human-facing timestamps come from the injectable ``wall_clock``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import enum
import hashlib
import heapq
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple, TypeVar

import attrs
import trio

from ._errors import (
    LimitExceeded,
    SessionError,
    SessionGone,
    SessionNotFound,
    SessionSetupFailed,
    ShuttingDown,
    VersionConflict,
    gone,
)
from ._jsonmerge import merge_patch
from ._metrics import RuntimeMetrics, RuntimeStatistics, render_prometheus
from ._settings import LimitPolicy, Settings
from ._state import (
    TRANSITIONS,
    Event,
    SessionState,
    TerminationReason,
    apply,
    ready_event,
    termination_event,
)
from ._store import (
    INITIALIZING,
    LIVE,
    SessionRecord,
    SessionStore,
    StoreHealth,
    StoreUnavailable,
    Touch,
)

__all__ = [
    "ClientInfo",
    "Hooks",
    "RequestScope",
    "Session",
    "SessionKind",
    "SessionSnapshot",
    "Supervisor",
    "Tombstone",
    "TransitionEvent",
    "hash_handle",
    "open_supervisor",
]

logger = logging.getLogger("mcp_sessions")
_T = TypeVar("_T")

_S = SessionState
_LIVE_STATES = frozenset({_S.INITIALIZING, _S.ACTIVE, _S.IDLE})
_EXPIRY_REASONS = frozenset({TerminationReason.IDLE_TIMEOUT, TerminationReason.LIFETIME_EXCEEDED})

# The cancel scope of the request running in the current task, so that a
# request which closes its own session (``session_close``) is not cancelled by
# that close.
_current_request: contextvars.ContextVar[trio.CancelScope | None] = contextvars.ContextVar(
    "mcp_sessions_current_request", default=None
)


class SessionKind(enum.Enum):
    """How a session came to be."""

    #: Handshake era: one per connection, from open to EOF.
    CONNECTION = "connection"
    #: Any era: opened explicitly, referenced by a secret handle.
    HANDLE = "handle"


@attrs.frozen
class ClientInfo:
    """What the client said about itself."""

    name: str | None = None
    version: str | None = None
    protocol_version: str | None = None
    capabilities: Mapping[str, Any] = attrs.field(factory=dict, converter=MappingProxyType)


_NO_CLIENT = ClientInfo()
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def hash_handle(handle: str) -> str:
    """The SHA-256 hex digest under which a handle is stored. Handles never are."""
    return hashlib.sha256(handle.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen(kw_only=True)
class SessionSnapshot:
    """A session at one moment. Wall-clock times are seconds since the epoch."""

    #: Public, non-secret id: fine for logs, metrics and listings.
    id: str
    kind: SessionKind
    principal: str
    state: SessionState
    #: Why it ended; ``None`` while live.
    reason: TerminationReason | None
    client: ClientInfo
    metadata: Mapping[str, Any]
    created_at: float
    last_active: float
    idle_timeout: float
    #: When the absolute lifetime runs out.
    expires_at: float
    #: When it idles out if nothing happens (``None`` unless IDLE).
    idle_expires_at: float | None
    requests: int
    errors: int
    in_flight: int
    background_tasks: int
    #: Version of the state document; starts at 0, +1 per patch.
    version: int


class Tombstone(NamedTuple):
    """What is remembered of a terminated session until retention runs out.

    A named tuple rather than an attrs class: one is made for every session
    that ends, so it should cost as little as a tuple.
    """

    id: str
    kind: SessionKind
    principal: str
    reason: TerminationReason | None
    terminated_at: float
    handle_hash: str | None = None

    @property
    def state(self) -> SessionState:
        return _S.TERMINATED


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


SetupHook = Callable[["Session"], Awaitable[None]]
TeardownHook = Callable[["Session", TerminationReason], Awaitable[None]]
Observer = Callable[[TransitionEvent], Awaitable[None]]


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


class Session:
    """One session. Read it through :meth:`snapshot`; change it through the supervisor.

    ``__slots__`` keeps a live session small: the runtime holds tens of
    thousands of them.
    """

    __slots__ = (
        "_background",
        "_deadline_at",
        "_deadline_seq",
        "_doc",
        "_done",
        "_end_persisted",
        "_flushed_errors",
        "_flushed_requests",
        "_in_flight",
        "_nursery",
        "_parked",
        "_ready",
        "_requests_scopes",
        "_resumed",
        "_stored",
        "_supervisor",
        "_torn_down",
        "_version",
        "client",
        "created_at",
        "deadline",
        "errors",
        "handle_hash",
        "id",
        "idle_since",
        "idle_timeout",
        "kind",
        "last_active_time",
        "metadata",
        "principal",
        "reason",
        "requests",
        "state",
    )

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        session_id: str,
        kind: SessionKind,
        principal: str,
        client: ClientInfo,
        metadata: Mapping[str, Any],
        idle_timeout: float,
        handle_hash: str | None,
        now: float,
        wall: float,
        lifetime: float,
    ) -> None:
        self._supervisor = supervisor
        self.id = session_id
        self.kind = kind
        self.principal = principal
        self.client = client
        self.metadata = metadata
        self.idle_timeout = idle_timeout
        self.handle_hash = handle_hash
        self.state = _S.INITIALIZING
        self.reason: TerminationReason | None = None
        self.created_at = wall
        self.last_active_time = now
        self.idle_since = now
        self.deadline = now + lifetime
        self.requests = 0
        self.errors = 0
        self._in_flight = 0
        self._doc: dict[str, Any] | None = None
        self._version = 0
        self._nursery: trio.Nursery | None = None
        self._parked: trio.lowlevel.Task | None = None
        self._ready: trio.Event | None = None  # set on leaving INITIALIZING, if anyone waits
        self._background = 0  # background tasks running in the nursery
        self._requests_scopes: set[trio.CancelScope] | None = None
        self._deadline_seq = -1
        self._deadline_at = math.inf
        self._done: trio.Event | None = None
        self._torn_down = False
        self._resumed = False  # brought back from the store rather than created here
        self._stored = False  # the store has a record of it
        self._end_persisted = False  # the store already knows it ended
        self._flushed_requests = 0  # counters as last written to the store
        self._flushed_errors = 0

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.kind.value} {self.state.value}>"

    # -- reading ---------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while the session accepts requests (not TERMINATING or TERMINATED)."""
        return self.state in _LIVE_STATES

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def version(self) -> int:
        return self._version

    def state_document(self) -> dict[str, Any]:
        """A copy of the session's JSON state document."""
        return copy.deepcopy(self._doc) if self._doc else {}

    def snapshot(self) -> SessionSnapshot:
        sup = self._supervisor
        idle_expires = None
        if self.state is _S.IDLE:
            idle_expires = sup._wall_at(min(self.idle_since + self.idle_timeout, self.deadline))
        return SessionSnapshot(
            id=self.id,
            kind=self.kind,
            principal=self.principal,
            state=self.state,
            reason=self.reason,
            client=self.client,
            metadata=self.metadata,
            created_at=self.created_at,
            last_active=sup._wall_at(self.last_active_time),
            idle_timeout=self.idle_timeout,
            expires_at=sup._wall_at(self.deadline),
            idle_expires_at=idle_expires,
            requests=self.requests,
            errors=self.errors,
            in_flight=self._in_flight,
            background_tasks=self._background,
            version=self._version,
        )

    # -- changing --------------------------------------------------------

    async def patch_state(self, patch: Mapping[str, Any], *, if_version: int | None = None) -> int:
        """Apply an RFC 7386 JSON Merge Patch to the state document; return the new version.

        With ``if_version``, the patch applies only if the document is still at
        that version; otherwise :class:`VersionConflict`. With a store, the
        patch is committed there (serialised against every other process)
        before this returns.
        """
        return await self._supervisor.patch_state(self, patch, if_version=if_version)

    def _patch_local(self, patch: Mapping[str, Any], if_version: int | None) -> int:
        self._check_live()
        if if_version is not None and if_version != self._version:
            raise VersionConflict(if_version, self._version)
        self._doc = merge_patch(self._doc or {}, dict(patch))
        self._version += 1
        return self._version

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Run ``fn(*args)`` as background work owned by this session.

        It is cancelled when the session ends. If it raises, the error is
        logged and counted and the session ends with reason ``error``; nothing
        else is affected.
        """
        self._check_live()
        assert self._nursery is not None
        self._background += 1
        self._nursery.start_soon(
            self._supervisor._guard_background, self, fn, args, name=name or _task_name(fn)
        )

    def _check_live(self) -> None:
        if self.state not in _LIVE_STATES:
            raise gone(self.id, self.reason)


def _task_name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


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

    __slots__ = ("_failed", "_scope", "_start", "_supervisor", "_token", "session")

    def __init__(self, supervisor: Supervisor, session: Session) -> None:
        self._supervisor = supervisor
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
        self._supervisor._begin_request(self.session, self._scope)
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
            self._supervisor._end_request(self.session, self._scope, self._start, failed=failed)
        if self._scope.cancelled_caught:
            # Our scope caught the cancellation: the session ended under us.
            raise gone(self.session.id, self.session.reason) from None
        return False


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
        self.settings = settings or Settings()
        self._store = store
        # With a store: sessions with activity not yet written (an ordered set),
        # sessions due for expiry that the store must confirm, and the store's
        # last error (for health).
        self._dirty: dict[Session, None] = {}
        self._expiring: list[Session] = []
        self._expiring_wake: trio.Event | None = None
        self._unready: dict[Session, None] = {}  # "ready" not yet written
        self._store_error: str | None = None
        # With a durable (so possibly shared) store, idle expiry waits this much
        # longer than idle_timeout: use in another process may not be written
        # yet (see _store_due).
        shared = store is not None and store.durable
        self._idle_grace = self.settings.touch_interval if shared else 0.0
        self.hooks = hooks or Hooks()
        self._wall_clock = wall_clock
        self._metrics = RuntimeMetrics()
        self._sessions: dict[str, Session] = {}
        self._by_hash: dict[str, Session] = {}
        self._per_principal: dict[str, int] = {}
        # IDLE sessions in the order they became idle (oldest first), for eviction.
        # Kept only under LimitPolicy.EVICT_IDLE: nothing else needs them.
        self._evicting = self.settings.limit_policy is LimitPolicy.EVICT_IDLE
        self._idle_order: dict[Session, None] = {}
        self._idle_by_principal: dict[str, dict[Session, None]] = {}
        # Deadlines, bucketed by scanner tick: bucket k holds the entries
        # (deadline, seq, session) with (k - 1) * w < deadline <= k * w, where w is
        # the cleanup interval, and the scanner ticks on the grid of multiples of
        # w. A tick at time t opens exactly the buckets with k * w <= t, every
        # entry of which is due, so a session ends at the first tick at or after
        # its deadline (within one interval) and a tick costs O(entries due). A
        # small heap of bucket numbers finds the earliest. A session's current
        # entry carries its _deadline_seq; older ones are stale and skipped.
        self._buckets: dict[int, list[tuple[float, int, Session]]] = {}
        self._bucket_keys: list[int] = []
        self._bucket_width = self.settings.cleanup_interval
        self._deferred: list[tuple[float, int, Session]] | None = None
        self._seq = 0
        self._tombstones: dict[str, Tombstone] = {}
        self._tombstones_by_hash: dict[str, Tombstone] = {}
        self._tombstone_fifo: deque[tuple[float, str]] = deque()
        self._in_flight = 0
        self._nursery: trio.Nursery | None = None
        self._admitting = False
        self._stopping = False
        self._started_time = 0.0
        self._started_wall = 0.0
        self._quiet: trio.Event | None = None  # set when no request is in flight
        self._empty: trio.Event | None = None  # set when the registry is empty
        self._stopped = trio.Event()
        self._observer_send: trio.MemorySendChannel[TransitionEvent] | None = None
        self._observer_receive: trio.MemoryReceiveChannel[TransitionEvent] | None = None
        self._dispatcher_done: trio.Event | None = None
        self._last_cleanup: float | None = None

    # ------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the supervisor until :meth:`shutdown` finishes (or this task is cancelled)."""
        if self._nursery is not None:
            raise RuntimeError("this supervisor is already running")
        self._started_time = trio.current_time()
        self._started_wall = self._wall_clock()
        store = self._store
        if store is not None:
            await store.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._scanner, name="mcp_sessions.scanner")
                if store is not None:
                    nursery.start_soon(self._flusher, name="mcp_sessions.store.flusher")
                    nursery.start_soon(self._reconciler, name="mcp_sessions.store.reconciler")
                    nursery.start_soon(self._sweeper, name="mcp_sessions.store.sweeper")
                if self.hooks.observers:
                    send, receive = trio.open_memory_channel[TransitionEvent](
                        self.settings.observer_queue_size
                    )
                    self._observer_send, self._observer_receive = send, receive
                    self._dispatcher_done = trio.Event()
                    nursery.start_soon(self._dispatcher, name="mcp_sessions.observers")
                self._admitting = True
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            # Cancelled from outside without a shutdown: sessions still end with
            # "shutdown" and run their teardown (each session task does that in
            # its own finally, shielded), so nothing is left half-done.
            self._admitting = False
            self._stopping = True
            if store is not None:
                with trio.CancelScope(shield=True):
                    await store.aclose()
            self._stopped.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully and return when everything has stopped.

        Stops admitting sessions and requests, lets in-flight requests finish
        for up to ``grace`` seconds (default ``settings.shutdown_grace``), then
        ends every session with ``shutdown`` (cancelling what still runs),
        waits for their teardowns, delivers the remaining observer events and
        stops the supervisor's own tasks. Safe to call more than once.
        """
        if self._nursery is None:
            raise RuntimeError("this supervisor is not running")
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._admitting = False
        grace = self.settings.shutdown_grace if grace is None else grace
        logger.info("shutting down: %d live sessions, %d requests in flight",
                    len(self._sessions), self._in_flight)  # fmt: skip
        with trio.move_on_after(grace):
            while self._in_flight:
                self._quiet = self._quiet or trio.Event()
                await self._quiet.wait()
        for session in list(self._sessions.values()):
            self._terminate(session, TerminationReason.SHUTDOWN)
        while self._sessions:
            self._empty = self._empty or trio.Event()
            await self._empty.wait()
        if self._store is not None and self._dirty:
            with trio.move_on_after(self.settings.teardown_timeout):
                await self._flush_touches()
        if self._observer_send is not None and self._dispatcher_done is not None:
            await self._observer_send.aclose()
            with trio.move_on_after(self.settings.teardown_timeout):
                await self._dispatcher_done.wait()
        self._nursery.cancel_scope.cancel()
        await self._stopped.wait()

    # ------------------------------------------------------------------
    # Sessions
    # ------------------------------------------------------------------

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
        ``LimitPolicy.EVICT_IDLE``), :class:`ShuttingDown` while stopping, and
        :class:`SessionSetupFailed` if ``setup`` failed (the session has then
        ended with ``error``).
        """
        await self._admit(principal)
        now = trio.current_time()
        session = Session(
            self,
            session_id=_new_session_id(),
            kind=kind,
            principal=principal,
            client=client or _NO_CLIENT,
            metadata=MappingProxyType(dict(metadata)) if metadata else _NO_METADATA,
            idle_timeout=self.settings.idle_timeout if idle_timeout is None else idle_timeout,
            handle_hash=hash_handle(handle) if handle is not None else None,
            now=now,
            wall=self._wall_clock(),
            lifetime=self.settings.max_lifetime,
        )
        await self._start_session(session)
        if self._store is not None:
            # Acknowledge only what is committed: a session the store could not
            # record is ended here and the caller gets StoreUnavailable.
            try:
                await self._store_call(self._store.create(self._record_for(session, ready)))
            except BaseException:
                session._end_persisted = True
                self._terminate(session, TerminationReason.ERROR)
                with trio.CancelScope(shield=True):
                    await self.wait_terminated(session)
                raise
            session._stored = True
            if not session.live:
                # Ended while the store recorded it (a shutdown, say). Its handle
                # was never handed out: end the record too, best effort.
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        await self._store.terminate(
                            session.id, session.reason or TerminationReason.ERROR,
                            self._wall_clock(),
                        )  # fmt: skip
                    session._end_persisted = True
                    await self.wait_terminated(session)
                raise self._ended_during_creation(session)
        if ready:
            self._ready_local(session)
        else:
            self._schedule_deadline(session)
        return session

    async def _start_session(self, session: Session) -> None:
        """Register a new session and start its task (running setup or resume)."""
        nursery = self._nursery
        assert nursery is not None
        # Register before the first checkpoint, so limits see the slot taken.
        self._sessions[session.id] = session
        if session.handle_hash is not None:
            self._by_hash[session.handle_hash] = session
        self._per_principal[session.principal] = self._per_principal.get(session.principal, 0) + 1
        self._metrics.live[_S.INITIALIZING] += 1
        RuntimeMetrics.bump(self._metrics.created, session.kind.value)
        self._emit(session, None, None)
        await nursery.start(self._session_task, session, name=f"mcp_sessions.session.{session.id}")
        if session.state is _S.TERMINATING or session.state is _S.TERMINATED:
            await self.wait_terminated(session)
            raise self._ended_during_creation(session)

    def _ended_during_creation(self, session: Session) -> SessionError:
        if session.reason is TerminationReason.SHUTDOWN:
            return ShuttingDown()
        if session.reason is TerminationReason.ERROR:
            hook = "resume" if session._resumed else "setup"
            return SessionSetupFailed(
                f"session {session.id} failed during {hook} and was closed ({_reason(session)})"
            )
        return gone(session.id, session.reason)

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
        self._ready_local(session)
        if self._store is not None and session._stored and self._nursery is not None:
            self._nursery.start_soon(self._persist_ready, session)

    async def _persist_ready(self, session: Session) -> None:
        assert self._store is not None
        try:
            await self._store_call(self._store.mark_ready(session.id, self._wall_clock()))
        except Exception as exc:
            logger.warning("could not record session %s as ready (will retry): %s", session.id,
                           exc, extra={"session_id": session.id})  # fmt: skip
            self._unready[session] = None
        else:
            self._unready.pop(session, None)

    def _ready_local(self, session: Session, idle_since: float | None = None) -> None:
        session._check_live()
        self._transition(session, ready_event(session._in_flight))
        if session.state is _S.IDLE:
            self._enter_idle(session, trio.current_time() if idle_since is None else idle_since)
        else:
            self._schedule_deadline(session)

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
        store = self._store
        if store is not None and session.live and session._stored and not session._end_persisted:
            touch = self._take_touch(session)
            try:
                ended = await self._store_call(
                    store.terminate(session.id, reason, self._wall_clock(), touch)
                )
            except Exception:
                self._give_back(session, touch)
                if reason is TerminationReason.CLOSED:
                    raise
                logger.warning("store unavailable; ending session %s locally only", session.id,
                               extra={"session_id": session.id})  # fmt: skip
            else:
                session._end_persisted = True
                if ended is not None and ended is not reason and session.live:
                    # It had already ended elsewhere: that end stands.
                    self._end_from_store(session, ended)
        if session.live:
            self._terminate(session, reason)
        await self.wait_terminated(session)

    def terminate(self, session: Session, reason: TerminationReason) -> bool:
        """Start ending a session without waiting; False if it was already ending."""
        return self._terminate(session, reason)

    async def wait_terminated(self, session: Session) -> None:
        """Wait until the session is TERMINATED."""
        if session.state is _S.TERMINATED:
            return
        session._done = session._done or trio.Event()
        await session._done.wait()

    def request(self, session: Session) -> RequestScope:
        """``async with supervisor.request(session):`` around one request.

        See :class:`RequestScope`.
        """
        return RequestScope(self, session)

    # -- lookup ---------------------------------------------------------

    def get(self, session_id: str) -> Session:
        """The live session with this public id.

        Raises :class:`SessionExpired`/:class:`SessionClosed` for a remembered
        ended one and :class:`SessionNotFound` otherwise.
        """
        session = self._sessions.get(session_id)
        if session is not None and session.live:
            return session
        if session is not None:
            raise gone(session.id, session.reason)
        tomb = self._tombstones.get(session_id)
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
        one whose deadline passed meanwhile is expired.
        """
        digest = hash_handle(handle)
        store = self._store
        if store is None:
            return self._resolve_local(digest, principal)
        local = self._by_hash.get(digest)
        if local is not None and local.live and local in self._dirty:
            await self._flush_one(local)  # so the store's idle check sees our latest use
        record = await self._store_call(store.load_by_hash(digest))
        if record is None or record.principal != principal or record.kind != "handle":
            return self._resolve_local(digest, principal)
        if record.live:
            due, cutoff = self._store_due(record)
            if due is not None:
                await self._store_call(store.expire(record.id, cutoff))
                record = await self._store_call(store.load(record.id)) or record
        local = self._by_hash.get(digest)  # may have changed while we awaited
        if not record.live:
            reason = record.termination_reason
            if local is not None and local.live:
                local._end_persisted = True
                self._end_from_store(local, reason)
            self._bump_validation("gone")
            raise gone(record.id, reason)
        if local is not None and not local.live:
            # Ending here, and the store does not know yet: that end stands.
            self._bump_validation("gone")
            raise gone(local.id, local.reason)
        tomb = self._tombstones_by_hash.get(digest)
        if local is None and tomb is not None and tomb.reason is not TerminationReason.SHUTDOWN:
            # It ended here while the store could not be told; tell it now.
            reason = tomb.reason or TerminationReason.CLOSED
            ended = await self._store_call(store.terminate(tomb.id, reason, self._wall_clock()))
            self._bump_validation("gone")
            raise gone(tomb.id, ended or reason)
        if local is None:
            local = await self._adopt(record)
        else:
            self._refresh_from_record(local, record)
        if local.state is _S.INITIALIZING:
            await self._wait_ready(local)  # another call is bringing it in: let it finish
        if not local.live:
            self._bump_validation("gone")
            raise gone(local.id, local.reason)
        self._bump_validation("ok")
        return local

    def _store_due(self, record: SessionRecord) -> tuple[TerminationReason | None, float]:
        """Whether a stored session is due, and the cutoff to ask the store to expire it at.

        Idle expiry allows ``touch_interval`` of grace: another process may have
        used the session within its last touch interval without writing it yet.
        """
        now = self._wall_clock()
        due = record.due(now)
        if due is TerminationReason.IDLE_TIMEOUT:
            cutoff = now - self._idle_grace
            return record.due(cutoff), cutoff
        return due, now

    def _end_from_store(self, session: Session, reason: TerminationReason | None) -> None:
        """End a local session the store says has ended, whatever state it is in here."""
        reason = reason or TerminationReason.CLOSED
        if termination_event(reason) not in TRANSITIONS[session.state]:
            reason = TerminationReason.CLOSED  # e.g. idle_timeout while still INITIALIZING
        if self._terminate(session, reason) and reason in _EXPIRY_REASONS:
            self._metrics.expired += 1

    async def _wait_ready(self, session: Session) -> None:
        while session.state is _S.INITIALIZING:
            session._ready = session._ready or trio.Event()
            await session._ready.wait()

    def _resolve_local(self, digest: str, principal: str) -> Session:
        session = self._by_hash.get(digest)
        if session is not None and session.principal == principal:
            if session.live:
                self._bump_validation("ok")
                return session
            self._bump_validation("gone")
            raise gone(session.id, session.reason)
        tomb = self._tombstones_by_hash.get(digest)
        if session is None and tomb is not None and tomb.principal == principal:
            self._bump_validation("gone")
            raise gone(tomb.id, tomb.reason)
        self._bump_validation("not_found")
        raise SessionNotFound()

    def _bump_validation(self, outcome: str) -> None:
        RuntimeMetrics.bump(self._metrics.handle_validations, outcome)

    async def _adopt(self, record: SessionRecord) -> Session:
        """Bring a live stored session into this runtime (after a restart, or from elsewhere)."""
        await self._admit(record.principal)
        existing = self._by_hash.get(record.handle_hash or "")
        if existing is not None and existing.live:
            return existing
        now, now_wall = trio.current_time(), self._wall_clock()
        client = record.client
        session = Session(
            self,
            session_id=record.id,
            kind=SessionKind(record.kind),
            principal=record.principal,
            client=ClientInfo(
                name=_str_or_none(client.get("name")),
                version=_str_or_none(client.get("version")),
                protocol_version=_str_or_none(client.get("protocol_version")),
                capabilities=dict(client.get("capabilities") or {}),
            ),
            metadata=MappingProxyType(dict(record.metadata)) if record.metadata else _NO_METADATA,
            idle_timeout=record.idle_timeout,
            handle_hash=record.handle_hash,
            now=now,
            wall=record.created_at,
            lifetime=record.expires_at - now_wall,
        )
        session.last_active_time = now - max(0.0, now_wall - record.last_active)
        session._resumed = session._stored = True
        self._refresh_from_record(session, record)
        await self._start_session(session)
        # Its idle clock runs from its last activity anywhere, not from now.
        self._ready_local(session, idle_since=session.last_active_time)
        logger.info("session %s resumed from the store", session.id,
                    extra={"session_id": session.id})  # fmt: skip
        return session

    def _refresh_from_record(self, session: Session, record: SessionRecord) -> None:
        """Take in what other processes did: state document, activity, counters."""
        if record.version > session._version:  # never backwards: ours may be newer
            session._doc = dict(record.doc)
            session._version = record.version
        now, now_wall = trio.current_time(), self._wall_clock()
        stored_active = now - max(0.0, now_wall - record.last_active)
        if stored_active > session.last_active_time:
            session.last_active_time = stored_active
            if session.state is _S.IDLE:
                session.idle_since = max(session.idle_since, stored_active)
        if session._resumed and session._in_flight == 0 and session.requests == 0:
            # Brought in just now: start from the stored counters.
            session.requests = session._flushed_requests = record.requests
            session.errors = session._flushed_errors = record.errors

    async def patch_state(
        self, session: Session, patch: Mapping[str, Any], *, if_version: int | None = None
    ) -> int:
        """Apply a merge patch to ``session``'s state; see :meth:`Session.patch_state`."""
        session._check_live()
        store = self._store
        if store is None or not session._stored:
            return session._patch_local(patch, if_version)
        try:
            version, doc = await self._store_call(
                store.patch_state(session.id, patch, if_version=if_version, at=self._wall_clock())
            )
        except SessionGone as exc:
            if session.live:
                session._end_persisted = True
                self._terminate(session, exc.reason or TerminationReason.CLOSED)
            raise
        if version > session._version:
            session._doc, session._version = doc, version
        return version

    async def list_records(self, principal: str) -> list[SessionRecord]:
        """The principal's live sessions as records: from the store when there is one
        (every process's sessions), else this runtime's."""
        if self._store is not None:
            return await self._store_call(self._store.list_by_principal(principal))
        return [
            self._record_for(s, s.state is not _S.INITIALIZING)
            for s in self._sessions.values()
            if s.principal == principal and s.live
        ]

    async def store_health(self) -> StoreHealth | None:
        """The store's health now (``None`` without a store). Never raises."""
        if self._store is None:
            return None
        health = await self._store.health()
        self._store_error = None if health.ok else health.error
        return health

    @property
    def store(self) -> SessionStore | None:
        return self._store

    @property
    def store_error(self) -> str | None:
        """The last store failure this runtime saw, until a store call succeeds again."""
        return self._store_error

    async def _store_call(self, op: Awaitable[_T]) -> _T:
        try:
            result = await op
        except StoreUnavailable as exc:
            self._store_error = str(exc)
            raise
        self._store_error = None
        return result

    def _record_for(self, session: Session, ready: bool) -> SessionRecord:
        client = session.client
        return SessionRecord(
            id=session.id,
            handle_hash=session.handle_hash,
            kind=session.kind.value,
            principal=session.principal,
            client={
                "name": client.name,
                "version": client.version,
                "protocol_version": client.protocol_version,
                "capabilities": dict(client.capabilities),
            },
            metadata=dict(session.metadata),
            state=LIVE if ready else INITIALIZING,
            doc=dict(session._doc or {}),
            version=session._version,
            created_at=session.created_at,
            last_active=self._wall_at(session.last_active_time),
            idle_timeout=session.idle_timeout,
            expires_at=self._wall_at(session.deadline),
            requests=session.requests,
            errors=session.errors,
        )

    def _take_touch(self, session: Session) -> Touch:
        """The session's unwritten activity, counted as written from now on.

        Taking it moves the baseline at once, so two writers in flight (the
        flusher and a close, say) never send the same increments twice; a
        writer that fails gives its touch back with :meth:`_give_back`.
        """
        self._dirty.pop(session, None)
        active = session._in_flight > 0
        last = trio.current_time() if active else session.last_active_time
        touch = Touch(
            session.id,
            self._wall_at(last),
            session.requests - session._flushed_requests,
            session.errors - session._flushed_errors,
        )
        session._flushed_requests = session.requests
        session._flushed_errors = session.errors
        return touch

    def _give_back(self, session: Session, touch: Touch) -> None:
        """A touch that could not be written: count it as unwritten again."""
        session._flushed_requests -= touch.requests
        session._flushed_errors -= touch.errors
        if session.live:
            self._dirty[session] = None

    def sessions(self, principal: str | None = None) -> list[SessionSnapshot]:
        """Snapshots of the live sessions (of one principal, if given), oldest first."""
        return [
            s.snapshot()
            for s in self._sessions.values()
            if principal is None or s.principal == principal
        ]

    def tombstone(self, session_id: str) -> Tombstone | None:
        return self._tombstones.get(session_id)

    @property
    def live_count(self) -> int:
        return len(self._sessions)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def admitting(self) -> bool:
        return self._admitting

    # -- metrics ----------------------------------------------------------

    def statistics(self) -> RuntimeStatistics:
        """A consistent, frozen snapshot of the runtime's metrics."""
        uptime = trio.current_time() - self._started_time if self._nursery is not None else 0.0
        return RuntimeStatistics.from_cells(
            self._metrics, tombstones=len(self._tombstones), uptime=uptime
        )

    def render_prometheus(self) -> str:
        """Prometheus text exposition of :meth:`statistics`."""
        return render_prometheus(self.statistics())

    @property
    def last_cleanup(self) -> float | None:
        """Wall-clock time of the last scanner tick."""
        return self._last_cleanup

    # ------------------------------------------------------------------
    # Internals: the state machine's one writer
    # ------------------------------------------------------------------

    def _transition(
        self, session: Session, event: Event, reason: TerminationReason | None = None
    ) -> None:
        previous = session.state
        new = apply(previous, event)  # raises InvalidTransition, state unchanged
        session.state = new
        live = self._metrics.live
        live[previous] -= 1
        if new is not _S.TERMINATED:
            live[new] += 1
        if previous is _S.IDLE and self._evicting:
            self._leave_idle(session)
        elif previous is _S.INITIALIZING and session._ready is not None:
            session._ready.set()
        if self._observer_send is not None:
            self._emit(session, previous, event, reason)

    def _emit(
        self,
        session: Session,
        previous: SessionState | None,
        event: Event | None,
        reason: TerminationReason | None = None,
    ) -> None:
        send = self._observer_send
        if send is None:
            return
        try:
            send.send_nowait(
                TransitionEvent(
                    session_id=session.id,
                    kind=session.kind,
                    principal=session.principal,
                    previous=previous,
                    state=session.state,
                    event=event,
                    reason=reason if reason is not None else session.reason,
                    at=self._wall_clock(),
                )
            )
        except trio.WouldBlock:
            self._metrics.observer_dropped += 1
        except trio.ClosedResourceError:
            pass

    def _terminate(self, session: Session, reason: TerminationReason) -> bool:
        if session.state not in _LIVE_STATES:
            return False
        event = termination_event(reason)
        session.reason = reason
        try:
            self._transition(session, event, reason)
        except BaseException:
            session.reason = None
            raise
        level = logging.WARNING if reason is TerminationReason.ERROR else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(level, "session %s terminating: %s", session.id, reason.value,
                       extra={"session_id": session.id})  # fmt: skip
        if session._requests_scopes:
            current = _current_request.get()
            for scope in session._requests_scopes:
                if scope is not current:
                    scope.cancel()
        parked = session._parked
        if parked is not None:
            # The usual case: the session task is parked with nothing to cancel
            # but its own wait. Waking it is far cheaper than a cancellation.
            session._parked = None
            trio.lowlevel.reschedule(parked)
        nursery = session._nursery
        if nursery is not None and (parked is None or session._background):
            nursery.cancel_scope.cancel()
        return True

    def _enter_idle(self, session: Session, now: float) -> None:
        session.idle_since = now
        if self._evicting:
            self._index_idle(session)
        self._schedule_deadline(session)

    def _index_idle(self, session: Session) -> None:
        """Remember the order sessions became idle in, for eviction (oldest first)."""
        self._idle_order[session] = None
        per = self._idle_by_principal.get(session.principal)
        if per is None:
            per = self._idle_by_principal[session.principal] = {}
        per[session] = None

    def _leave_idle(self, session: Session) -> None:
        self._idle_order.pop(session, None)
        per = self._idle_by_principal.get(session.principal)
        if per is not None:
            per.pop(session, None)
            if not per:
                del self._idle_by_principal[session.principal]

    # -- deadlines ----------------------------------------------------------

    def _effective_deadline(self, session: Session) -> float:
        if session.state is _S.IDLE:
            idle_end = session.idle_since + session.idle_timeout + self._idle_grace
            return min(idle_end, session.deadline)
        return session.deadline

    def _schedule_deadline(self, session: Session) -> None:
        """Make sure an entry no later than the session's deadline is scheduled.

        Each session keeps one current entry (its ``_deadline_seq``); an entry
        that is earlier than needed is re-scheduled lazily when it comes due, so
        busy sessions do not add an entry per request.
        """
        deadline = self._effective_deadline(session)
        if session._deadline_seq >= 0 and session._deadline_at <= deadline:
            return
        self._seq += 1
        session._deadline_seq = self._seq
        session._deadline_at = deadline
        self._push_deadline((deadline, self._seq, session))

    def _push_deadline(self, entry: tuple[float, int, Session]) -> None:
        if self._deferred is not None:  # a scan is running: it adds these when done
            self._deferred.append(entry)
            return
        key = math.ceil(entry[0] / self._bucket_width)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [entry]
            heapq.heappush(self._bucket_keys, key)
        else:
            bucket.append(entry)

    @property
    def scheduled_deadlines(self) -> int:
        """Entries in the deadline schedule, stale ones included (for tests and tuning)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    # ------------------------------------------------------------------
    # Internals: admission, requests
    # ------------------------------------------------------------------

    async def _admit(self, principal: str) -> None:
        settings = self.settings
        while True:
            if not self._admitting:
                raise ShuttingDown()
            if len(self._sessions) >= settings.max_sessions:
                scope, limit = "global", settings.max_sessions
                candidates: Mapping[Session, None] | None = self._idle_order
            elif self._per_principal.get(principal, 0) >= settings.max_sessions_per_principal:
                scope, limit = f"principal {principal!r}", settings.max_sessions_per_principal
                candidates = self._idle_by_principal.get(principal)
            else:
                return
            if settings.limit_policy is LimitPolicy.EVICT_IDLE and candidates:
                victim = next(iter(candidates))
                logger.info("evicting longest-idle session %s to admit a new one", victim.id,
                            extra={"session_id": victim.id})  # fmt: skip
                await self.close(victim, TerminationReason.EVICTED)
                continue
            if settings.limit_policy is LimitPolicy.EVICT_IDLE:
                detail = "and no session in that scope is idle to evict"
            else:
                detail = "close a session first"
            raise LimitExceeded(
                f"session limit reached for {scope}: {limit} live sessions; {detail}",
                limit=limit,
                scope=scope,
            )

    def _begin_request(self, session: Session, scope: trio.CancelScope) -> None:
        if session.state not in _LIVE_STATES:
            raise gone(session.id, session.reason)
        if self._stopping:
            raise ShuttingDown()
        session._in_flight += 1
        self._in_flight += 1
        session.last_active_time = trio.current_time()
        if session._in_flight == 1 and session.state is _S.IDLE:
            self._transition(session, Event.REQUEST_STARTED)
        scopes = session._requests_scopes
        if scopes is None:
            scopes = session._requests_scopes = set()
        scopes.add(scope)
        if self._store is not None and session._stored:
            self._dirty[session] = None  # written at the next touch, however long it runs

    def _end_request(
        self, session: Session, scope: trio.CancelScope, started: float, *, failed: bool
    ) -> None:
        now = trio.current_time()
        if session._requests_scopes is not None:
            session._requests_scopes.discard(scope)
        session._in_flight -= 1
        self._in_flight -= 1
        session.last_active_time = now
        session.requests += 1
        metrics = self._metrics
        metrics.requests += 1
        metrics.request_duration.observe(now - started)
        if failed:
            session.errors += 1
            metrics.request_errors += 1
        if self._store is not None and session._stored:
            self._dirty[session] = None
        if session._in_flight == 0 and session.state is _S.ACTIVE:
            self._transition(session, Event.LAST_REQUEST_FINISHED)
            self._enter_idle(session, now)
        if self._in_flight == 0 and self._quiet is not None:
            self._quiet.set()
            self._quiet = None

    # ------------------------------------------------------------------
    # Internals: the supervisor's tasks
    # ------------------------------------------------------------------

    async def _session_task(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the session's nursery from creation until it is TERMINATED."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                session._nursery = nursery
                hook = self.hooks.resume if session._resumed else self.hooks.setup
                if session.state is not _S.INITIALIZING:  # ended before we ran
                    nursery.cancel_scope.cancel()
                elif hook is not None:
                    await self._run_setup(session, hook, "resume" if session._resumed else "setup")
                started = True
                task_status.started()
                if session.state in _LIVE_STATES:
                    await _park(session)
                if session._background:
                    nursery.cancel_scope.cancel()
        finally:
            if not started:
                # Ended (or cancelled) while its setup ran: the creator still hears
                # back, and sees the session ending.
                task_status.started()
            if session.state in _LIVE_STATES:
                # Cancelled from outside (the supervisor itself is being
                # cancelled) rather than terminated: end it as a shutdown.
                self._terminate(session, TerminationReason.SHUTDOWN)
            if self._store is not None and session._stored and not session._end_persisted:
                with trio.CancelScope(shield=True):
                    await self._persist_end(session)
            if self.hooks.teardown is not None:
                with trio.CancelScope(shield=True):
                    await self._teardown(session)
            self._finish(session)

    async def _run_setup(self, session: Session, hook: SetupHook, name: str) -> None:
        with trio.move_on_after(self.settings.setup_timeout) as timeout:
            try:
                await hook(session)
            except Exception:
                logger.exception("%s hook failed for session %s", name, session.id,
                                 extra={"session_id": session.id})  # fmt: skip
                RuntimeMetrics.bump(self._metrics.hook_errors, name)
                self._terminate(session, TerminationReason.ERROR)
                return
        if timeout.cancelled_caught and session.state is _S.INITIALIZING:
            logger.error("%s hook timed out after %ss for session %s", name,
                         self.settings.setup_timeout, session.id,
                         extra={"session_id": session.id})  # fmt: skip
            RuntimeMetrics.bump(self._metrics.hook_errors, name)
            self._terminate(session, TerminationReason.ERROR)

    async def _persist_end(self, session: Session) -> None:
        """Write a session's end to the store (from its own task, as it finishes).

        A handle session ended by ``shutdown`` is *kept* in a durable store,
        so it resumes after a restart: only its last activity is written.
        """
        store = self._store
        assert store is not None
        reason = session.reason or TerminationReason.ERROR
        touch = self._take_touch(session)
        with trio.move_on_after(self.settings.teardown_timeout):
            try:
                if (
                    reason is TerminationReason.SHUTDOWN
                    and session.kind is SessionKind.HANDLE
                    and store.durable
                ):
                    await self._store_call(store.touch([touch]))
                else:
                    await self._store_call(
                        store.terminate(session.id, reason, self._wall_clock(), touch)
                    )
                session._end_persisted = True
            except Exception as exc:  # never keep the session from finishing
                logger.warning("could not record the end of session %s: %s", session.id, exc,
                               extra={"session_id": session.id})  # fmt: skip

    async def _teardown(self, session: Session) -> None:
        """Run the ``teardown`` hook, shielded and timed; failures are logged and counted."""
        teardown = self.hooks.teardown
        reason = session.reason
        if teardown is None or reason is None or session._torn_down:
            return
        session._torn_down = True
        with trio.move_on_after(self.settings.teardown_timeout, shield=True) as timeout:
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

    def _finish(self, session: Session) -> None:
        """TERMINATING -> TERMINATED: leave a tombstone and drop out of the registry."""
        session._torn_down = True
        self._transition(session, Event.TEARDOWN_DONE, session.reason)
        self._unregister(session)
        if session._done is not None:
            session._done.set()

    def _unregister(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        if session.handle_hash is not None and self._by_hash.get(session.handle_hash) is session:
            del self._by_hash[session.handle_hash]
        remaining = self._per_principal[session.principal] - 1
        if remaining:
            self._per_principal[session.principal] = remaining
        else:
            del self._per_principal[session.principal]
        session._deadline_seq = -1
        kind = session.kind.value
        reason = _reason(session)
        cells = self._metrics.terminated
        cells[(kind, reason)] = cells.get((kind, reason), 0) + 1
        if self.settings.tombstone_retention > 0:
            tomb = Tombstone(  # positional: one is made per ended session
                session.id,
                session.kind,
                session.principal,
                session.reason,
                self._wall_clock(),
                session.handle_hash,
            )
            self._tombstones[tomb.id] = tomb
            if tomb.handle_hash is not None:
                self._tombstones_by_hash[tomb.handle_hash] = tomb
            expires = trio.current_time() + self.settings.tombstone_retention
            self._tombstone_fifo.append((expires, tomb.id))
        if not self._sessions and self._empty is not None:
            self._empty.set()
            self._empty = None

    async def _guard_background(
        self, session: Session, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await fn(*args)
        except Exception:
            logger.exception("background task %s of session %s failed", _task_name(fn),
                             session.id, extra={"session_id": session.id})  # fmt: skip
            self._metrics.background_errors += 1
            self._terminate(session, TerminationReason.ERROR)
        finally:
            session._background -= 1

    async def _scanner(self) -> None:
        # Tick on the grid of multiples of the interval: see _buckets.
        interval = self.settings.cleanup_interval
        while True:
            now = trio.current_time()
            tick = (math.floor(now / interval) + 1) * interval
            if tick <= now:  # float rounding: never wake up at the same instant again
                tick = (math.floor(now / interval) + 2) * interval
            await trio.sleep_until(tick)
            self.scan_once()

    def scan_once(self) -> int:
        """One cleanup tick: end what is due, purge old tombstones. Returns sessions ended.

        Costs O(entries due), not O(live sessions): it opens the buckets whose
        time has come, all of whose entries are due (a look at the top of a
        small heap when none has). A tick off the grid (a late wake-up, or a
        call by hand) also ends what is due in the bucket it falls inside and
        keeps the rest; amortised, an entry is looked at no more than twice.
        """
        now = trio.current_time()
        self._metrics.cleanup_runs += 1
        self._last_cleanup = self._wall_clock()
        keys, buckets, width = self._bucket_keys, self._buckets, self._bucket_width
        ended = 0
        # Entries scheduled while we scan (not due yet, or not due after all)
        # wait until the scan is over: float rounding can put one back into a
        # bucket this very loop would open again.
        deferred = self._deferred = []
        try:
            while keys and (keys[0] - 1) * width < now:
                for entry in buckets.pop(heapq.heappop(keys), ()):
                    _, seq, session = entry
                    if seq != session._deadline_seq:
                        continue  # superseded by a later entry
                    if entry[0] > now:
                        deferred.append(entry)  # its bucket has begun; it is not due yet
                        continue
                    session._deadline_seq = -1
                    try:
                        ended += self._expire_if_due(session, now)
                    except Exception:
                        self._metrics.cleanup_errors += 1
                        logger.exception("cleanup failed for session %s", session.id,
                                         extra={"session_id": session.id})  # fmt: skip
        finally:
            self._deferred = None
            for entry in deferred:
                self._push_deadline(entry)
        fifo = self._tombstone_fifo
        while fifo and fifo[0][0] <= now:
            _, session_id = fifo.popleft()
            tomb = self._tombstones.pop(session_id, None)
            if tomb is not None and tomb.handle_hash is not None:
                self._tombstones_by_hash.pop(tomb.handle_hash, None)
        return ended

    def _expire_if_due(self, session: Session, now: float) -> int:
        if session.state not in _LIVE_STATES:
            return 0
        if session.deadline <= now:
            reason = TerminationReason.LIFETIME_EXCEEDED
        elif (
            session.state is _S.IDLE
            and session.idle_since + session.idle_timeout + self._idle_grace <= now
        ):
            reason = TerminationReason.IDLE_TIMEOUT
        else:
            self._schedule_deadline(session)  # not yet: the entry was early
            return 0
        if self._store is not None and session._stored and not session._end_persisted:
            # The store decides: the session may be in use by another process.
            self._expiring.append(session)
            if self._expiring_wake is not None:
                self._expiring_wake.set()
            return 0
        self._terminate(session, reason)
        self._metrics.expired += 1
        return 1

    # -- the store's tasks ----------------------------------------------------------

    async def _flush_touches(self) -> None:
        """Write the coalesced activity of every dirty session in one batch."""
        store = self._store
        assert store is not None
        sessions = [s for s in self._dirty if s._stored and not s._end_persisted]
        self._dirty.clear()
        if not sessions:
            return
        touches = [self._take_touch(s) for s in sessions]
        try:
            await self._store_call(store.touch(touches))
        except Exception as exc:
            logger.warning("could not write session activity: %s", exc)
            for s, t in zip(sessions, touches, strict=True):  # try again next time
                self._give_back(s, t)
            return
        for s in sessions:
            if s._in_flight and s.live:  # a long request keeps its session fresh in the store
                self._dirty[s] = None

    async def _flush_one(self, session: Session) -> None:
        """Write one session's unwritten activity now (best effort)."""
        store = self._store
        assert store is not None
        touch = self._take_touch(session)
        try:
            await self._store_call(store.touch([touch]))
        except Exception as exc:
            logger.warning("could not write activity of session %s: %s", session.id, exc,
                           extra={"session_id": session.id})  # fmt: skip
            self._give_back(session, touch)

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(self.settings.touch_interval)
            if self._dirty:
                await self._flush_touches()
            if self._unready:  # connection sessions whose "ready" could not be written
                for session in list(self._unready):
                    if session.live:
                        await self._persist_ready(session)
                    else:
                        self._unready.pop(session, None)

    async def _reconciler(self) -> None:
        """Confirm expiries with the store, which knows about use in other processes."""
        store = self._store
        assert store is not None
        while True:
            if not self._expiring:
                self._expiring_wake = trio.Event()
                await self._expiring_wake.wait()
                self._expiring_wake = None
            batch, self._expiring = self._expiring, []
            for session in batch:
                if session.live:
                    await self._reconcile_expiry(session, store)
                    if session.live and session._deadline_seq < 0:
                        self._schedule_deadline(session)  # never left unscheduled

    async def _reconcile_expiry(self, session: Session, store: SessionStore) -> None:
        """End a session the scanner found due, if the store agrees (it may be in use elsewhere)."""
        local = self._local_due(session)
        if local is None:
            return
        cutoff = self._wall_clock()
        if local is TerminationReason.IDLE_TIMEOUT:
            cutoff -= self._idle_grace
        try:
            if session in self._dirty:
                await self._flush_one(session)
            reason = await self._store_call(store.expire(session.id, cutoff))
            if reason is None:
                record = await self._store_call(store.load(session.id))
                if record is not None and record.live:
                    # Used elsewhere meanwhile: take in its activity and wait again.
                    self._refresh_from_record(session, record)
                    self._schedule_deadline(session)
                    return
                reason = record.termination_reason if record is not None else local
            session._end_persisted = True
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                self._metrics.cleanup_errors += 1
                logger.exception("cleanup failed for session %s", session.id,
                                 extra={"session_id": session.id})  # fmt: skip
            # The store could not confirm. If it is still due here (no request
            # came in while we waited), end it here; the store still has it live
            # and the sweep ends it there when it can.
            reason = self._local_due(session)
            if reason is None:
                self._schedule_deadline(session)
                return
        if session.live:
            self._end_from_store(session, reason or local)

    def _local_due(self, session: Session) -> TerminationReason | None:
        if not session.live:
            return None
        now = trio.current_time()
        if session.deadline <= now:
            return TerminationReason.LIFETIME_EXCEEDED
        idle_end = session.idle_since + session.idle_timeout + self._idle_grace
        if session.state is _S.IDLE and idle_end <= now:
            return TerminationReason.IDLE_TIMEOUT
        return None

    async def _sweeper(self) -> None:
        """End stored sessions whose deadline passed (opened anywhere); purge old records."""
        store = self._store
        assert store is not None
        while True:
            await trio.sleep(self.settings.sweep_interval)
            try:
                if self._dirty:
                    await self._flush_touches()  # our own recent use first
                now = self._wall_clock()
                ended = await self._store_call(store.sweep(now - self._idle_grace))
                for session_id, reason in ended:
                    session = self._sessions.get(session_id)
                    if session is not None and session.live:
                        session._end_persisted = True
                        self._end_from_store(session, reason)
                await self._store_call(store.purge(now - self.settings.tombstone_retention))
            except Exception as exc:
                self._metrics.cleanup_errors += 1
                logger.warning("store sweep failed: %s", exc)

    async def _dispatcher(self) -> None:
        assert self._observer_receive is not None
        assert self._dispatcher_done is not None
        try:
            async with self._observer_receive as receive:
                async for event in receive:
                    for observer in self.hooks.observers:
                        try:
                            await observer(event)
                        except Exception:
                            RuntimeMetrics.bump(self._metrics.hook_errors, "observer")
                            logger.exception("observer %r failed on %s", observer, event)
        finally:
            self._dispatcher_done.set()

    # -- time -----------------------------------------------------------------

    def _wall_at(self, t: float) -> float:
        """Wall-clock time for a trio-clock instant."""
        return self._started_wall + (t - self._started_time)


async def _park(session: Session) -> None:
    """Sleep until :meth:`Supervisor._terminate` wakes us (or we are cancelled)."""
    session._parked = trio.lowlevel.current_task()

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        session._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _reason(session: Session) -> str:
    return session.reason.value if session.reason is not None else "unknown"


def _new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


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
