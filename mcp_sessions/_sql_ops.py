"""The body of every store operation: a synchronous function of a cursor in a transaction.

:class:`Operations` knows the statements and the row codec and nothing about
threads, transactions or time limits: the worker (:mod:`._sql_worker`) runs
these bodies inside its transactions, and SQLite may run the reads directly on
its read-only connection. Every state change that must happen once across
processes is a conditional ``UPDATE ... WHERE state <> 'terminated'``:
whoever's update matches the row ended it; everyone else reads the winner's
reason. A patch is a read-modify-write of one row under the write lock
(SQLite) or a row lock (PostgreSQL), so versions never skip or repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ._errors import SessionNotFound, VersionConflict, gone
from ._expiry import due_params, idle_due_params
from ._jsonmerge import patched
from ._sql_codec import RowCodec, Undecodable
from ._sql_statements import Statements
from ._state import TerminationReason
from ._store import (
    TERMINATED,
    InstanceRecord,
    Limits,
    SessionRecord,
    Touch,
    future_bound,
    lapsed_instance_problem,
    orphaned_session_problem,
)

__all__ = ["Operations", "to_reason"]

logger = logging.getLogger("mcp_sessions.store")


def to_reason(value: str | None) -> TerminationReason | None:
    """The termination reason a column holds (an unknown one reads as ``error``)."""
    if value is None:
        return None
    try:
        return TerminationReason(value)
    except ValueError:
        return TerminationReason.ERROR


def _one(cur: Any) -> Any:
    # fetchall, not fetchone: the statement runs to its end and releases its snapshot.
    rows = cur.fetchall()
    return rows[0] if rows else None


class Operations:
    """Transaction bodies of every :class:`~mcp_sessions._store.SessionStore` operation."""

    def __init__(self, sql: Statements, codec: RowCodec, backend: str) -> None:
        self._sql = sql
        self._codec = codec
        self._backend = backend

    def create(
        self, cur: Any, *, row: Sequence[Any], principal: str, limits: Limits | None, lock_key: str
    ) -> list[str]:
        evicted = self._make_room(cur, principal, limits, lock_key) if limits else []
        cur.execute(self._sql.insert, row)
        return evicted

    def _make_room(self, cur: Any, principal: str, limits: Limits, lock_key: str) -> list[str]:
        """Count live sessions (global, then the principal's) under the write lock; evict or
        raise at a limit. Counting stops at the limit, so it costs O(limit), not O(rows)."""
        sql = self._sql
        if sql.admit_lock:
            cur.execute(sql.admit_lock, (lock_key,))
        due = due_params(limits.now, limits.grace)
        evicted: list[str] = []
        for scope, limit, who in _scopes(principal, limits):
            count_sql = sql.count_live_principal if who else sql.count_live
            victim_sql = sql.evict_victim_principal if who else sql.evict_victim
            while True:
                cur.execute(count_sql, (*who, *due, limit))
                if int(_one(cur)[0]) < limit:
                    break
                victim = None
                if limits.evict_before is not None:
                    cur.execute(victim_sql, (*who, limits.evict_before, limits.instance, *due))
                    victim = _one(cur)
                if victim is None:
                    raise limits.exceeded(scope, limit)
                self.terminate(
                    cur,
                    session_id=str(victim[0]),
                    reason=TerminationReason.EVICTED,
                    at=limits.now,
                    touch=None,
                )
                evicted.append(str(victim[0]))
        return evicted

    def check_room(self, cur: Any, *, principal: str, limits: Limits) -> None:
        """Raise LimitExceeded if an open would be refused now (a read: no lock, no eviction)."""
        sql = self._sql
        due = due_params(limits.now, limits.grace)
        for scope, limit, who in _scopes(principal, limits):
            cur.execute(sql.count_live_principal if who else sql.count_live, (*who, *due, limit))
            if int(_one(cur)[0]) < limit:
                continue
            if limits.evict_before is not None:
                victim_sql = sql.evict_victim_principal if who else sql.evict_victim
                cur.execute(victim_sql, (*who, limits.evict_before, limits.instance, *due))
                if _one(cur) is not None:
                    continue  # the insert will make room
            raise limits.exceeded(scope, limit)

    def load(
        self, cur: Any, *, key: str, by_hash: bool, known_version: int | None
    ) -> SessionRecord | None:
        cur.execute(
            self._sql.load_by_hash if by_hash else self._sql.load_by_id, (known_version, key)
        )
        return self._codec.record(_one(cur))

    def mark_ready(self, cur: Any, *, session_id: str, at: float) -> None:
        cur.execute(self._sql.mark_ready, (at, session_id))

    def terminate(
        self,
        cur: Any,
        *,
        session_id: str,
        reason: TerminationReason,
        at: float,
        touch: Touch | None,
    ) -> TerminationReason | None:
        cur.execute(
            self._sql.terminate,
            (
                reason.value,
                at,
                touch.last_active if touch is not None else None,
                touch.requests if touch is not None else 0,
                touch.errors if touch is not None else 0,
                session_id,
            ),
        )
        if cur.fetchall():
            return reason
        cur.execute(self._sql.reason_of, (session_id,))
        row = _one(cur)
        return to_reason(row[0]) if row is not None else None

    def expire(
        self,
        cur: Any,
        *,
        session_id: str,
        now: float,
        grace: float,
        unchanged_since: float | None,
    ) -> TerminationReason | None:
        cur.execute(self._sql.expire, (now, now, session_id, *due_params(now, grace)))
        row = _one(cur)
        if row is None and unchanged_since is not None:
            cur.execute(self._sql.expire_unchanged, (now, now, session_id, unchanged_since))
            row = _one(cur)
        return to_reason(row[0]) if row is not None else None

    def patch_state(
        self,
        cur: Any,
        *,
        session_id: str,
        patch: Mapping[str, Any],
        if_version: int | None,
        at: float,
        max_bytes: int | None,
    ) -> tuple[int, dict[str, Any]]:
        cur.execute(self._sql.patch_read, (session_id,))
        row = _one(cur)
        if row is None:
            raise SessionNotFound()
        state, reason, raw_doc, version = row
        try:
            doc = self._codec.document(raw_doc)
        except Undecodable as exc:
            logger.error(
                "%s store: undecodable state of session %r: %s", self._backend, session_id, exc
            )
            raise SessionNotFound() from None
        if state == TERMINATED:
            raise gone(session_id, to_reason(reason))
        if if_version is not None and if_version != version:
            raise VersionConflict(if_version, version)
        new_doc = patched(doc, dict(patch), max_bytes)
        new_version = int(version) + 1
        cur.execute(
            self._sql.patch_write,
            (self._codec.json_param(new_doc), new_version, future_bound(at), at, at, session_id),
        )
        return new_version, new_doc

    def touch(self, cur: Any, *, touches: Sequence[Touch]) -> None:
        # A stable order keeps two processes' batches from deadlocking on row locks.
        cur.executemany(
            self._sql.touch,
            [
                (
                    future_bound(t.now),
                    t.last_active,
                    t.last_active,
                    t.requests,
                    t.errors,
                    t.expires_at,
                    t.id,
                )
                for t in sorted(touches, key=_by_id)
            ],
        )

    def list_by_principal(
        self,
        cur: Any,
        *,
        principal: str,
        include_terminated: bool,
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[SessionRecord]:
        if after is None and limit is None:
            query = self._sql.list_all if include_terminated else self._sql.list_live
            cur.execute(query, (principal,))
        else:
            query = self._sql.list_all_page if include_terminated else self._sql.list_live_page
            start = after if after is not None else (float("-inf"), "")
            cur.execute(query, (principal, start[0], start[0], start[1], _page_size(limit)))
        return self._codec.records(cur.fetchall())

    def list_recent(self, cur: Any, *, limit: int) -> list[SessionRecord]:
        cur.execute(self._sql.list_recent, (max(0, limit),))
        return self._codec.records(cur.fetchall())

    def counts(self, cur: Any) -> dict[tuple[str, str], int]:
        cur.execute(self._sql.counts)
        return {(str(s), str(k)): int(n) for s, k, n in cur.fetchall()}

    def sweep_find(self, cur: Any, *, now: float, limit: int, grace: float) -> list[str]:
        """Ids of due sessions (a read: two index range scans)."""
        cur.execute(self._sql.sweep_find, (now, limit, *idle_due_params(now, grace), limit))
        return sorted(str(r[0]) for r in cur.fetchall())[:limit]

    def sweep(
        self,
        cur: Any,
        *,
        ids: Sequence[str],
        now: float,
        grace: float,
        lease: tuple[str, str, float] | None,
    ) -> list[tuple[str, TerminationReason]]:
        """End those of ``ids`` still due (under the sweep lease, if one is named)."""
        if lease is not None:
            name, holder, until = lease
            cur.execute(self._sql.lease_take, (name, holder, until, now))
            if not cur.fetchall():
                return []  # another process holds the lease: it sweeps this interval
        ended = []
        params = due_params(now, grace)
        for session_id in ids:
            cur.execute(self._sql.sweep_end, (now, now, session_id, *params))
            row = _one(cur)
            if row is not None:
                why = to_reason(row[1])
                assert why is not None
                ended.append((str(row[0]), why))
        return ended

    def purge_find(self, cur: Any, *, before: float) -> bool:
        cur.execute(self._sql.purge_find, (before,))
        return _one(cur) is not None

    def purge(self, cur: Any, *, before: float) -> int:
        cur.execute(self._sql.purge, (before,))
        return int(cur.rowcount)

    # -- instances ----------------------------------------------------------------

    def register_instance(self, cur: Any, *, instance: InstanceRecord) -> None:
        cur.execute(self._sql.instance_upsert, self._codec.instance_row(instance))

    def heartbeat(self, cur: Any, *, instance_id: str, at: float, lease_until: float) -> bool:
        cur.execute(self._sql.heartbeat, (at, lease_until, instance_id))
        return int(cur.rowcount) > 0

    def remove_instance(self, cur: Any, *, instance_id: str, at: float) -> list[str]:
        cur.execute(self._sql.instance_delete, (instance_id,))
        cur.execute(self._sql.reap_sessions, (at, instance_id))
        return sorted(str(r[0]) for r in cur.fetchall())

    def list_instances(self, cur: Any) -> list[InstanceRecord]:
        cur.execute(self._sql.instances)
        return self._codec.instances(cur.fetchall())

    def lapsed_instances(self, cur: Any, *, before: float) -> list[str]:
        cur.execute(self._sql.lapsed_instances, (before,))
        return sorted(str(r[0]) for r in cur.fetchall())

    def reap_instances(
        self, cur: Any, *, instance_ids: Sequence[str], before: float, at: float
    ) -> list[str]:
        ended: list[str] = []
        for instance_id in instance_ids:
            cur.execute(self._sql.instance_reap, (instance_id, before))
            if int(cur.rowcount) <= 0:
                continue  # renewed meanwhile, or another process reaped it
            cur.execute(self._sql.reap_sessions, (at, instance_id))
            ended.extend(str(r[0]) for r in cur.fetchall())
        return ended

    def schema_version(self, cur: Any) -> int:
        cur.execute(self._sql.schema_version)
        row = _one(cur)
        return int(row[0]) if row is not None and row[0] is not None else 0

    # -- check (read-only; what is wrong is reported, never raised) -----------------

    def check_integrity(self, cur: Any) -> list[str]:
        """The database's account of itself (SQLite's integrity_check), problems only."""
        if not self._sql.integrity_check:
            return []
        cur.execute(self._sql.integrity_check)
        return [f"integrity check: {r[0]}" for r in cur.fetchall() if str(r[0]) != "ok"]

    def check_sessions(
        self, cur: Any, *, after: tuple[Any] | None, limit: int
    ) -> tuple[list[str], tuple[Any] | None]:
        """Undecodable rows among the ``limit`` sessions next by id after ``after`` (a 1-tuple;
        None: from the first), and where to go on (None when the scan reached the end)."""
        if after is None:
            cur.execute(self._sql.scan_sessions, (limit,))
        else:
            cur.execute(self._sql.scan_sessions_after, (after[0], limit))
        rows = cur.fetchall()
        problems = []
        for row in rows:
            why = self._codec.decode_session(row)
            if isinstance(why, str):
                problems.append(f"session row {row[0]}: undecodable ({why})")
        return problems, ((rows[-1][0],) if len(rows) >= limit else None)

    def check_instances(self, cur: Any, *, now: float) -> list[str]:
        """Undecodable instance rows, then instances whose lease ended before ``now``, by id."""
        cur.execute(self._sql.instances)
        undecodable, lapsed = [], []
        for row in sorted(cur.fetchall(), key=_by_first):
            instance = self._codec.decode_instance(row)
            if isinstance(instance, str):
                undecodable.append(f"instance row {row[0]}: undecodable ({instance})")
            elif instance.lease_until < now:
                lapsed.append(lapsed_instance_problem(instance))
        return undecodable + lapsed

    def check_orphans(self, cur: Any, *, now: float) -> list[str]:
        """Live sessions of an unknown instance or of one whose lease ended before ``now``."""
        cur.execute(self._sql.orphaned_sessions, (now,))
        return [
            orphaned_session_problem(
                str(session_id), str(kind), str(instance), None if until is None else float(until)
            )
            for session_id, kind, instance, until in sorted(cur.fetchall(), key=_by_first)
        ]


def _scopes(principal: str, limits: Limits) -> list[tuple[str, int, tuple[Any, ...]]]:
    """(scope name, limit, the principal as a parameter or nothing), global first."""
    return [
        ("global", limits.max_sessions, ()),
        (f"principal {principal!r}", limits.max_per_principal, (principal,)),
    ]


def _by_id(touch: Touch) -> str:
    return touch.id


def _by_first(row: Sequence[Any]) -> str:
    return str(row[0])


def _page_size(limit: int | None) -> int:
    """A ``LIMIT`` for a page: ``None`` is every row (both engines take a 64-bit bound)."""
    return (1 << 62) if limit is None else max(0, limit)
