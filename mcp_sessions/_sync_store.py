"""Store synchronisation with a store: :class:`DurableSync` and its coalesced activity writer.

Theory of operation
===================

See :mod:`mcp_sessions._sync` for the protocol and the store path. Here:

- :class:`DurableSync` is the one writer of a session's document, version
  and ``_sync`` record (a :class:`~mcp_sessions._sync_stored._Stored`: what
  the store knows of it). It owns the components below, hands each what it
  works with, and delegates the supervisor's four store tasks to them.
- :class:`ActivityWriter` owns the flusher task, and the sets of sessions
  whose activity or "ready" is not written yet.
- :mod:`mcp_sessions._sync_expiry` holds the expiry jobs: the
  :class:`~mcp_sessions._sync_expiry.Reconciler` owns the reconciler task
  (confirms with the store what the scanner found due), the
  :class:`~mcp_sessions._sync_expiry.Sweeper` the sweeper task (ends what
  nobody has loaded, purges old records), and the
  :class:`~mcp_sessions._sync_expiry.SettlingWindow` the reaction to a
  wall-clock step.
- :class:`~mcp_sessions._instances.InstanceLease` owns the lease task: this
  process's lease, and the reaping of connection sessions left by processes
  whose lease lapsed.

Clocks. A session this process holds idles out on trio's clock. The store's
wall-clock times carry only what other processes did: when the scanner finds
a session idle-due here, the reconciler asks the store to end it unless a
later use was written than the last one this process knows of
(``unchanged_since``), so a wall-clock step can neither end it early nor keep
it past its bound. When the clock steps, every session held here is marked
for its activity to be rewritten in the new wall time at once, and for a
settling window nothing is idled out on stored times (see
:mod:`mcp_sessions._sync_expiry`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import trio

from . import _expiry
from ._clock import RuntimeClock
from ._errors import SessionGone, gone
from ._instances import InstanceLease
from ._lifecycle import Lifecycle
from ._metrics import RuntimeMetrics
from ._registry import Registry
from ._requests import Requests
from ._session import Session, SessionKind
from ._settings import LimitPolicy, Settings
from ._state import SessionState, TerminationReason
from ._stopping import StoreWaits
from ._store import (
    LIVE,
    Limits,
    SessionRecord,
    SessionStore,
    StoreHealth,
    StoreUnavailable,
    Touch,
    future_bound,
)
from ._sync import Task, _Base, _patch_here, record_of
from ._sync_expiry import Reconciler, SettlingWindow, Sweeper
from ._sync_stored import _Stored, _stored

__all__ = ["ActivityWriter", "DurableSync"]

logger = logging.getLogger("mcp_sessions")
_T = TypeVar("_T")
_S = SessionState


class ActivityWriter:
    """Coalesced activity: the one writer of sessions' touches and "ready" marks.

    Requests report activity synchronously (:meth:`activity`); the flusher
    task (owned by the supervisor's nursery) writes every dirty session in one
    batch per ``touch_interval``, and a connection session's "ready" as soon
    as it can. Nothing here is ever written from the request path.
    """

    def __init__(
        self,
        store: SessionStore,
        clock: RuntimeClock,
        touch_interval: float,
        call: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = touch_interval
        self._call = call
        self._dirty: dict[Session, None] = {}  # activity not yet written (ordered set)
        self._unready: dict[Session, None] = {}  # "ready" not yet written
        self._wake = trio.Event()
        #: When the flusher writes next: a touch interval after the last write,
        #: sooner when a dirty session's idle timeout needs it sooner.
        self._next_touch = float("inf")

    def activity(self, session: Session) -> None:
        if session._sync is None or not session.live or session in self._dirty:
            return
        self._dirty[session] = None
        quarter = session.idle_timeout * 0.25
        if quarter < self._interval:
            # A short idle timeout: its allowance is a quarter of it, so its use
            # must be written within that (see mcp_sessions._expiry).
            due = trio.current_time() + quarter
            if due < self._next_touch:
                self._next_touch = due
                self._wake.set()

    def rewrite_all(self, sessions: Iterable[Session]) -> None:
        """Write the activity of all these sessions now (the wall clock stepped)."""
        for session in sessions:
            if session._sync is not None and session.live:
                self._dirty[session] = None
        self._next_touch = trio.current_time()
        self._wake.set()

    def ready(self, session: Session) -> None:
        st = _stored(session)
        if st is not None and not st.ready_written:
            self._unready[session] = None
            self._wake.set()

    def pending(self, session: Session) -> bool:
        return session in self._dirty or session in self._unready

    def forget(self, session: Session) -> None:
        self._dirty.pop(session, None)
        self._unready.pop(session, None)

    def take_touch(self, session: Session, st: _Stored, *, final: bool = False) -> Touch:
        """The session's unwritten activity, counted as written from now on.

        Taking it moves the baseline at once, so two writers in flight never
        send the same increments twice; one that fails gives it back. The
        ``final`` touch (the end) also counts the requests still in flight
        (the closing request itself, say): nothing is written after the end.
        """
        self._dirty.pop(session, None)
        last = trio.current_time() if session.in_flight else session.last_active_time
        requests = session.requests + (session.in_flight if final else 0)
        # A final touch in flight may have credited requests still running.
        requests = max(requests, st.flushed_requests)
        now, trio_now = self._clock.wall(), trio.current_time()
        touch = Touch(
            session.id,
            now - (trio_now - last),
            requests - st.flushed_requests,
            session.errors - st.flushed_errors,
            now,
            now + (session.lifetime_end - trio_now) if st.reframe else None,
        )
        st.reframe = False
        st.known_active = max(st.known_active, touch.last_active)
        st.flushed_requests = requests
        st.flushed_errors = session.errors
        return touch

    def give_back(self, session: Session, st: _Stored, touch: Touch) -> None:
        st.flushed_requests -= touch.requests
        st.flushed_errors -= touch.errors
        st.reframe = st.reframe or touch.expires_at is not None
        if session.live:
            self._dirty[session] = None

    async def _flush_touches(self) -> None:
        """Write the coalesced activity of every dirty session, in one batch."""
        pairs = [(s, st) for s in self._dirty if (st := _stored(s)) and not st.end_written]
        self._dirty.clear()
        if not pairs:
            return
        touches = [self.take_touch(s, st) for s, st in pairs]
        try:
            await self._call(self._store.touch(touches))
        except Exception as exc:
            logger.warning("could not write session activity: %s", exc)
            for (s, st), t in zip(pairs, touches, strict=True):  # again next time
                self.give_back(s, st, t)
            return
        for s, _ in pairs:
            if s.in_flight and s.live:  # a long request keeps its session fresh in the store
                self.activity(s)

    async def _write_ready(self) -> None:
        for session in list(self._unready):
            st = _stored(session)
            if st is None or not session.live:
                self._unready.pop(session, None)
                continue
            at = self._clock.wall()
            try:
                await self._call(self._store.mark_ready(session.id, at))
            except Exception as exc:
                logger.warning("could not record session %s as ready (will retry): %s",
                               session.id, exc, extra={"session_id": session.id})  # fmt: skip
                return
            st.ready_written = True
            st.known_active = max(st.known_active, at)
            self._unready.pop(session, None)

    async def flush(self) -> None:
        """Write all pending activity now."""
        if self._dirty:
            await self._flush_touches()

    async def run(self) -> None:
        """The flusher task: touches once per interval (sooner for short idle timeouts),
        "ready" marks at once."""
        interval = self._interval
        self._next_touch = min(self._next_touch, trio.current_time() + interval)
        while True:
            with trio.move_on_at(self._next_touch):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._unready:
                await self._write_ready()
            if trio.current_time() >= self._next_touch:
                self._next_touch = trio.current_time() + interval
                if self._dirty:
                    await self._flush_touches()


class DurableSync(_Base):
    """Sessions kept in a :class:`SessionStore`, shared with other processes."""

    def __init__(
        self,
        store: SessionStore,
        *,
        registry: Registry,
        lifecycle: Lifecycle,
        metrics: RuntimeMetrics,
        clock: RuntimeClock,
        settings: Settings,
        adopt: Callable[[SessionRecord], Awaitable[Session]],
    ) -> None:
        super().__init__(registry, metrics)
        self._store = store
        self._lifecycle = lifecycle
        self._clock = clock
        self._settings = settings
        self._adopt = adopt
        self.durable = store.durable
        self.error: str | None = None
        #: The last write's failure and when (wall clock), until a write succeeds.
        self.write_error: tuple[str, float] | None = None
        #: Bounds the waits on the store while the process stops (the supervisor moves it).
        self.store_waits = StoreWaits()
        #: Idle expiry waits up to this much longer with a durable (so possibly
        #: shared) store: use elsewhere may not be written yet. The rule takes
        #: at most a quarter of each session's idle timeout (see _expiry).
        self.idle_grace = settings.touch_interval if store.durable else 0.0
        self._activity = ActivityWriter(store, clock, settings.touch_interval, self._call)
        self._reconciler = Reconciler(
            store,
            lifecycle=lifecycle,
            metrics=metrics,
            clock=clock,
            grace=self.idle_grace,
            call=self._call,
            take_in=self._take_in,
        )
        self.instance = InstanceLease(
            store,
            clock,
            settings.instance_lease,
            call=self._call,
            reaped=self._reaped,
            lost=self._check_connections,
        )
        self._window = SettlingWindow(
            registry=registry, settings=settings, rewrite=self._activity.rewrite_all
        )
        self._sweeper = Sweeper(
            store,
            registry=registry,
            metrics=metrics,
            clock=clock,
            settings=settings,
            grace=self.idle_grace,
            instance=self.instance,
            window=self._window,
            flush=self._activity.flush,
            call=self._call,
            ended_elsewhere=self._ended_elsewhere,
        )
        clock.on_step(self._window.stepped)

    @property
    def store(self) -> SessionStore:
        return self._store

    @property
    def instance_id(self) -> str | None:
        return self.instance.id

    async def open(self) -> None:
        await self._store.open()
        try:
            await self.instance.register()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._store.aclose()
            raise

    async def aclose(self) -> None:
        try:
            with self.store_waits.bounded(self._settings.teardown_timeout):
                await self.instance.remove()
        except Exception as exc:
            logger.warning("could not remove this instance from the store: %s", exc)
        finally:
            with self.store_waits.bounded() as scope:
                await self._store.aclose()
            if scope.cancelled_caught:
                logger.warning("stopped without waiting for the store's last operations")

    def tasks(self) -> Sequence[Task]:
        return (
            ("mcp_sessions.store.flusher", self._activity.run),
            ("mcp_sessions.store.reconciler", self._reconciler.run),
            ("mcp_sessions.store.sweeper", self._sweeper.run),
            ("mcp_sessions.store.lease", self.instance.run),
        )

    def _reaped(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            session = self._registry.get(session_id)
            if session is not None and session.live:
                self._ended_elsewhere(session, TerminationReason.DISCONNECTED)

    async def _check_connections(self) -> None:
        """Our record was reaped: end here the connection sessions that ended there."""
        for session in list(self._registry):
            if session.kind is not SessionKind.CONNECTION or not session.live:
                continue
            record = await self._call(self._store.load(session.id), write=False)
            if (record is None or not record.live) and session.live:
                reason = record.termination_reason if record is not None else None
                self._ended_elsewhere(session, reason or TerminationReason.DISCONNECTED)

    def _limits(self, now: float) -> Limits:
        settings = self._settings
        self._clock.check_step()
        # Eviction judges idleness by stored times: not while they may predate a step.
        evict = settings.limit_policy is LimitPolicy.EVICT_IDLE and not self._window.settling()
        return Limits(
            max_sessions=settings.max_sessions,
            max_per_principal=settings.max_sessions_per_principal,
            now=now,
            grace=self.idle_grace,
            # Not one written active in the last two touch intervals: such a
            # session may be busy in some process.
            evict_before=now - 2 * settings.touch_interval if evict else None,
            instance=self.instance.id,
        )

    async def _call(self, op: Awaitable[_T], *, write: bool = True) -> _T:
        """Await a store operation, keeping what health reports: the last failure, and
        whether the last write failed (reads may well work while writes cannot)."""
        try:
            result = await op
        except StoreUnavailable as exc:
            self.error = str(exc)
            if write:
                self.write_error = (str(exc), self._clock.wall())
            raise
        self.error = None
        if write:
            self.write_error = None
        return result

    # -- opening ---------------------------------------------------------------------

    async def check_room(self, principal: str) -> None:
        await self._call(
            self._store.check_room(principal, self._limits(self._clock.wall())), write=False
        )

    async def created(self, session: Session, *, ready: bool) -> None:
        # A connection session lives and dies with this process's stream, unless it
        # has a handle (an HTTP session's id): then any process may resume it.
        bound = session.kind is SessionKind.CONNECTION and session.handle_hash is None
        instance = self.instance.id if bound else None
        record = record_of(session, self._clock, ready=ready, instance=instance)
        # From here the record carries no later patch: patches wait for the
        # insert, then go to the store.
        st = session._sync = _Stored(ready=ready, known_active=record.last_active)
        creating = st.creating = trio.Event()
        try:
            # The store counts every process's sessions, atomically with the insert.
            evicted = await self._call(
                self._store.create(record, limits=self._limits(self._clock.wall()))
            )
        except BaseException:
            session._sync = None
            raise
        finally:
            st.creating = None
            creating.set()
        if not session.live:
            # Ended while the store recorded it (a shutdown, say); its task found
            # no record to end. Its handle was never handed out: end the record.
            with trio.CancelScope(shield=True):
                reason = session.reason or TerminationReason.ERROR
                try:
                    await self._call(self._store.terminate(session.id, reason, self._clock.wall()))
                except Exception as exc:
                    logger.warning("could not record the end of session %s: %s", session.id,
                                   exc, extra={"session_id": session.id})  # fmt: skip
            st.end_written = True
            return
        st.epoch = self._store.change_epoch()
        for victim_id in evicted:
            victim = self._registry.get(victim_id)
            if victim is not None and victim.live:
                logger.info("evicted longest-idle session %s to admit a new one", victim_id,
                            extra={"session_id": victim_id})  # fmt: skip
                self._ended_elsewhere(victim, TerminationReason.EVICTED)

    def ready(self, session: Session) -> None:
        self._activity.ready(session)

    def activity(self, session: Session) -> None:
        self._activity.activity(session)

    # -- naming a handle ----------------------------------------------------------------

    async def resolve(self, digest: str, principal: str) -> Session:
        store = self._store
        local = self._registry.by_hash(digest)
        epoch = store.change_epoch()
        known: int | None = None
        checked: tuple[_Stored, int] | None = None  # (its record, its doubts) before we read
        if local is not None and local.principal == principal and local.live:
            st = _stored(local)
            if st is not None:
                checked = (st, st.doubts)
            if (
                st is not None
                and epoch is not None
                and st.epoch == epoch
                and self._lifecycle.due(local, trio.current_time()) is None
            ):
                self._validated("ok")  # nothing written elsewhere since we last looked
                return local
            known = local._version
        record = await self._call(store.load_by_hash(digest, known_version=known), write=False)
        if record is None:
            local = self._registry.by_hash(digest)
            if local is not None and local.live and local.principal == principal and _stored(local):
                # Stored once, gone now: it ended elsewhere and its record was purged.
                self._ended_elsewhere(local, TerminationReason.CLOSED)
        if record is None or record.principal != principal:
            # (Found by its handle: a handle session, or a connection session whose
            # transport gave it one, an HTTP session's id, to be resumed anywhere.)
            return self._resolve_here(digest, principal)
        if record.live and self._due(record, self._registry.by_hash(digest)) is not None:
            ended = await self._call(
                store.expire(record.id, self._clock.wall(), grace=self.idle_grace)
            )
            fresh = await self._call(store.load(record.id), write=False)
            if fresh is not None:
                record = fresh
            elif ended is not None:
                self._validated("gone")
                raise gone(record.id, ended)
        local = self._registry.by_hash(digest)  # may have changed while we awaited
        if not record.live:
            if local is not None and local.live:
                self._ended_elsewhere(local, record.termination_reason)
            self._validated("gone")
            raise gone(record.id, record.termination_reason)
        if local is not None and not local.live:
            self._validated("gone")  # ending here; the store hears of it shortly
            raise gone(local.id, local.reason)
        if local is None:
            local = await self._bring_in(record, digest)
        else:
            self._take_in(local, record)
        st = _stored(local)
        if st is not None and (checked is None or checked == (st, st.doubts)):
            st.epoch = epoch  # (not if a write of ours became doubtful while we read)
        while local.state is _S.INITIALIZING:
            # Another call is bringing it in: let it finish.
            if local._ready is None:
                local._ready = trio.Event()
            await local._ready.wait()
        if not local.live:
            self._validated("gone")
            raise gone(local.id, local.reason)
        self._validated("ok")
        return local

    async def _bring_in(self, record: SessionRecord, digest: str) -> Session:
        """A live stored session this process does not hold: adopt it."""
        tomb = self._registry.tombstone_by_hash(digest)
        if tomb is not None and tomb.reason is not TerminationReason.SHUTDOWN:
            # It ended here while the store could not be told; tell it now.
            reason = tomb.reason or TerminationReason.CLOSED
            ended = await self._call(self._store.terminate(tomb.id, reason, self._clock.wall()))
            self._validated("gone")
            raise gone(tomb.id, ended or reason)
        return await self._adopt(record)

    def _due(self, record: SessionRecord, local: Session | None) -> TerminationReason | None:
        """Whether a live stored session is due now, counting this process's own unwritten use."""
        self._clock.check_step()
        now = self._clock.wall()
        last_active = record.last_active
        if local is not None and local.live:
            if local.in_flight:
                return None
            last_active = max(last_active, self._clock.wall_at(local.last_active_time))
        reason = _expiry.due(
            now,
            expires_at=record.expires_at,
            idle_since=last_active if record.state == LIVE else None,
            idle_timeout=record.idle_timeout,
            grace=self.idle_grace,
        )
        if reason is TerminationReason.IDLE_TIMEOUT and self._window.settling():
            return None  # stored times may still be in the old wall time
        return reason

    def adopted(self, session: Session, record: SessionRecord) -> None:
        """Take a session the supervisor brought in from ``record``."""
        session._sync = _Stored(
            requests=record.requests, errors=record.errors, known_active=record.last_active
        )
        session._doc, session._version = dict(record.doc), record.version

    def _take_in(self, session: Session, record: SessionRecord) -> None:
        """What other processes did: a newer document, later activity."""
        if record.doc_loaded and record.version > session._version:
            session._doc, session._version = dict(record.doc), record.version
        st = _stored(session)
        if st is not None:
            if record.last_active <= st.known_active:
                return  # no use but ours (whatever the wall clock did since)
            bound = future_bound(self._clock.wall())
            if bound is not None and record.last_active > bound:
                return  # written before the wall clock stepped back: nobody's use now
            st.known_active = record.last_active
        elsewhere = min(self._clock.trio_at(record.last_active), trio.current_time())
        Requests.saw_activity(session, elsewhere)
        self._lifecycle.used_elsewhere(session, elsewhere)

    def _ended_elsewhere(self, session: Session, reason: TerminationReason | None) -> None:
        st = _stored(session)
        if st is not None:
            st.end_written = True
        self._lifecycle.end_as_told(session, reason)

    # -- patches and ends -------------------------------------------------------------

    async def patch(
        self, session: Session, patch: Mapping[str, Any], if_version: int | None
    ) -> int:
        session.check_live()
        st = _stored(session)
        if st is not None and st.creating is not None:
            await st.creating.wait()  # being inserted: the record no longer carries patches
            session.check_live()
            st = _stored(session)
            if st is None:  # the insert failed; the session is ending
                raise gone(session.id, session.reason or TerminationReason.ERROR)
        max_bytes = self._settings.max_state_bytes
        if st is None:
            # Not recorded yet (its setup hook is running): the record will carry it.
            return _patch_here(session, patch, if_version, max_bytes)
        at = self._clock.wall()
        try:
            version, doc = await self._call(
                self._store.patch_state(
                    session.id, patch, if_version=if_version, at=at, max_bytes=max_bytes
                )
            )
        except SessionGone as exc:
            self._ended_elsewhere(session, exc.reason)
            raise
        except BaseException:
            # Our copy may be stale now: a version conflict says so, and a patch
            # given up on (cancelled, timed out) may have been committed anyway.
            # The next use reads the store instead of trusting it.
            st.epoch = None
            st.doubts += 1
            raise
        st.known_active = max(st.known_active, at)
        if version > session._version:
            session._doc, session._version = doc, version
        return version

    async def closing(self, session: Session, reason: TerminationReason) -> None:
        st = _stored(session)
        while st is not None and not st.end_written and session.live:
            if st.closing is not None:
                await st.closing.wait()  # another close is writing; then look again
                continue
            st.closing = trio.Event()
            try:
                await self._write_close(session, st, reason)
            finally:
                st.closing.set()
                st.closing = None
            return

    async def _write_close(self, session: Session, st: _Stored, reason: TerminationReason) -> None:
        touch = self._activity.take_touch(session, st, final=True)
        try:
            ended = await self._call(
                self._store.terminate(session.id, reason, self._clock.wall(), touch)
            )
        except BaseException as exc:
            st.epoch = None  # a close given up on may have been committed: read it next time
            st.doubts += 1
            if not isinstance(exc, Exception):
                raise
            self._activity.give_back(session, st, touch)
            if reason is TerminationReason.CLOSED:
                raise
            logger.warning("store unavailable; ending session %s locally only", session.id,
                           extra={"session_id": session.id})  # fmt: skip
            return
        st.end_written = True
        if ended is not None and ended is not reason and session.live:
            self._lifecycle.end_as_told(session, ended)  # it had ended elsewhere: that stands

    def has_end_to_write(self, session: Session) -> bool:
        return session._sync is not None or self._activity.pending(session)

    async def ended(self, session: Session) -> None:
        st = _stored(session)
        self._activity.forget(session)
        if st is None or st.end_written or st.creating is not None:
            return  # (while the insert runs, created() ends the record after it)
        reason = session.reason or TerminationReason.ERROR
        touch = self._activity.take_touch(session, st, final=True)
        store = self._store
        keep = self._lifecycle.kept(session)
        with self.store_waits.bounded(self._settings.teardown_timeout):
            try:
                if keep and store.durable:
                    await self._call(store.touch([touch]))  # kept: it resumes after a restart
                else:
                    await self._call(store.terminate(session.id, reason, self._clock.wall(), touch))
                st.end_written = True
            except Exception as exc:  # never keep the session from finishing
                logger.warning("could not record the end of session %s: %s", session.id, exc,
                               extra={"session_id": session.id})  # fmt: skip

    # -- expiry (the reconciler: mcp_sessions._sync_expiry) --------------------------

    def confirm_expiry(self, session: Session) -> bool:
        return self._reconciler.confirm_expiry(session)

    def confirming(self, session: Session) -> bool:
        return self._reconciler.confirming(session)

    # -- reading ---------------------------------------------------------------------

    async def flush(self) -> None:
        await self._activity.flush()

    async def list_records(
        self, principal: str, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[SessionRecord]:
        return await self._call(
            self._store.list_by_principal(principal, after=after, limit=limit), write=False
        )

    async def health(self) -> StoreHealth:
        """The store's health, and the last write's outcome: a store that answers but
        cannot be written to (locked past its timeout, a full disk) is not healthy."""
        health = await self._store.health()
        self.error = None if health.ok else health.error
        if health.ok and self.write_error is not None:
            error, at = self.write_error
            when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
            return attrs.evolve(health, ok=False, error=f"last write failed at {when}: {error}")
        return health
