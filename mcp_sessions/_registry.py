"""The registry: live sessions by id, by handle hash and by principal; idle order; tombstones.

Theory of operation
===================

A passive index, written only through its methods, by the supervisor (add,
remove) and the lifecycle (the idle order). It answers the questions
admission and lookups ask, in O(1):

- which session has this public id / this handle hash;
- how many live sessions there are, in all and per principal;
- which IDLE session has been idle longest, in all or for one principal
  (kept only when eviction needs it);
- what is remembered of an ended session (a :class:`Tombstone`) until
  ``retention`` runs out, so late use says "expired"/"closed" rather than
  "unknown".

"Live" here means registered: from creation until the session's task has
finished its teardown (TERMINATING sessions still hold their slot).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from ._session import Session, SessionKind
from ._state import SessionState, TerminationReason

__all__ = ["Registry", "Tombstone"]


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
        return SessionState.TERMINATED


class Registry:
    """Every registered session, and the tombstones of ended ones."""

    def __init__(self, *, track_idle: bool, retention: float) -> None:
        self._by_id: dict[str, Session] = {}
        self._by_hash: dict[str, Session] = {}
        self._per_principal: dict[str, int] = {}
        # IDLE sessions in the order they became idle (oldest first), in all
        # and per principal: only eviction needs them.
        self._track_idle = track_idle
        self._idle: dict[Session, None] = {}
        self._idle_by_principal: dict[str, dict[Session, None]] = {}
        self._retention = retention
        self._tombstones: dict[str, Tombstone] = {}
        self._tombstones_by_hash: dict[str, Tombstone] = {}
        self._tombstone_fifo: deque[tuple[float, str]] = deque()

    # -- sessions ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def add(self, session: Session) -> None:
        self._by_id[session.id] = session
        if session.handle_hash is not None:
            self._by_hash[session.handle_hash] = session
        self._per_principal[session.principal] = self._per_principal.get(session.principal, 0) + 1

    def remove(self, session: Session, *, terminated_at: float, now: float) -> None:
        """Drop a session and leave its tombstone (``now`` on trio's clock)."""
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
        if session.handle_hash is not None and self._by_hash.get(session.handle_hash) is session:
            del self._by_hash[session.handle_hash]
        remaining = self._per_principal[session.principal] - 1
        if remaining:
            self._per_principal[session.principal] = remaining
        else:
            del self._per_principal[session.principal]
        self.idle_left(session)
        if self._retention > 0:
            tomb = Tombstone(  # positional: one is made per ended session
                session.id,
                session.kind,
                session.principal,
                session.reason,
                terminated_at,
                session.handle_hash,
            )
            self._tombstones[tomb.id] = tomb
            if tomb.handle_hash is not None:
                self._tombstones_by_hash[tomb.handle_hash] = tomb
            self._tombstone_fifo.append((now + self._retention, tomb.id))

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def by_hash(self, handle_hash: str) -> Session | None:
        return self._by_hash.get(handle_hash)

    def count_for(self, principal: str) -> int:
        return self._per_principal.get(principal, 0)

    # -- idle order (eviction) ----------------------------------------------------

    def idle_entered(self, session: Session) -> None:
        if self._track_idle:
            self._idle[session] = None
            per = self._idle_by_principal.get(session.principal)
            if per is None:
                per = self._idle_by_principal[session.principal] = {}
            per[session] = None

    def idle_left(self, session: Session) -> None:
        if self._track_idle and session in self._idle:
            del self._idle[session]
            per = self._idle_by_principal[session.principal]
            del per[session]
            if not per:
                del self._idle_by_principal[session.principal]

    def longest_idle(self, principal: str | None = None) -> Session | None:
        """The session idle longest, in all or of one principal (eviction only)."""
        order = self._idle if principal is None else self._idle_by_principal.get(principal)
        return next(iter(order), None) if order else None

    # -- tombstones ----------------------------------------------------------------

    def tombstone(self, session_id: str) -> Tombstone | None:
        return self._tombstones.get(session_id)

    def tombstone_by_hash(self, handle_hash: str) -> Tombstone | None:
        return self._tombstones_by_hash.get(handle_hash)

    def tombstones(self) -> list[Tombstone]:
        return list(self._tombstones.values())

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def purge_tombstones(self, now: float) -> None:
        """Forget tombstones whose retention ran out by ``now`` (trio's clock)."""
        fifo = self._tombstone_fifo
        while fifo and fifo[0][0] <= now:
            _, session_id = fifo.popleft()
            tomb = self._tombstones.pop(session_id, None)
            hashed = tomb.handle_hash if tomb is not None else None
            if hashed is not None and self._tombstones_by_hash.get(hashed) is tomb:
                del self._tombstones_by_hash[hashed]

    # -- invariants ------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if the indexes disagree."""
        per: dict[str, int] = {}
        for sid, session in self._by_id.items():
            assert session.id == sid, f"{session} filed under {sid}"
            per[session.principal] = per.get(session.principal, 0) + 1
            if session.handle_hash is not None:
                assert self._by_hash.get(session.handle_hash) is session, f"{session} hash"
            assert session.state is not SessionState.TERMINATED, f"{session} terminated"
        assert per == self._per_principal, f"per-principal counts {self._per_principal} != {per}"
        if self._track_idle:
            for session in self._idle:
                assert session.state is SessionState.IDLE, f"{session} in idle order"
            assert sum(map(len, self._idle_by_principal.values())) == len(self._idle)
