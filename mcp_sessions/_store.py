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

Every backend implements :class:`SessionStore`; one contract test suite
(``tests/test_store_contract.py``) runs against all of them. Failures to reach
the store raise :class:`StoreUnavailable` (tool error ``store_unavailable``)
within a bounded time; a row that cannot be decoded is logged and treated as
absent.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from ._errors import SessionError, SessionNotFound, VersionConflict, gone
from ._jsonmerge import merge_patch
from ._state import TerminationReason

__all__ = [
    "LIVE",
    "TERMINATED",
    "MemoryStore",
    "SessionRecord",
    "SessionStore",
    "StoreError",
    "StoreHealth",
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
    version: int = 0
    created_at: float
    last_active: float
    idle_timeout: float
    expires_at: float
    terminated_at: float | None = None
    requests: int = 0
    errors: int = 0

    @property
    def live(self) -> bool:
        return self.state != TERMINATED

    @property
    def termination_reason(self) -> TerminationReason | None:
        try:
            return TerminationReason(self.reason) if self.reason is not None else None
        except ValueError:
            return TerminationReason.ERROR

    def due(self, now: float) -> TerminationReason | None:
        """The reason this live session should end at wall time ``now``, if any."""
        if not self.live:
            return None
        if self.expires_at <= now:
            return TerminationReason.LIFETIME_EXCEEDED
        if self.state == LIVE and self.last_active + self.idle_timeout <= now:
            return TerminationReason.IDLE_TIMEOUT
        return None


@attrs.frozen
class Touch:
    """Coalesced activity of one session since its last touch, written in batches.

    ``requests`` and ``errors`` are *increments* (several processes may serve
    one session, so each adds what it saw); ``last_active`` only moves forward.
    """

    id: str
    last_active: float
    requests: int = 0
    errors: int = 0


@attrs.frozen(kw_only=True)
class StoreHealth:
    """The store as last seen by :meth:`SessionStore.health`."""

    backend: str
    ok: bool
    latency_s: float | None = None
    error: str | None = None
    schema_version: int | None = None


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

    async def create(self, record: SessionRecord) -> None:
        """Insert a new record (committed when this returns)."""

    async def load(self, session_id: str) -> SessionRecord | None:
        """The record with this public id, or None (also for an undecodable row)."""

    async def load_by_hash(self, handle_hash: str) -> SessionRecord | None:
        """The record with this handle hash, or None."""

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

    async def expire(self, session_id: str, now: float) -> TerminationReason | None:
        """End the session if its idle or absolute deadline has passed at ``now``.

        Returns the reason if *this call* ended it, else None.
        """

    async def patch_state(
        self, session_id: str, patch: Mapping[str, Any], *, if_version: int | None, at: float
    ) -> tuple[int, dict[str, Any]]:
        """Apply an RFC 7386 merge patch in one transaction; return (new version, document).

        Raises :class:`VersionConflict` when ``if_version`` is not the current
        version, :class:`SessionExpired`/:class:`SessionClosed` for an ended
        session and :class:`SessionNotFound` for no record.
        """

    async def touch(self, touches: Sequence[Touch]) -> None:
        """Write coalesced activity (last active, counters) for live sessions, in one batch."""

    async def list_by_principal(
        self, principal: str, *, include_terminated: bool = False
    ) -> list[SessionRecord]:
        """The principal's sessions, oldest first."""

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        """Any principal's sessions, most recently active first (operators)."""

    async def counts(self) -> dict[tuple[str, str], int]:
        """Number of records by ``(state, kind)`` (operators)."""

    async def sweep(self, now: float, limit: int = 1000) -> list[tuple[str, TerminationReason]]:
        """End up to ``limit`` sessions whose deadline passed; return what *this call* ended."""

    async def purge(self, before: float) -> int:
        """Delete terminated records that ended before ``before``; return how many."""

    async def health(self) -> StoreHealth:
        """Reachability and round-trip latency. Never raises."""


class MemoryStore:
    """The in-process backend: the reference implementation of the contract.

    Not durable and not shared: fine for tests and for a single process that
    may forget its sessions on restart.
    """

    backend = "memory"
    durable = False

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._by_hash: dict[str, str] = {}

    async def open(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def create(self, record: SessionRecord) -> None:
        await trio.lowlevel.checkpoint()
        if record.id in self._records or (
            record.handle_hash is not None and record.handle_hash in self._by_hash
        ):
            raise StoreError(f"duplicate session {record.id}")
        self._records[record.id] = _frozen_copy(record)
        if record.handle_hash is not None:
            self._by_hash[record.handle_hash] = record.id

    async def load(self, session_id: str) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(session_id)
        return _frozen_copy(record) if record is not None else None

    async def load_by_hash(self, handle_hash: str) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        session_id = self._by_hash.get(handle_hash)
        return await self.load(session_id) if session_id is not None else None

    async def mark_ready(self, session_id: str, at: float) -> None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(session_id)
        if record is not None and record.state == INITIALIZING:
            self._records[session_id] = attrs.evolve(record, state=LIVE, last_active=at)

    async def terminate(
        self, session_id: str, reason: TerminationReason, at: float, touch: Touch | None = None
    ) -> TerminationReason | None:
        await trio.lowlevel.checkpoint()
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

    async def expire(self, session_id: str, now: float) -> TerminationReason | None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(session_id)
        reason = record.due(now) if record is not None else None
        if record is None or reason is None:
            return None
        self._records[session_id] = attrs.evolve(
            record, state=TERMINATED, reason=reason.value, terminated_at=now
        )
        return reason

    async def patch_state(
        self, session_id: str, patch: Mapping[str, Any], *, if_version: int | None, at: float
    ) -> tuple[int, dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        record = self._records.get(session_id)
        if record is None:
            raise SessionNotFound()
        if not record.live:
            raise gone(record.id, record.termination_reason)
        if if_version is not None and if_version != record.version:
            raise VersionConflict(if_version, record.version)
        doc = merge_patch(dict(record.doc), dict(patch))
        version = record.version + 1
        self._records[session_id] = attrs.evolve(
            record, doc=doc, version=version, last_active=max(record.last_active, at)
        )
        return version, copy.deepcopy(doc)

    async def touch(self, touches: Sequence[Touch]) -> None:
        await trio.lowlevel.checkpoint()
        for t in touches:
            record = self._records.get(t.id)
            if record is not None and record.live:
                self._records[t.id] = _apply_touch(record, t)

    async def list_by_principal(
        self, principal: str, *, include_terminated: bool = False
    ) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        found = [
            _frozen_copy(r)
            for r in self._records.values()
            if r.principal == principal and (include_terminated or r.live)
        ]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        ordered = sorted(self._records.values(), key=lambda r: (-r.last_active, r.id))
        return [_frozen_copy(r) for r in ordered[:limit]]

    async def counts(self) -> dict[tuple[str, str], int]:
        await trio.lowlevel.checkpoint()
        result: dict[tuple[str, str], int] = {}
        for r in self._records.values():
            result[(r.state, r.kind)] = result.get((r.state, r.kind), 0) + 1
        return result

    async def sweep(self, now: float, limit: int = 1000) -> list[tuple[str, TerminationReason]]:
        await trio.lowlevel.checkpoint()
        ended: list[tuple[str, TerminationReason]] = []
        for record in list(self._records.values()):
            if len(ended) >= limit:
                break
            reason = record.due(now)
            if reason is not None:
                self._records[record.id] = attrs.evolve(
                    record, state=TERMINATED, reason=reason.value, terminated_at=now
                )
                ended.append((record.id, reason))
        return ended

    async def purge(self, before: float) -> int:
        await trio.lowlevel.checkpoint()
        doomed = [
            r
            for r in self._records.values()
            if not r.live and r.terminated_at is not None and r.terminated_at < before
        ]
        for r in doomed:
            del self._records[r.id]
            if r.handle_hash is not None:
                self._by_hash.pop(r.handle_hash, None)
        return len(doomed)

    async def health(self) -> StoreHealth:
        start = time.perf_counter()
        await trio.lowlevel.checkpoint()
        return StoreHealth(backend=self.backend, ok=True, latency_s=time.perf_counter() - start)


def _apply_touch(record: SessionRecord, touch: Touch) -> SessionRecord:
    return attrs.evolve(
        record,
        last_active=max(record.last_active, touch.last_active),
        requests=record.requests + touch.requests,
        errors=record.errors + touch.errors,
    )


def _frozen_copy(record: SessionRecord) -> SessionRecord:
    # Records are frozen, but their mappings are not: hand out deep copies so
    # a caller can never change what the store holds.
    return attrs.evolve(
        record,
        client=copy.deepcopy(dict(record.client)),
        metadata=copy.deepcopy(dict(record.metadata)),
        doc=copy.deepcopy(dict(record.doc)),
    )
