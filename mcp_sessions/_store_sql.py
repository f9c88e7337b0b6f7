"""What the SQL stores share: the schema, the migrations, the queries, the row codec.

Theory of operation
===================

:class:`SQLStoreBase` implements every :class:`~mcp_sessions._store.SessionStore`
operation as a *synchronous* function of a DB-API cursor that is already inside
a transaction; a backend supplies :meth:`SQLStoreBase._run`, which runs such a
function in a worker thread, in one transaction, bounded in time, and turns
driver failures into :class:`~mcp_sessions._store.StoreUnavailable`. The SQL
is written once with ``%s`` placeholders; a :class:`Dialect` says how the two
databases differ (placeholders, JSON columns, row locks, ``GREATEST``).

Every state change that must happen once across processes is a conditional
``UPDATE ... WHERE state <> 'terminated'``: whoever's update matches the row
ended it; everyone else reads the winner's reason. Patches are a
read-modify-write under a lock (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ...
FOR UPDATE`` on PostgreSQL), so versions never skip or repeat.

A row that cannot be decoded (bad JSON, wrong types, an unknown state) is
logged on the ``mcp_sessions.store`` logger and treated as absent; it is never
raised to the caller.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import trio

from ._errors import SessionError, SessionNotFound, VersionConflict, gone
from ._jsonmerge import merge_patch
from ._state import TerminationReason
from ._store import (
    INITIALIZING,
    LIVE,
    RECORD_STATES,
    TERMINATED,
    SchemaTooNew,
    SessionRecord,
    StoreError,
    StoreHealth,
    StoreUnavailable,
    Touch,
)

__all__ = ["COLUMNS", "LATEST_SCHEMA", "Dialect", "SQLStoreBase", "decode_record", "redact_url"]

logger = logging.getLogger("mcp_sessions.store")

T = TypeVar("T")

COLUMNS = (
    "id",
    "handle_hash",
    "kind",
    "principal",
    "client",
    "metadata",
    "state",
    "reason",
    "doc",
    "version",
    "created_at",
    "last_active",
    "idle_timeout",
    "expires_at",
    "terminated_at",
    "requests",
    "errors",
)
_COLS = ", ".join(COLUMNS)
_JSON_COLUMNS = frozenset({"client", "metadata", "doc"})

#: A live session whose absolute or idle deadline has passed; params: now, now.
_DUE = (
    f"state <> '{TERMINATED}' AND (expires_at <= %s "
    f"OR (state = '{LIVE}' AND last_active + idle_timeout <= %s))"
)
#: The reason a due session ends with (lifetime wins, as in SessionRecord.due); param: now.
_REASON = (
    f"CASE WHEN expires_at <= %s THEN '{TerminationReason.LIFETIME_EXCEEDED.value}' "
    f"ELSE '{TerminationReason.IDLE_TIMEOUT.value}' END"
)


@attrs.frozen(kw_only=True)
class Dialect:
    """How one SQL database differs from the SQL written here."""

    name: str
    #: Placeholder that replaces ``%s``.
    param: str
    #: True when JSON columns come back as text to be parsed.
    json_text: bool
    #: Wraps a Python JSON value for binding to a JSON column.
    json_param: Callable[[Any], Any]
    #: Type of JSON columns in DDL.
    json_type: str
    #: Appended to ``SELECT`` in a read-modify-write (row lock), or "".
    for_update: str
    #: Name of the two-argument maximum function.
    greatest: str
    #: Appended to the ``id`` column type (a bytewise collation, so ordering matches Python's).
    id_collation: str

    def q(self, sql: str) -> str:
        return sql if self.param == "%s" else sql.replace("%s", self.param)


#: Forward-only migrations: (version, statements). Never edit a released entry; append.
def migrations(d: Dialect) -> list[tuple[int, list[str]]]:
    j = d.json_type
    return [
        (
            1,
            [
                f"""CREATE TABLE sessions (
                    id TEXT {d.id_collation} PRIMARY KEY,
                    handle_hash TEXT UNIQUE,
                    kind TEXT NOT NULL,
                    principal TEXT NOT NULL,
                    client {j} NOT NULL,
                    metadata {j} NOT NULL,
                    state TEXT NOT NULL,
                    reason TEXT,
                    doc {j} NOT NULL,
                    version BIGINT NOT NULL DEFAULT 0,
                    created_at DOUBLE PRECISION NOT NULL,
                    last_active DOUBLE PRECISION NOT NULL,
                    idle_timeout DOUBLE PRECISION NOT NULL,
                    expires_at DOUBLE PRECISION NOT NULL,
                    terminated_at DOUBLE PRECISION,
                    requests BIGINT NOT NULL DEFAULT 0,
                    errors BIGINT NOT NULL DEFAULT 0
                )""",
                "CREATE INDEX sessions_principal ON sessions (principal, created_at)",
                f"CREATE INDEX sessions_live_expires ON sessions (expires_at) "
                f"WHERE state <> '{TERMINATED}'",
                f"CREATE INDEX sessions_idle_deadline ON sessions ((last_active + idle_timeout)) "
                f"WHERE state = '{LIVE}'",
                f"CREATE INDEX sessions_ended ON sessions (terminated_at) "
                f"WHERE state = '{TERMINATED}'",
                "CREATE INDEX sessions_last_active ON sessions (last_active)",
            ],
        ),
    ]


#: The schema version this code writes and understands.
LATEST_SCHEMA = 1

SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


def schema_too_new_message(where: str, found: int) -> str:
    return (
        f"{where} has schema version {found}, but this mcp-sessions knows versions up to "
        f"{LATEST_SCHEMA}: upgrade mcp-sessions (the store was left untouched)"
    )


def to_reason(value: str | None) -> TerminationReason | None:
    if value is None:
        return None
    try:
        return TerminationReason(value)
    except ValueError:
        return TerminationReason.ERROR


class _Undecodable(Exception):
    pass


def _json_obj(value: Any, column: str, json_text: bool) -> dict[str, Any]:
    if json_text:
        if not isinstance(value, str | bytes):
            raise _Undecodable(f"{column} is not JSON text")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Undecodable(f"{column} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Undecodable(f"{column} is not a JSON object")
    return value


def _num(value: Any, column: str, *, optional: bool = False) -> float:
    if value is None and optional:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Undecodable(f"{column} is not a number")
    return float(value)


def _int(value: Any, column: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Undecodable(f"{column} is not an integer")
    return value


def _str(value: Any, column: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return None  # type: ignore[return-value]
    if not isinstance(value, str):
        raise _Undecodable(f"{column} is not text")
    return value


def decode_record(row: Sequence[Any], *, json_text: bool, backend: str) -> SessionRecord | None:
    """A :class:`SessionRecord` from a row of :data:`COLUMNS`, or None (logged) if it is bad."""
    raw = dict(zip(COLUMNS, row, strict=True))
    try:
        state = _str(raw["state"], "state")
        if state not in RECORD_STATES:
            raise _Undecodable(f"unknown state {state!r}")
        return SessionRecord(
            id=_str(raw["id"], "id"),
            handle_hash=_str(raw["handle_hash"], "handle_hash", optional=True),
            kind=_str(raw["kind"], "kind"),
            principal=_str(raw["principal"], "principal"),
            client=_json_obj(raw["client"], "client", json_text),
            metadata=_json_obj(raw["metadata"], "metadata", json_text),
            state=state,
            reason=_str(raw["reason"], "reason", optional=True),
            doc=_json_obj(raw["doc"], "doc", json_text),
            version=_int(raw["version"], "version"),
            created_at=_num(raw["created_at"], "created_at"),
            last_active=_num(raw["last_active"], "last_active"),
            idle_timeout=_num(raw["idle_timeout"], "idle_timeout"),
            expires_at=_num(raw["expires_at"], "expires_at"),
            terminated_at=_num(raw["terminated_at"], "terminated_at", optional=True),
            requests=_int(raw["requests"], "requests"),
            errors=_int(raw["errors"], "errors"),
        )
    except _Undecodable as exc:
        logger.error(
            "%s store: skipping undecodable session row %r: %s", backend, raw.get("id"), exc
        )
        return None


class SQLStoreBase:
    """The store operations over a DB-API cursor, run in worker threads.

    Subclasses provide :meth:`_in_thread` (one transaction on a connection of
    theirs) and :meth:`_map_error` (their driver's failures as
    :class:`StoreUnavailable`); the bounding by ``op_timeout`` and the
    abandon-then-roll-back handshake are shared here.
    """

    backend: str
    durable = True
    dialect: Dialect
    op_timeout: float
    #: How the store names itself in errors and logs (no password).
    _where: str
    _limiter: trio.CapacityLimiter

    def _in_thread(self, fn: Callable[[Any], T], write: bool, abandoned: threading.Event) -> T:
        """Run ``fn(cursor)`` in one transaction; roll back if ``abandoned`` is set by then."""
        raise NotImplementedError

    def _map_error(self, exc: Exception) -> Exception | None:
        """The :class:`StoreUnavailable` a driver failure stands for, or None to let it through."""
        raise NotImplementedError

    def _apply_migrations(self, cur: Any) -> None:
        """Bring the schema up to date inside the caller's (locked) transaction.

        Forward only; a schema newer than this code raises :class:`SchemaTooNew`
        and touches nothing.
        """
        cur.execute(SCHEMA_VERSION_DDL)
        cur.execute("SELECT MAX(version) FROM schema_version")
        row = cur.fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > LATEST_SCHEMA:
            raise SchemaTooNew(schema_too_new_message(self._where, current))
        insert = self._q("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)")
        for version, statements in migrations(self.dialect):
            if version <= current:
                continue
            for stmt in statements:
                cur.execute(stmt)
            cur.execute(insert, (version, time.time()))

    async def _call(self, fn: Callable[[], T], what: str, *, bounded: bool = True) -> T:
        """Run ``fn`` in a worker thread (bounded by ``op_timeout``), mapping failures."""
        try:
            if not bounded:
                # Bounded by the driver's own timeouts; never abandoned, so
                # nothing it creates can leak from a thread nobody waits for.
                return await trio.to_thread.run_sync(fn, limiter=self._limiter)
            with trio.fail_after(self.op_timeout):
                return await trio.to_thread.run_sync(
                    fn, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise StoreUnavailable(
                f"{self._where}: {what} did not finish within {self.op_timeout:g}s"
            ) from None
        except (SessionError, SchemaTooNew):
            raise
        except Exception as exc:
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def _run(self, fn: Callable[[Any], T], *, write: bool) -> T:
        """Run ``fn(cursor)`` in one transaction in a worker thread; commit if it returns."""
        abandoned = threading.Event()
        try:
            return await self._call(lambda: self._in_thread(fn, write, abandoned), "operation")
        finally:
            # If the caller gave up (timeout or cancellation), the thread rolls back.
            abandoned.set()

    # -- helpers -----------------------------------------------------------

    def _q(self, sql: str) -> str:
        return self.dialect.q(sql)

    def _decode(self, row: Sequence[Any] | None) -> SessionRecord | None:
        if row is None:
            return None
        return decode_record(row, json_text=self.dialect.json_text, backend=self.backend)

    def _decode_all(self, rows: Sequence[Sequence[Any]]) -> list[SessionRecord]:
        return [r for r in map(self._decode, rows) if r is not None]

    def _is_duplicate(self, exc: BaseException) -> bool:
        raise NotImplementedError

    # -- operations --------------------------------------------------------

    async def health(self) -> StoreHealth:
        """Round trip to the schema table: reachability, latency, schema version."""
        start = time.perf_counter()

        def op(cur: Any) -> int:
            cur.execute("SELECT MAX(version) FROM schema_version")
            row = cur.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        try:
            version = await self._run(op, write=False)
        except Exception as exc:
            return StoreHealth(backend=self.backend, ok=False, error=str(exc))
        return StoreHealth(
            backend=self.backend,
            ok=True,
            latency_s=time.perf_counter() - start,
            schema_version=version,
        )

    async def create(self, record: SessionRecord) -> None:
        jp = self.dialect.json_param
        values = [
            jp(dict(v)) if c in _JSON_COLUMNS else v
            for c, v in ((c, getattr(record, c)) for c in COLUMNS)
        ]
        sql = self._q(f"INSERT INTO sessions ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))})")

        def op(cur: Any) -> None:
            cur.execute(sql, values)

        try:
            await self._run(op, write=True)
        except Exception as exc:
            if self._is_duplicate(exc):
                raise StoreError(f"duplicate session {record.id}") from None
            raise

    async def load(self, session_id: str) -> SessionRecord | None:
        sql = self._q(f"SELECT {_COLS} FROM sessions WHERE id = %s")

        def op(cur: Any) -> SessionRecord | None:
            cur.execute(sql, (session_id,))
            return self._decode(cur.fetchone())

        return await self._run(op, write=False)

    async def load_by_hash(self, handle_hash: str) -> SessionRecord | None:
        sql = self._q(f"SELECT {_COLS} FROM sessions WHERE handle_hash = %s")

        def op(cur: Any) -> SessionRecord | None:
            cur.execute(sql, (handle_hash,))
            return self._decode(cur.fetchone())

        return await self._run(op, write=False)

    async def mark_ready(self, session_id: str, at: float) -> None:
        sql = self._q(
            f"UPDATE sessions SET state = '{LIVE}', last_active = %s "
            f"WHERE id = %s AND state = '{INITIALIZING}'"
        )

        def op(cur: Any) -> None:
            cur.execute(sql, (at, session_id))

        await self._run(op, write=True)

    async def terminate(
        self, session_id: str, reason: TerminationReason, at: float, touch: Touch | None = None
    ) -> TerminationReason | None:
        g = self.dialect.greatest
        end = self._q(
            f"UPDATE sessions SET state = '{TERMINATED}', reason = %s, terminated_at = %s, "
            f"last_active = {g}(last_active, COALESCE(%s, last_active)), "
            "requests = requests + %s, errors = errors + %s "
            f"WHERE id = %s AND state <> '{TERMINATED}' RETURNING id"
        )
        read = self._q("SELECT reason FROM sessions WHERE id = %s")
        params = (
            reason.value,
            at,
            touch.last_active if touch is not None else None,
            touch.requests if touch is not None else 0,
            touch.errors if touch is not None else 0,
            session_id,
        )

        def op(cur: Any) -> tuple[bool, TerminationReason | None]:
            cur.execute(end, params)
            if cur.fetchall():
                return True, reason
            cur.execute(read, (session_id,))
            row = cur.fetchone()
            return False, (to_reason(row[0]) if row is not None else None)

        _ended, result = await self._run(op, write=True)
        return result

    async def expire(self, session_id: str, now: float) -> TerminationReason | None:
        sql = self._q(
            f"UPDATE sessions SET state = '{TERMINATED}', reason = {_REASON}, terminated_at = %s "
            f"WHERE id = %s AND {_DUE} RETURNING reason"
        )

        def op(cur: Any) -> TerminationReason | None:
            cur.execute(sql, (now, now, session_id, now, now))
            rows = cur.fetchall()
            return to_reason(rows[0][0]) if rows else None

        return await self._run(op, write=True)

    async def patch_state(
        self, session_id: str, patch: Mapping[str, Any], *, if_version: int | None, at: float
    ) -> tuple[int, dict[str, Any]]:
        read = self._q(
            "SELECT state, reason, doc, version FROM sessions WHERE id = %s"
            + self.dialect.for_update
        )
        write = self._q(
            f"UPDATE sessions SET doc = %s, version = %s, "
            f"last_active = {self.dialect.greatest}(last_active, %s) WHERE id = %s"
        )
        patch_obj = dict(patch)

        def op(cur: Any) -> tuple[int, dict[str, Any]]:
            cur.execute(read, (session_id,))
            row = cur.fetchone()
            if row is None:
                raise SessionNotFound()
            state, reason, raw_doc, version = row
            try:
                doc = _json_obj(raw_doc, "doc", self.dialect.json_text)
            except _Undecodable as exc:
                logger.error(
                    "%s store: undecodable state of session %r: %s", self.backend, session_id, exc
                )
                raise SessionNotFound() from None
            if state == TERMINATED:
                raise gone(session_id, to_reason(reason))
            if if_version is not None and if_version != version:
                raise VersionConflict(if_version, version)
            new_doc = merge_patch(doc, patch_obj)
            new_version = int(version) + 1
            cur.execute(write, (self.dialect.json_param(new_doc), new_version, at, session_id))
            return new_version, new_doc

        return await self._run(op, write=True)

    async def touch(self, touches: Sequence[Touch]) -> None:
        if not touches:
            return
        sql = self._q(
            f"UPDATE sessions SET last_active = {self.dialect.greatest}(last_active, %s), "
            f"requests = requests + %s, errors = errors + %s "
            f"WHERE id = %s AND state <> '{TERMINATED}'"
        )
        # A stable order keeps two processes' batches from deadlocking on row locks.
        params = [
            (t.last_active, t.requests, t.errors, t.id) for t in sorted(touches, key=lambda t: t.id)
        ]

        def op(cur: Any) -> None:
            cur.executemany(sql, params)

        await self._run(op, write=True)

    async def list_by_principal(
        self, principal: str, *, include_terminated: bool = False
    ) -> list[SessionRecord]:
        live = "" if include_terminated else f" AND state <> '{TERMINATED}'"
        sql = self._q(
            f"SELECT {_COLS} FROM sessions WHERE principal = %s{live} ORDER BY created_at, id"
        )

        def op(cur: Any) -> list[SessionRecord]:
            cur.execute(sql, (principal,))
            return self._decode_all(cur.fetchall())

        return await self._run(op, write=False)

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        sql = self._q(f"SELECT {_COLS} FROM sessions ORDER BY last_active DESC, id LIMIT %s")

        def op(cur: Any) -> list[SessionRecord]:
            cur.execute(sql, (max(0, limit),))
            return self._decode_all(cur.fetchall())

        return await self._run(op, write=False)

    async def counts(self) -> dict[tuple[str, str], int]:
        sql = "SELECT state, kind, COUNT(*) FROM sessions GROUP BY state, kind"

        def op(cur: Any) -> dict[tuple[str, str], int]:
            cur.execute(sql)
            return {(str(s), str(k)): int(n) for s, k, n in cur.fetchall()}

        return await self._run(op, write=False)

    def _sweep_sql(self) -> tuple[str, Callable[[float, int], tuple[Any, ...]]]:
        raise NotImplementedError

    async def sweep(self, now: float, limit: int = 1000) -> list[tuple[str, TerminationReason]]:
        if limit <= 0:
            return []
        sql, params = self._sweep_sql()

        def op(cur: Any) -> list[tuple[str, TerminationReason]]:
            cur.execute(sql, params(now, limit))
            ended = []
            for session_id, reason in cur.fetchall():
                why = to_reason(reason)
                assert why is not None
                ended.append((str(session_id), why))
            return ended

        return await self._run(op, write=True)

    async def purge(self, before: float) -> int:
        sql = self._q(f"DELETE FROM sessions WHERE state = '{TERMINATED}' AND terminated_at < %s")

        def op(cur: Any) -> int:
            cur.execute(sql, (before,))
            return int(cur.rowcount)

        return await self._run(op, write=True)


#: Sweep building blocks for the backends.
DUE = _DUE
REASON = _REASON


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and health reports).

    Handles ``scheme://user:password@host/...`` and libpq keyword strings
    (``password=...``) as well as a ``password`` query parameter.
    """
    if "://" in url:
        url = re.sub(r"(://[^/@:]*:)([^@/]*)@", r"\1***@", url)
        return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)
    return re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
