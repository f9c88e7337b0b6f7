"""Store synchronisation: one protocol between the runtime and where sessions are kept.

Theory of operation
===================

The supervisor talks to :class:`StoreSync` and never asks whether there is a
store. :class:`LocalSync` is the runtime alone (sessions live in this process
and die with it); :class:`~mcp_sessions._sync_store.DurableSync` keeps them in a
:class:`~mcp_sessions.SessionStore`, the source of truth shared by every
process that opens it. The sync component is the one writer of a session's
state document, its version, and its ``_sync`` record (what the store
knows of it).

The store path, as :class:`DurableSync` walks it:

- **Open, patch, close** are committed before the caller hears back: a
  patch is one write transaction; a close ends the record first (a
  ``closed`` that the store cannot record fails and the session stays open).
- **Naming a handle** (:meth:`resolve`) costs no round trip when nothing
  changed elsewhere: the store's ``change_epoch()`` (SQLite: ``PRAGMA
  data_version``) says whether anyone else wrote since this session was last
  checked. Otherwise one read, without the document unless its version
  moved. A close made anywhere is seen on the next use everywhere.
- **Activity** is written coalesced by the flusher task, at most once per
  session per ``touch_interval``, never from the request path.
- **Expiry** the scanner finds due is confirmed by the reconciler task (the
  session may be in use in another process); the sweeper task ends what
  nobody has loaded and purges old records.

Failures to reach the store surface as :class:`StoreUnavailable` where a
caller waits, and are logged and retried where nobody does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio

from ._clock import RuntimeClock
from ._errors import SessionNotFound, VersionConflict, gone
from ._jsonmerge import patched
from ._metrics import RuntimeMetrics
from ._registry import Registry
from ._session import Session
from ._state import SessionState, TerminationReason
from ._store import (
    INITIALIZING,
    LIVE,
    SessionRecord,
    SessionStore,
    StoreHealth,
)

__all__ = ["LocalSync", "StoreSync", "Task", "record_of"]

_S = SessionState

Task = tuple[str, Callable[[], Awaitable[None]]]


def record_of(
    session: Session, clock: RuntimeClock, *, ready: bool, instance: str | None = None
) -> SessionRecord:
    """The store record for a session as it is here now."""
    return SessionRecord(
        id=session.id,
        handle_hash=session.handle_hash,
        kind=session.kind.value,
        principal=session.principal,
        client=session.client.to_json(),
        metadata=dict(session.metadata),
        state=LIVE if ready else INITIALIZING,
        doc=dict(session._doc or {}),
        version=session._version,
        created_at=session.created_at,
        last_active=clock.wall_at(session.last_active_time),
        idle_timeout=session.idle_timeout,
        expires_at=clock.wall_at(session.lifetime_end),
        requests=session.requests,
        errors=session.errors,
        instance=instance,
    )


class StoreSync(Protocol):
    """What the supervisor needs from wherever sessions are kept."""

    #: True when handle sessions outlive this process (kept at shutdown).
    durable: bool
    #: The last store failure seen, until a store call succeeds again.
    error: str | None

    @property
    def instance_id(self) -> str | None:
        """This process's instance in the store, if it registered one."""
        ...

    @property
    def store(self) -> SessionStore | None: ...

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    def tasks(self) -> Sequence[Task]:
        """The background tasks to run in the supervisor's nursery."""
        ...

    async def check_room(self, principal: str) -> None:
        """Raise LimitExceeded if the store would refuse a new session now (before setup)."""
        ...

    async def created(self, session: Session, *, ready: bool) -> None:
        """Record a new session (committed on return); raises if it cannot."""
        ...

    def ready(self, session: Session) -> None:
        """A connection session finished its handshake."""
        ...

    def activity(self, session: Session) -> None:
        """A request started or finished (write it coalesced)."""
        ...

    async def resolve(self, digest: str, principal: str) -> Session:
        """The live session with this handle hash, checked, or the error to raise."""
        ...

    async def patch(
        self, session: Session, patch: Mapping[str, Any], if_version: int | None
    ) -> int: ...
    async def closing(self, session: Session, reason: TerminationReason) -> None:
        """About to end ``session`` on request: record it first (may raise for ``closed``)."""
        ...

    def has_end_to_write(self, session: Session) -> bool:
        """Whether :meth:`ended` has anything to do for this session."""
        ...

    async def ended(self, session: Session) -> None:
        """The session's task is finishing: write its end (bounded; never raises)."""
        ...

    def confirm_expiry(self, session: Session) -> bool:
        """The scanner found it due: True to end it now, False if the sync will confirm."""
        ...

    def confirming(self, session: Session) -> bool:
        """Whether the sync is confirming this session's expiry (it is unscheduled meanwhile)."""
        ...

    async def list_records(
        self, principal: str, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[SessionRecord]: ...
    async def health(self) -> StoreHealth | None: ...
    async def flush(self) -> None:
        """Write what is pending (shutdown)."""
        ...


def _patch_here(
    session: Session, patch: Mapping[str, Any], if_version: int | None, max_bytes: int | None
) -> int:
    """Apply a merge patch to the session's document in memory."""
    session.check_live()
    if if_version is not None and if_version != session._version:
        raise VersionConflict(if_version, session._version)
    session._doc = patched(session._doc or {}, dict(patch), max_bytes)
    session._version += 1
    return session._version


class _Base:
    """What both implementations share: local lookups and validation metrics."""

    def __init__(self, registry: Registry, metrics: RuntimeMetrics) -> None:
        self._registry = registry
        self._metrics = metrics

    def _validated(self, outcome: str) -> None:
        RuntimeMetrics.bump(self._metrics.handle_validations, outcome)

    def _resolve_here(self, digest: str, principal: str) -> Session:
        """Resolve from this process's sessions and tombstones alone."""
        session = self._registry.by_hash(digest)
        if session is not None and session.principal == principal:
            if session.live:
                self._validated("ok")
                return session
            self._validated("gone")
            raise gone(session.id, session.reason)
        tomb = self._registry.tombstone_by_hash(digest)
        if session is None and tomb is not None and tomb.principal == principal:
            self._validated("gone")
            raise gone(tomb.id, tomb.reason)
        self._validated("not_found")
        raise SessionNotFound()


class LocalSync(_Base):
    """No store: the runtime's memory is the only record."""

    durable = False
    error: str | None = None
    instance_id: str | None = None

    def __init__(
        self,
        registry: Registry,
        metrics: RuntimeMetrics,
        clock: RuntimeClock,
        max_state_bytes: int | None = None,
    ) -> None:
        super().__init__(registry, metrics)
        self._clock = clock
        self._max_state_bytes = max_state_bytes

    @property
    def store(self) -> SessionStore | None:
        return None

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def tasks(self) -> Sequence[Task]:
        return ()

    async def check_room(self, principal: str) -> None:
        pass

    async def created(self, session: Session, *, ready: bool) -> None:
        pass

    def ready(self, session: Session) -> None:
        pass

    def activity(self, session: Session) -> None:
        pass

    async def resolve(self, digest: str, principal: str) -> Session:
        return self._resolve_here(digest, principal)

    async def patch(
        self, session: Session, patch: Mapping[str, Any], if_version: int | None
    ) -> int:
        return _patch_here(session, patch, if_version, self._max_state_bytes)

    async def closing(self, session: Session, reason: TerminationReason) -> None:
        pass

    def has_end_to_write(self, session: Session) -> bool:
        return False

    async def ended(self, session: Session) -> None:
        pass

    def confirm_expiry(self, session: Session) -> bool:
        return True

    def confirming(self, session: Session) -> bool:
        return False

    async def list_records(
        self, principal: str, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[SessionRecord]:
        await trio.lowlevel.checkpoint()
        found = sorted(
            (
                s
                for s in self._registry
                if s.principal == principal
                and s.live
                and (after is None or (s.created_at, s.id) > after)
            ),
            key=lambda s: (s.created_at, s.id),
        )
        return [
            record_of(s, self._clock, ready=s.state is not _S.INITIALIZING) for s in found[:limit]
        ]

    async def health(self) -> StoreHealth | None:
        return None

    async def flush(self) -> None:
        pass
