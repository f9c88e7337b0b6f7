"""The session store contract, its record type, and the in-memory backend.

Theory of operation
===================

The store is the durable record of every session and, where several server
processes share one, the source of truth. The runtime keeps a live
:class:`~mcp_sessions.Session` per session *it serves*; the store keeps a
:class:`SessionRecord` per session *anyone* opened. What the store holds:

- identity: public id, SHA-256 of the handle (never the handle), kind,
  principal, client info, metadata;
- the JSON state document and its version (the version serialises patches
  from every process: a patch is a read-modify-write in one transaction);
- times (wall clock, seconds since the epoch): created, last active (touched
  coalesced, at most once per session per ``touch_interval``), the idle
  timeout, the absolute expiry, and when it ended;
- the lifecycle as far as it matters beyond one process: ``initializing``,
  ``idle`` (live: ACTIVE/IDLE flips are per-process facts and never written,
  so no request costs a write) or ``terminated`` with its reason.

Ending a session is a conditional write (``... WHERE state <> 'terminated'``),
so however many processes try, exactly one ends it, and the loser learns the
winner's reason. :meth:`SessionStore.sweep` ends every session whose idle or
absolute deadline has passed the same way, so several processes may sweep at
once.

Two cheap questions spare callers round trips: :meth:`SessionStore.change_epoch`
says (synchronously, without I/O that can wait) whether anyone else may have
written since it was last asked, and ``known_version`` leaves out a document
the caller already holds. :meth:`SessionStore.statistics` counts operations
and the transactions they shared.

Several processes share one store, so it is also where they agree:

- **limits**: :meth:`SessionStore.create` with :class:`Limits` counts the
  live sessions (global and the principal's) atomically with the insert, and
  under ``evict_idle`` ends the longest-idle one in the full scope in the same
  transaction;
- **instances**: each process registers an :class:`InstanceRecord` and
  renews its lease; connection sessions name their instance, and whoever
  finds an instance's lease lapsed ends them (:meth:`SessionStore.reap_instances`);
- **sweeps**: :meth:`SessionStore.sweep` reads what is due first and writes
  only when something is, and with a ``holder`` only the holder of the sweep
  lease sweeps, so one process sweeps per interval.

Every backend implements :class:`SessionStore`; one contract test suite
(``tests/test_store_contract.py``) runs against all of them. Failures to reach
the store raise :class:`StoreUnavailable` (tool error ``store_unavailable``)
within a bounded time; a row that cannot be decoded is logged and treated as
absent.
"""

from __future__ import annotations

import copy
import datetime as _dt
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from . import _expiry
from ._errors import LimitExceeded, SessionError, SessionNotFound, VersionConflict, gone
from ._jsonmerge import patched
from ._state import TerminationReason

__all__ = [
    "LIVE",
    "TERMINATED",
    "InstanceRecord",
    "Limits",
    "MemoryStore",
    "SessionRecord",
    "SessionStore",
    "StoreError",
    "StoreHealth",
    "StoreStatistics",
    "StoreUnavailable",
    "Touch",
]

#: Record states. ``initializing`` is a connection session before its handshake.
INITIALIZING = "initializing"
LIVE = "idle"
TERMINATED = "terminated"
RECORD_STATES = (INITIALIZING, LIVE, TERMINATED)


class StoreError(Exception):
    """Base of store failures that are not about one session."""


class StoreUnavailable(SessionError):
    """The store cannot be reached or written now (down, locked, full, read-only).

    Raised within a bounded time; the server keeps serving what it can and
    the store is retried on the next call.
    """

    code = "store_unavailable"


class SchemaTooNew(StoreError):
    """The store's schema is newer than this code knows: refuse rather than risk data."""


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A session as the store keeps it. Times are wall-clock seconds since the epoch."""

    id: str
    handle_hash: str | None
    kind: str
    principal: str
    client: Mapping[str, Any] = attrs.field(factory=dict)
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    state: str = LIVE
    reason: str | None = None
    doc: Mapping[str, Any] = attrs.field(factory=dict)
    #: False when the caller already had this version's document (``known_version``):
    #: then ``doc`` is ``{}`` and must be ignored.
    doc_loaded: bool = True
    version: int = 0
    created_at: float
    last_active: float
    idle_timeout: float
    expires_at: float
    terminated_at: float | None = None
    requests: int = 0
    errors: int = 0
    #: The instance (process) serving a connection session; None for handle sessions,
    #: which belong to nobody.
    instance: str | None = None

    @property
    def live(self) -> bool:
        return self.state != TERMINATED

    @property
    def termination_reason(self) -> TerminationReason | None:
        try:
            return TerminationReason(self.reason) if self.reason is not None else None
        except ValueError:
            return TerminationReason.ERROR

    def due(self, now: float, *, grace: float = 0.0) -> TerminationReason | None:
        """The reason this live session should end at wall time ``now``, if any.

        The one rule of :func:`mcp_sessions._expiry.due`: a stored session can
        idle out only in state ``idle``, counted from ``last_active``; ``grace``
        widens the idle bound only.
        """
        if not self.live:
            return None
        return _expiry.due(
            now,
            expires_at=self.expires_at,
            idle_since=self.last_active if self.state == LIVE else None,
            idle_timeout=self.idle_timeout,
            grace=grace,
        )


@attrs.frozen
class Touch:
    """Coalesced activity of one session since its last touch, written in batches.

    ``requests`` and ``errors`` are *increments* (several processes may serve
    one session, so each adds what it saw); ``last_active`` only moves forward,
    except past ``now`` (the writer's wall clock when it wrote): a stored time
    later than that was written before the wall clock stepped back, and is
    replaced (see :func:`later_use`).
    """

    id: str
    last_active: float
    requests: int = 0
    errors: int = 0
    now: float | None = None
    #: A new absolute deadline: the writer's wall clock stepped, and the session's
    #: lifetime (elapsed time since it opened) is written again in the new wall time.
    expires_at: float | None = None


#: How far in a writer's future a stored ``last_active`` may be before it counts
#: as written before the wall clock stepped back (clocks of hosts differ a little).
FUTURE_TOLERANCE = 5.0


def future_bound(now: float | None) -> float | None:
    """The latest plausible stored time for a writer whose wall clock reads ``now``."""
    return None if now is None else now + FUTURE_TOLERANCE


def later_use(stored: float, used: float, now: float | None) -> float:
    """The ``last_active`` to keep: the later one, unless the stored one is in the
    writer's future (the wall clock stepped back since it was written)."""
    bound = future_bound(now)
    if bound is not None and stored > bound:
        return used
    return max(stored, used)


@attrs.frozen(kw_only=True)
class Limits:
    """Admission limits a store checks atomically with an insert (see :meth:`SessionStore.create`).

    Live sessions count when they are not due at ``now`` (with the idle
    allowance ``grace``): a session whose deadline passed but that nobody has
    swept yet takes no room.
    """

    max_sessions: int
    max_per_principal: int
    now: float
    grace: float = 0.0
    #: Under ``evict_idle``: make room by ending (reason ``evicted``) the
    #: longest-idle session in the full scope, among those not active since
    #: this time (so one busy in some process is never taken). None: refuse.
    evict_before: float | None = None
    #: The evicting process's instance: a connection session is evicted only by
    #: its own process (another process's would go on being served there).
    instance: str | None = None

    def exceeded(self, scope: str, limit: int) -> LimitExceeded:
        return LimitExceeded.at(scope, limit, evicting=self.evict_before is not None)


@attrs.frozen(kw_only=True)
class InstanceRecord:
    """A process serving sessions from the store, with its lease (wall-clock seconds)."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    #: Past this, the instance counts as gone and its connection sessions are ended.
    lease_until: float
    version: str = ""

    def lapsed(self, now: float) -> bool:
        return self.lease_until <= now


@attrs.frozen(kw_only=True)
class StoreHealth:
    """The store as last seen by :meth:`SessionStore.health`."""

    backend: str
    ok: bool
    latency_s: float | None = None
    error: str | None = None
    schema_version: int | None = None


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(counts))


@attrs.frozen(kw_only=True)
class StoreStatistics:
    """A snapshot of a store's work since it was created (see :meth:`SessionStore.statistics`)."""

    #: Calls made, by operation name (``"patch_state"``, ``"load_by_hash"``, ...).
    operations: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_counts)
    #: Transactions run to completion (committed; or rolled back because their
    #: only operation failed). With group commit, concurrent operations share
    #: one; the in-memory store counts every call as one.
    transactions: int = 0
    #: Of :attr:`transactions`, those that wrote (took the database's write lock).
    write_transactions: int = 0
    #: Transactions that failed as a whole (every operation in them raised
    #: :class:`StoreUnavailable`).
    failed_transactions: int = 0
    #: The most operations committed in one transaction.
    largest_batch: int = 0
    #: Reads answered without a worker hop (SQLite: on the calling thread's
    #: read-only connection). Not counted in :attr:`transactions`.
    direct_reads: int = 0
    #: Operations in the queue right now, waiting for a transaction (including
    #: any whose caller gave up, until a worker drops them unrun).
    queued: int = 0


@runtime_checkable
class SessionStore(Protocol):
    """What every backend does. All methods are async and safe to call from any task."""

    #: ``memory``, ``sqlite`` or ``postgresql``.
    backend: str
    #: True when records survive a restart of this process.
    durable: bool

    async def open(self) -> None:
        """Connect and apply pending migrations. Raises :class:`SchemaTooNew`."""

    async def aclose(self) -> None:
        """Release connections."""

    async def create(self, record: SessionRecord, *, limits: Limits | None = None) -> list[str]:
        """Insert a new record (committed when this returns).

        With ``limits``, first count the live sessions (global, then the
        principal's) in the same transaction, race-free across processes;
        at a limit, evict (when ``limits.evict_before`` is set) or raise
        :class:`LimitExceeded` and insert nothing. Returns the ids of the
        sessions evicted to make room.
        """

    async def check_room(self, principal: str, limits: Limits) -> None:
        """Raise :class:`LimitExceeded` if opening a session of ``principal`` would be
        refused now. A read, without a lock: :meth:`create` checks again, atomically;
        this spares a refused open its setup."""

    async def load(
        self, session_id: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        """The record with this public id, or None (also for an undecodable row).

        When the stored version equals ``known_version`` the document is not
        sent: the record has ``doc_loaded=False`` and an empty ``doc``.
        """

    async def load_by_hash(
        self, handle_hash: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        """The record with this handle hash, or None; ``known_version`` as in :meth:`load`."""

    async def mark_ready(self, session_id: str, at: float) -> None:
        """``initializing`` -> ``idle`` (a connection session finished its handshake)."""

    async def terminate(
        self, session_id: str, reason: TerminationReason, at: float, touch: Touch | None = None
    ) -> TerminationReason | None:
        """End a live session, exactly once across every process.

        Returns ``reason`` if this call ended it, else the reason it had
        already ended with (``None`` if there is no such record). ``touch``
        writes the final activity counters in the same transaction.
        """

    async def expire(
        self,
        session_id: str,
        now: float,
        *,
        grace: float = 0.0,
        unchanged_since: float | None = None,
    ) -> TerminationReason | None:
        """End the session if its idle or absolute deadline has passed at ``now``.

        ``grace`` widens the idle bound only (use elsewhere not written yet).
        ``unchanged_since``: the caller found the session idle-due on its own
        (monotonic) clock and knows its use up to this ``last_active``; if no
        later use was written since, it ends with ``idle_timeout`` whatever
        the wall clocks say. Returns the reason if *this call* ended it, else None.
        """

    async def patch_state(
        self,
        session_id: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None,
        at: float,
        max_bytes: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Apply an RFC 7386 merge patch in one transaction; return (new version, document).

        Raises :class:`VersionConflict` when ``if_version`` is not the current
        version, :class:`StateTooLarge` when the result would be over
        ``max_bytes`` (nothing is written), :class:`SessionExpired`/
        :class:`SessionClosed` for an ended session and
        :class:`SessionNotFound` for no record.
        """

    async def touch(self, touches: Sequence[Touch]) -> None:
        """Write coalesced activity (last active, counters) for live sessions, in one batch."""

    async def list_by_principal(
        self,
        principal: str,
        *,
        include_terminated: bool = False,
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[SessionRecord]:
        """The principal's sessions, oldest first: ordered by ``(created_at, id)``.

        A page: only those after the ``(created_at, id)`` key ``after``, at
        most ``limit`` of them. Paging by that key lists each session once.
        """

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        """Any principal's sessions, most recently active first (operators)."""

    async def counts(self) -> dict[tuple[str, str], int]:
        """Number of records by ``(state, kind)`` (operators; from an index)."""

    async def sweep(
        self,
        now: float,
        limit: int = 1000,
        *,
        grace: float = 0.0,
        holder: str | None = None,
        lease: float = 0.0,
    ) -> list[tuple[str, TerminationReason]]:
        """End up to ``limit`` sessions whose deadline passed (``grace`` widens the idle
        bound only); return what *this call* ended.

        Costs O(due): it looks for due sessions before it writes, and writes
        only when some are. With ``holder``, it sweeps only if it holds (or
        takes, for ``lease`` seconds) the sweep lease: one holder per lease.
        """

    async def purge(self, before: float) -> int:
        """Delete terminated records that ended before ``before``; return how many
        (writes only when there is something to delete)."""

    async def register_instance(self, instance: InstanceRecord) -> None:
        """Record a process serving sessions (or renew it whole)."""

    async def heartbeat(self, instance_id: str, at: float, lease_until: float) -> bool:
        """Renew an instance's lease; False if its record is gone (it was reaped)."""

    async def remove_instance(self, instance_id: str, at: float) -> list[str]:
        """Forget an instance that stopped cleanly; end (``disconnected``) any of its
        connection sessions still live (their end could not be written); return their ids."""

    async def list_instances(self) -> list[InstanceRecord]:
        """Every registered instance, lapsed ones included, oldest first."""

    async def reap_instances(self, before: float, at: float) -> list[str]:
        """End (reason ``disconnected``) the live connection sessions of every instance
        whose lease ended before ``before``, and forget those instances; return the
        ids of the sessions ended. Writes only when some lease has lapsed."""

    async def health(self) -> StoreHealth:
        """Reachability and round-trip latency. Never raises."""

    async def check(self, now: float) -> list[str]:
        """Problems found in the store, one human-readable line each; empty when all is well.

        Read-only. Looks at the database's own integrity where the backend
        has a check for it (SQLite), the schema version, rows that cannot be
        decoded, live sessions of an instance that is unknown or whose lease
        ended before ``now`` (orphaned), and instances whose lease ended before
        ``now``. Never raises for what it finds in the data; raises
        :class:`StoreUnavailable` when the store cannot be read.
        """

    def change_epoch(self) -> int | None:
        """A number that changes when records may have been written by anyone else.

        Synchronous and cheap: it never waits for a lock or a thread. The
        number differs from the one the previous call returned whenever
        another process, or another store object on the same database, may
        have committed a write since; writes made through this store object
        do not change it. ``None`` means the backend cannot tell cheaply (read
        every time). A change may be a false alarm; an unchanged number is a
        promise. So a store object belongs to one runtime: two supervisors
        sharing one object would not see each other's writes as foreign (give
        each its own object on the same database).
        """

    def statistics(self) -> StoreStatistics:
        """Counters of the work done so far (operations, transactions, batches)."""


class MemoryStore:
    """The in-process backend: the reference implementation of the contract.

    Not durable and not shared: fine for tests and for a single process that
    may forget its sessions on restart. Every call counts as one transaction
    in :meth:`statistics`.
    """

    backend = "memory"
    durable = False

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._by_hash: dict[str, str] = {}
        self._instances: dict[str, InstanceRecord] = {}
        self._sweep_lease: tuple[str, float] | None = None  # (holder, until)
        self._operations: dict[str, int] = {}
        self._writes = 0

    def _count(self, name: str, *, write: bool = False) -> None:
        self._operations[name] = self._operations.get(name, 0) + 1
        self._writes += write

    def statistics(self) -> StoreStatistics:
        calls = sum(self._operations.values())
        return StoreStatistics(
            operations=self._operations,
            transactions=calls,
            write_transactions=self._writes,
            largest_batch=min(calls, 1),
        )

    def change_epoch(self) -> int | None:
        # Shared in tests by runtimes standing for separate processes, and reads
        # cost nothing: callers read every time.
        return None

    async def open(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def create(self, record: SessionRecord, *, limits: Limits | None = None) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._count("create", write=True)
        if record.id in self._records or (
            record.handle_hash is not None and record.handle_hash in self._by_hash
        ):
            raise StoreError(f"duplicate session {record.id}")
        evicted: list[str] = []
        if limits is not None:
            # Decided whole before anything changes: all or nothing, as in one transaction.
            evicted = self._victims(record.principal, limits)
            for victim_id in evicted:
                self._records[victim_id] = attrs.evolve(
                    self._records[victim_id],
                    state=TERMINATED,
                    reason=TerminationReason.EVICTED.value,
                    terminated_at=limits.now,
                )
        self._records[record.id] = _frozen_copy(attrs.evolve(record, doc_loaded=True))
        if record.handle_hash is not None:
            self._by_hash[record.handle_hash] = record.id
        return evicted

    async def check_room(self, principal: str, limits: Limits) -> None:
        await trio.lowlevel.checkpoint()
        self._count("check_room")
        self._victims(principal, limits)

    def _victims(self, principal: str, limits: Limits) -> list[str]:
        """The sessions to evict to make room for one more (see :class:`Limits`); raises
        LimitExceeded when there is no room to make. Changes nothing."""
        evicted: list[str] = []
        scopes: list[tuple[str, int, str | None]] = [
            ("global", limits.max_sessions, None),
            (f"principal {principal!r}", limits.max_per_principal, principal),
        ]
        for scope, limit, who in scopes:
            while True:
                counted = [
                    r
                    for r in self._records.values()
                    if r.live
                    and r.id not in evicted
                    and (who is None or r.principal == who)
                    and r.due(limits.now, grace=limits.grace) is None
                ]
                if len(counted) < limit:
                    break
                idle = [
                    r
                    for r in counted
                    if limits.evict_before is not None
                    and r.state == LIVE
                    and r.last_active <= limits.evict_before
                    and (r.instance is None or r.instance == limits.instance)
                ]
                if not idle:
                    raise limits.exceeded(scope, limit)
                victim = min(idle, key=lambda r: (r.last_active, r.id))
                evicted.append(victim.id)
        return evicted

    def _get(self, session_id: str | None, known_version: int | None) -> SessionRecord | None:
        record = self._records.get(session_id) if session_id is not None else None
        if record is None:
            return None
        if known_version is not None and record.version == known_version:
            return _frozen_copy(record, with_doc=False)
        return _frozen_copy(record)

    async def load(
        self, session_id: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        self._count("load")
        return self._get(session_id, known_version)

    async def load_by_hash(
        self, handle_hash: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        self._count("load_by_hash")
        return self._get(self._by_hash.get(handle_hash), known_version)

    async def mark_ready(self, session_id: str, at: float) -> None:
        await trio.lowlevel.checkpoint()
        self._count("mark_ready", write=True)
        record = self._records.get(session_id)
        if record is not None and record.state == INITIALIZING:
            self._records[session_id] = attrs.evolve(record, state=LIVE, last_active=at)

    async def terminate(
        self, session_id: str, reason: TerminationReason, at: float, touch: Touch | None = None
    ) -> TerminationReason | None:
        await trio.lowlevel.checkpoint()
        self._count("terminate", write=True)
        record = self._records.get(session_id)
        if record is None:
            return None
        if not record.live:
            return record.termination_reason
        if touch is not None:
            record = _apply_touch(record, touch)
        self._records[session_id] = attrs.evolve(
            record, state=TERMINATED, reason=reason.value, terminated_at=at
        )
        return reason

    async def expire(
        self,
        session_id: str,
        now: float,
        *,
        grace: float = 0.0,
        unchanged_since: float | None = None,
    ) -> TerminationReason | None:
        await trio.lowlevel.checkpoint()
        self._count("expire", write=True)
        record = self._records.get(session_id)
        reason = record.due(now, grace=grace) if record is not None else None
        if (
            reason is None
            and record is not None
            and unchanged_since is not None
            and record.state == LIVE
            and record.last_active <= unchanged_since
        ):
            reason = TerminationReason.IDLE_TIMEOUT
        if record is None or reason is None:
            return None
        self._records[session_id] = attrs.evolve(
            record, state=TERMINATED, reason=reason.value, terminated_at=now
        )
        return reason

    async def patch_state(
        self,
        session_id: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None,
        at: float,
        max_bytes: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        self._count("patch_state", write=True)
        record = self._records.get(session_id)
        if record is None:
            raise SessionNotFound()
        if not record.live:
            raise gone(record.id, record.termination_reason)
        if if_version is not None and if_version != record.version:
            raise VersionConflict(if_version, record.version)
        doc = patched(dict(record.doc), dict(patch), max_bytes)
        version = record.version + 1
        self._records[session_id] = attrs.evolve(
            record, doc=doc, version=version, last_active=later_use(record.last_active, at, at)
        )
        return version, copy.deepcopy(doc)

    async def touch(self, touches: Sequence[Touch]) -> None:
        await trio.lowlevel.checkpoint()
        self._count("touch", write=True)
        for t in touches:
            record = self._records.get(t.id)
            if record is not None and record.live:
                self._records[t.id] = _apply_touch(record, t)

    async def list_by_principal(
        self,
        principal: str,
        *,
        include_terminated: bool = False,
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        self._count("list_by_principal")
        found = sorted(
            (
                r
                for r in self._records.values()
                if r.principal == principal
                and (include_terminated or r.live)
                and (after is None or (r.created_at, r.id) > after)
            ),
            key=lambda r: (r.created_at, r.id),
        )
        return [_frozen_copy(r) for r in found[:limit]]

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        self._count("list_recent")
        ordered = sorted(self._records.values(), key=lambda r: (-r.last_active, r.id))
        return [_frozen_copy(r) for r in ordered[: max(0, limit)]]

    async def counts(self) -> dict[tuple[str, str], int]:
        await trio.lowlevel.checkpoint()
        self._count("counts")
        result: dict[tuple[str, str], int] = {}
        for r in self._records.values():
            result[(r.state, r.kind)] = result.get((r.state, r.kind), 0) + 1
        return result

    async def sweep(
        self,
        now: float,
        limit: int = 1000,
        *,
        grace: float = 0.0,
        holder: str | None = None,
        lease: float = 0.0,
    ) -> list[tuple[str, TerminationReason]]:
        await trio.lowlevel.checkpoint()
        self._count("sweep")
        due = [
            (r, reason)
            for r in self._records.values()
            if (reason := r.due(now, grace=grace)) is not None
        ][: max(0, limit)]
        if not due:
            return []
        if holder is not None:
            held = self._sweep_lease
            # (a lease ending beyond a whole lease from now predates a backward step)
            if held is not None and held[0] != holder and now < held[1] <= now + lease:
                return []  # another process sweeps this interval
            self._sweep_lease = (holder, now + lease)
        self._writes += 1
        for record, reason in due:
            self._records[record.id] = attrs.evolve(
                record, state=TERMINATED, reason=reason.value, terminated_at=now
            )
        return [(r.id, reason) for r, reason in due]

    async def purge(self, before: float) -> int:
        await trio.lowlevel.checkpoint()
        self._count("purge")
        doomed = [
            r
            for r in self._records.values()
            if not r.live and r.terminated_at is not None and r.terminated_at < before
        ]
        self._writes += bool(doomed)
        for r in doomed:
            del self._records[r.id]
            if r.handle_hash is not None:
                self._by_hash.pop(r.handle_hash, None)
        return len(doomed)

    async def register_instance(self, instance: InstanceRecord) -> None:
        await trio.lowlevel.checkpoint()
        self._count("register_instance", write=True)
        self._instances[instance.id] = instance

    async def heartbeat(self, instance_id: str, at: float, lease_until: float) -> bool:
        await trio.lowlevel.checkpoint()
        self._count("heartbeat", write=True)
        instance = self._instances.get(instance_id)
        if instance is None:
            return False
        self._instances[instance_id] = attrs.evolve(
            instance, heartbeat_at=at, lease_until=lease_until
        )
        return True

    async def remove_instance(self, instance_id: str, at: float) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._count("remove_instance", write=True)
        self._instances.pop(instance_id, None)
        return self._end_connections({instance_id}, at)

    async def list_instances(self) -> list[InstanceRecord]:
        await trio.lowlevel.checkpoint()
        self._count("list_instances")
        return sorted(self._instances.values(), key=lambda i: (i.started_at, i.id))

    async def reap_instances(self, before: float, at: float) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._count("reap_instances")
        gone_ids = {i.id for i in self._instances.values() if i.lease_until < before}
        if not gone_ids:
            return []
        self._writes += 1
        for instance_id in gone_ids:
            del self._instances[instance_id]
        return self._end_connections(gone_ids, at)

    def _end_connections(self, instance_ids: set[str], at: float) -> list[str]:
        ended = []
        for r in list(self._records.values()):
            if r.live and r.instance in instance_ids:
                self._records[r.id] = attrs.evolve(
                    r,
                    state=TERMINATED,
                    reason=TerminationReason.DISCONNECTED.value,
                    terminated_at=at,
                )
                ended.append(r.id)
        return ended

    async def health(self) -> StoreHealth:
        start = time.perf_counter()
        await trio.lowlevel.checkpoint()
        self._count("health")
        return StoreHealth(backend=self.backend, ok=True, latency_s=time.perf_counter() - start)

    async def check(self, now: float) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._count("check")
        problems = [
            lapsed_instance_problem(i)
            for i in sorted(self._instances.values(), key=lambda i: i.id)
            if i.lease_until < now
        ]
        for r in sorted(self._records.values(), key=lambda r: r.id):
            if not r.live or r.instance is None:
                continue
            owner = self._instances.get(r.instance)
            if owner is None or owner.lease_until < now:
                lease_until = owner.lease_until if owner is not None else None
                problems.append(orphaned_session_problem(r.id, r.kind, r.instance, lease_until))
        return problems


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def lapsed_instance_problem(instance: InstanceRecord) -> str:
    """What :meth:`SessionStore.check` says of an instance whose lease lapsed."""
    return (
        f"instance {instance.id} ({instance.host}, pid {instance.pid}) "
        f"lease lapsed at {_iso(instance.lease_until)}"
    )


def orphaned_session_problem(
    session_id: str, kind: str, instance_id: str, lease_until: float | None
) -> str:
    """What :meth:`SessionStore.check` says of a live session whose instance is gone.

    ``lease_until`` is None when no instance of that id is registered.
    """
    if lease_until is None:
        return f"session {session_id} ({kind}) belongs to unknown instance {instance_id}"
    return (
        f"session {session_id} ({kind}) belongs to instance {instance_id} "
        f"whose lease lapsed at {_iso(lease_until)}"
    )


def _apply_touch(record: SessionRecord, touch: Touch) -> SessionRecord:
    return attrs.evolve(
        record,
        last_active=later_use(record.last_active, touch.last_active, touch.now),
        requests=record.requests + touch.requests,
        errors=record.errors + touch.errors,
        expires_at=record.expires_at if touch.expires_at is None else touch.expires_at,
    )


def _frozen_copy(record: SessionRecord, *, with_doc: bool = True) -> SessionRecord:
    # Records are frozen, but their mappings are not: hand out deep copies so
    # a caller can never change what the store holds.
    return attrs.evolve(
        record,
        client=copy.deepcopy(dict(record.client)),
        metadata=copy.deepcopy(dict(record.metadata)),
        doc=copy.deepcopy(dict(record.doc)) if with_doc else {},
        doc_loaded=with_doc,
    )
