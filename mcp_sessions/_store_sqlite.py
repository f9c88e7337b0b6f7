"""The SQLite session store: embedded, durable, shared by the processes of one host.

Theory of operation
===================

One ``sqlite3`` connection per store, in WAL mode, used by one worker thread at a
time (a one-slot :class:`trio.CapacityLimiter`, plus a :class:`threading.Lock`
so a thread abandoned after a timeout and its successor never share the
connection). Every operation is one explicit transaction; writes start with
``BEGIN IMMEDIATE``, which takes the database's write lock up front, so
read-modify-writes (patches, ends, sweeps) of several processes serialise
instead of failing on upgrade. A writer waits up to ``busy_timeout`` for the
lock; every operation is bounded by ``op_timeout``. Failures of the database
(locked past the timeout, disk full, read-only, I/O error) raise
:class:`~mcp_sessions._store.StoreUnavailable`.

Durability: with ``synchronous="NORMAL"`` (the default) a committed write
survives the crash of any process (including ``kill -9``), but the last
transactions may be lost if the machine loses power or the OS crashes. With
``synchronous="FULL"`` every commit is fsynced and survives power loss too, at
the price of an fsync per write.

Several processes may share one database file on a local filesystem (not over
NFS: WAL needs shared memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

from ._store import SchemaTooNew, StoreUnavailable
from ._store_sql import (
    DUE,
    REASON,
    Dialect,
    SQLStoreBase,
)

__all__ = ["SQLiteStore", "default_sqlite_path"]

T = TypeVar("T")

SQLITE = Dialect(
    name="sqlite",
    param="?",
    json_text=True,
    json_param=lambda v: json.dumps(v, separators=(",", ":")),
    json_type="TEXT",
    for_update="",
    greatest="MAX",
    id_collation="",
)


def default_sqlite_path() -> Path:
    """``$XDG_STATE_HOME/mcp-sessions/sessions.db`` (``~/.local/state/...`` if unset)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "mcp-sessions" / "sessions.db"


class _Cancelled(Exception):
    pass


class SQLiteStore(SQLStoreBase):
    """Sessions in one SQLite file, shared by every process that opens it."""

    backend = "sqlite"
    durable = True
    dialect = SQLITE

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
        op_timeout: float = 10.0,
    ) -> None:
        sync = synchronous.upper()
        if sync not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.op_timeout = op_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._where = f"sqlite store {self.path}"
        # Set when the trio side gave up on the operation running now; the
        # progress handler then aborts its statement.
        self._abandoned: threading.Event | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, synchronous={self.synchronous!r})"

    # -- plumbing ----------------------------------------------------------

    def _progress(self) -> int:
        flag = self._abandoned
        return 1 if flag is not None and flag.is_set() else 0

    def _in_thread(self, fn: Callable[[Any], T], write: bool, abandoned: threading.Event) -> T:
        if not self._lock.acquire(timeout=self.op_timeout):
            raise _Cancelled("the store connection is still busy with an abandoned operation")
        try:
            if abandoned.is_set():
                raise _Cancelled("operation abandoned before it started")
            conn = self._conn
            if conn is None:
                raise StoreUnavailable(f"sqlite store {self.path} is not open")
            self._abandoned = abandoned
            cur = conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                result = fn(cur)
                if abandoned.is_set():
                    # The caller was told StoreUnavailable: do not commit behind its back.
                    raise _Cancelled("operation abandoned after its timeout")
                cur.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.rollback()
                raise
            finally:
                cur.close()
                self._abandoned = None
        finally:
            self._lock.release()

    def _map_error(self, exc: Exception) -> Exception | None:
        if isinstance(exc, _Cancelled):
            return StoreUnavailable(f"{self._where}: {exc}")
        if isinstance(
            exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError
        ):
            return None  # our bug or a duplicate: not an outage
        if isinstance(exc, sqlite3.DatabaseError):
            return StoreUnavailable(_explain(self.path, exc))
        if isinstance(exc, OSError):
            return StoreUnavailable(f"{self._where} unavailable: {exc}")
        return None

    def _is_duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _sweep_sql(self) -> tuple[str, Callable[[float, int], tuple[Any, ...]]]:
        sql = self._q(
            f"UPDATE sessions SET state = 'terminated', reason = {REASON}, terminated_at = %s "
            f"WHERE id IN (SELECT id FROM sessions WHERE {DUE} "
            "ORDER BY created_at, id LIMIT %s) RETURNING id, reason"
        )
        return sql, lambda now, limit: (now, now, now, now, limit)

    # -- lifecycle ---------------------------------------------------------

    def _open_sync(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreUnavailable(
                    f"sqlite store {self.path}: cannot use WAL journal mode (got {mode!r})"
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._retry_locked(lambda: self._migrate(conn))
            conn.set_progress_handler(self._progress, 1000)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _retry_locked(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying "database is locked" until the busy timeout.

        Switching a new file to WAL takes an exclusive lock for which SQLite
        does not always call its busy handler, so several processes opening a
        fresh store at once can see SQLITE_BUSY at once; waiting a little
        and trying again is the documented remedy.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)  # in the store's worker thread, never the event loop
            delay = min(delay * 2, 0.1)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # BEGIN IMMEDIATE: two processes opening at once apply migrations one after the other.
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.cursor()
            try:
                self._apply_migrations(cur)
            finally:
                cur.close()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    async def open(self) -> None:
        """Create the file (and its directory) if needed, and apply pending migrations."""
        # Bounded by busy_timeout per statement; opening is not abandoned, so a
        # connection can never leak from a thread nobody waits for.
        try:
            await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        except (SchemaTooNew, StoreUnavailable):
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(_explain(self.path, exc)) from exc
        except OSError as exc:
            raise StoreUnavailable(f"sqlite store {self.path} cannot be opened: {exc}") from exc

    def _close_sync(self) -> None:
        got = self._lock.acquire(timeout=self.op_timeout)
        try:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        finally:
            if got:
                self._lock.release()

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)


def _explain(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    low = text.lower()
    if "locked" in low or "busy" in low:
        hint = "another process holds the write lock past the busy timeout"
    elif "readonly" in low or "read-only" in low:
        hint = "the database file or its directory is read-only"
    elif "full" in low:
        hint = "the disk is full"
    elif "interrupted" in low:
        hint = "the operation was abandoned after its timeout"
    else:
        hint = "database error"
    return f"sqlite store {path} unavailable ({hint}): {text}"
