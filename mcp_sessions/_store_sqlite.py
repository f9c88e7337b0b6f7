"""The SQLite session store: embedded, durable, shared by the processes of one host.

Theory of operation
===================

Two ``sqlite3`` connections per store, in WAL mode:

- the *worker's* connection, used only by the store's one worker thread
  (:mod:`._sql_worker`), which drains the queue of operations into one
  transaction per hop (group commit). Write transactions start with ``BEGIN
  IMMEDIATE``, which takes the database's write lock up front, so
  read-modify-writes (patches, ends, sweeps) of several processes serialise
  instead of failing on upgrade. The worker waits up to ``busy_timeout`` for
  the lock; every call is bounded by ``op_timeout``. Failures of the database
  (locked past the timeout, disk full, read-only, I/O error) raise
  :class:`~mcp_sessions._store.StoreUnavailable`.
- a *read-only* connection used only from the trio thread, with a busy
  timeout of zero. WAL readers never wait for writers, so a load costs no
  thread hop; the rare ``SQLITE_BUSY`` sends that read to the worker. The
  same connection answers :meth:`SQLiteStore.change_epoch`.

Change detection. ``PRAGMA data_version`` on the read-only connection moves
whenever any *other* connection commits -- including this store's worker --
and stays put otherwise. To tell this store's own commits from everyone
else's, the database keeps ``store_generation`` (schema migration 2), one
number that triggers bump on every row written to ``sessions``, by anyone.
The worker reads it at the start and end of each write transaction, under
the write lock, and publishes where its last one left it; if a start differs
from where its previous transaction left it, someone else wrote in between,
up to that start, and the worker publishes that too.
:meth:`SQLiteStore.change_epoch` returns the same number while
``data_version`` stands still; when it moves, it reads the generation and
moves the epoch if the generation is past both the worker's last one and the
one it saw last time, or if the worker found a foreign write it had not seen.
False alarms (a checkpoint, a race with our own commit) cost one read; a
missed foreign write cannot happen.

Durability: with ``synchronous="NORMAL"`` (the default) a committed write
survives the crash of any process (including ``kill -9``), but the last
transactions may be lost if the machine loses power or the OS crashes. With
``synchronous="FULL"`` every commit is fsynced and survives power loss too,
at the price of an fsync per transaction (group commit shares it).

Several processes may share one database file on a local filesystem (not over
NFS: WAL needs shared memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import trio

from ._sql_dialect import Dialect
from ._sql_schema import apply_migrations, schema_as_found, table_exists
from ._sql_worker import Transactions
from ._store import SchemaTooNew, StoreUnavailable
from ._store_sql import MISS, SQLStoreBase

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
    multi_statement=False,
)

_GENERATION = "SELECT generation FROM store_generation WHERE id = 1"


def default_sqlite_path() -> Path:
    """``sessions.db`` in the user's state directory for ``mcp-sessions``, per platform
    (``platformdirs``): ``$XDG_STATE_HOME/mcp-sessions`` (``~/.local/state/...``) on Linux,
    ``~/Library/Application Support/mcp-sessions`` on macOS, ``%LOCALAPPDATA%`` on Windows."""
    import platformdirs

    return Path(platformdirs.user_state_dir("mcp-sessions", appauthor=False)) / "sessions.db"


def _generation(cur: sqlite3.Cursor | sqlite3.Connection) -> int:
    return int(cur.execute(_GENERATION).fetchall()[0][0])


def _generation_if_any(conn: sqlite3.Connection) -> int:
    """The generation, or 0 where the schema predates it (a store opened without migrating)."""
    cur = conn.cursor()
    try:
        return _generation(cur) if table_exists(cur, SQLITE, "store_generation") else 0
    finally:
        cur.close()


@attrs.frozen
class _OwnWrites:
    """What the worker publishes about its own write transactions (read by the trio thread).

    Replaced whole, so a reader always sees a consistent pair.
    """

    #: The generation its last committed write transaction left.
    generation: int
    #: The highest generation some *other* writer left between two of its own
    #: transactions (its "before" differed from its previous "after").
    foreign_upto: int


class _WorkerTransactions(Transactions):
    """The worker's connection: BEGIN IMMEDIATE for writes, generations around them."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        own: _OwnWrites,
        *,
        read_only: bool = False,
        identity: tuple[int, int] | None = None,
    ) -> None:
        self.conn = conn
        self._path = path
        self.own = own
        #: (st_dev, st_ino) of the file opened: the path must still name it.
        self._identity = identity
        self._before = own.generation
        #: Opened without migrating: no write transaction is ever begun.
        self.read_only = read_only

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        yield self.conn

    def _check_file(self) -> None:
        """The path still names the file we opened (one stat per transaction, ~1 us).

        A file deleted or replaced under a running server would otherwise take
        writes that nobody finds again: the next process opens the path.
        """
        if self._identity is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise StoreUnavailable(
                f"sqlite store {self._path} was deleted while in use; restart the server "
                "to create it again (what was written since the deletion is lost)"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"sqlite store {self._path} cannot be checked: {exc}") from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreUnavailable(
                f"sqlite store {self._path} was replaced by another file while in use; "
                "restart the server to use the new one"
            )

    def begin(self, conn: Any, cur: Any, write: bool) -> None:
        self._check_file()
        if write and self.read_only:
            raise StoreUnavailable(
                f"sqlite store {self._path} was opened without migrating: it takes no writes"
            )
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        if write:
            self._before = _generation(cur)

    def commit(self, conn: Any, cur: Any, write: bool) -> None:
        after = _generation(cur) if write else 0
        cur.execute("COMMIT")
        if write:
            own = self.own
            foreign = own.foreign_upto
            if self._before != own.generation:
                foreign = max(foreign, self._before)
            self.own = _OwnWrites(after, foreign)

    def rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            conn.rollback()

    def usable(self, conn: Any) -> bool:
        return bool(conn.in_transaction)

    def op_failed(self, exc: Exception) -> bool:
        # Constraint, value and binding errors concern one statement; the rest
        # (locked, read-only, full, I/O, corrupt, interrupted) the whole transaction.
        if isinstance(
            exc,
            sqlite3.IntegrityError
            | sqlite3.DataError
            | sqlite3.ProgrammingError
            | sqlite3.InterfaceError,
        ):
            return True
        return not isinstance(exc, sqlite3.Error)

    def retryable(self, exc: Exception) -> bool:
        return False

    def failure(self, exc: BaseException) -> Exception:
        if isinstance(exc, StoreUnavailable):
            return StoreUnavailable(str(exc))
        if isinstance(exc, sqlite3.DatabaseError):
            return StoreUnavailable(_explain(self._path, exc))
        return StoreUnavailable(f"sqlite store {self._path} unavailable: {exc!r}")


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
        create_directory: bool = False,
    ) -> None:
        sync = synchronous.upper()
        if sync not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.op_timeout = op_timeout
        #: Create the file's directory if missing (the default state directory); else a
        #: missing directory is an error, and nothing is created.
        self.create_directory = create_directory
        self._where = f"sqlite store {self.path}"
        super().__init__()
        self._lifecycle = trio.Lock()
        self._tx: _WorkerTransactions | None = None
        # The read-only connection; only ever used from the trio thread.
        self._reader: sqlite3.Connection | None = None
        self._seen_data_version: int | None = None
        self._seen_generation = 0
        self._epoch = 0

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, synchronous={self.synchronous!r})"

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The worker's connection (tests use it to simulate a read-only database)."""
        return self._tx.conn if self._tx is not None else None

    # -- change detection and direct reads (trio thread only) ----------------

    def change_epoch(self) -> int | None:
        """See :meth:`SessionStore.change_epoch` and the module docstring.

        Invariant: once a call has read generation ``g``, every write by
        another connection that left a generation ``<= g`` has moved the
        epoch, at that call or an earlier one.
        """
        reader, tx = self._reader, self._tx
        if reader is None or tx is None:
            return None
        try:
            data_version = int(reader.execute("PRAGMA data_version").fetchall()[0][0])
            if data_version == self._seen_data_version:
                return self._epoch  # nobody committed anything
            generation = _generation(reader)
        except sqlite3.Error:
            return None  # busy or locked: cannot tell without waiting
        own = tx.own  # read after the generation: a race can only cause a false alarm
        # Written since our last commit, and not seen by the last call; or a foreign
        # write the worker found between two of its own that we had not seen.
        if generation not in (own.generation, self._seen_generation) or (
            own.foreign_upto > self._seen_generation
        ):
            self._epoch += 1
        self._seen_data_version = data_version
        self._seen_generation = generation
        return self._epoch

    def _read_directly(self, fn: Callable[[Any], T]) -> T:
        reader = self._reader
        if reader is None:
            return MISS  # type: ignore[no-any-return]
        cur = reader.cursor()
        try:
            return fn(cur)
        except sqlite3.Error:
            return MISS  # type: ignore[no-any-return]  # busy, or worse: the worker says which
        finally:
            cur.close()

    # -- errors --------------------------------------------------------------

    def _map_error(self, exc: Exception) -> Exception | None:
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

    # -- lifecycle -----------------------------------------------------------

    def _connect(self, *, create: bool = True) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path if create else f"{self.path.resolve().as_uri()}?mode=rw",
            uri=not create,
            timeout=self.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
        )

    def _open_sync(
        self, migrate: bool = True
    ) -> tuple[sqlite3.Connection, sqlite3.Connection, int, int, int, tuple[int, int]]:
        if migrate and self.create_directory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.parent.is_dir():
            raise StoreUnavailable(
                f"sqlite store {self.path}: directory {self.path.parent} does not exist"
            )
        conn = self._connect(create=migrate)
        reader: sqlite3.Connection | None = None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if migrate:  # (a check changes nothing, the journal mode included)
                mode = self._retry_locked(
                    lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()
                )
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StoreUnavailable(
                        f"sqlite store {self.path}: cannot use WAL journal mode (got {mode!r})"
                    )
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if migrate:
                generation = self._retry_locked(lambda: self._migrate(conn))
            else:
                generation = self._as_found(conn)
            reader = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=0,
                isolation_level=None,
                check_same_thread=False,  # opened here, then used only by the trio thread
            )
            reader.execute("PRAGMA busy_timeout = 0")
            data_version = int(reader.execute("PRAGMA data_version").fetchall()[0][0])
            seen = _generation(reader) if migrate else _generation_if_any(reader)
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            if reader is not None:
                reader.close()
            raise
        return conn, reader, generation, data_version, seen, (st.st_dev, st.st_ino)

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
            time.sleep(delay)  # in a worker thread, never the event loop
            delay = min(delay * 2, 0.1)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        """Apply pending migrations; return the change generation (see the module docstring)."""
        # BEGIN IMMEDIATE: two processes opening at once apply migrations one after the other.
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.cursor()
            try:
                apply_migrations(cur, self.dialect, self._where)
                generation = _generation(cur)
            finally:
                cur.close()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        return generation

    def _as_found(self, conn: sqlite3.Connection) -> int:
        """Open without migrating: read-only from here on; note the schema version found
        (refusing one newer than this code); return the generation (0 if none)."""
        conn.execute("PRAGMA query_only = ON")
        cur = conn.cursor()
        try:
            self.found_schema = schema_as_found(cur, self.dialect, self._where) or 0
        finally:
            cur.close()
        return _generation_if_any(conn)

    async def open(self, *, migrate: bool = True) -> None:
        """Create the file if needed (its directory too with ``create_directory``), and apply
        pending migrations.

        With ``migrate=False`` (``mcp-sessions check``), create and change
        nothing: the file must exist, no table is created, and the store takes
        no writes (see :meth:`SQLStoreBase.open`).
        """
        async with self._lifecycle:
            if self._worker is not None:
                return
            self.found_schema = None
            # Bounded by busy_timeout per statement; opening is not abandoned, so a
            # connection can never leak from a thread nobody waits for.
            try:
                opened = await self._in_thread(lambda: self._open_sync(migrate))
            except (SchemaTooNew, StoreUnavailable):
                raise
            except OSError as exc:
                raise StoreUnavailable(f"{self._where} cannot be opened: {exc}") from exc
            conn, reader, generation, data_version, seen, identity = opened
            tx = _WorkerTransactions(
                conn,
                self.path,
                _OwnWrites(generation, 0),
                read_only=not migrate,
                identity=identity,
            )
            worker = self._worker_for(tx, threads=1)
            # Interrupt a long statement once every caller of its transaction gave up.
            conn.set_progress_handler(lambda: int(worker.all_abandoned()), 1000)
            self._tx, self._reader = tx, reader
            self._seen_data_version, self._seen_generation = data_version, seen
            # Whatever happened while we were closed is news: a new baseline
            # must never absorb a foreign write into an unchanged number.
            self._epoch += 1
            worker.start()
            self._worker = worker

    async def aclose(self) -> None:
        """Finish what is queued, stop the worker, close both connections."""
        async with self._lifecycle:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
            await self._stop_worker()
            tx, self._tx = self._tx, None
            if tx is not None:
                await trio.to_thread.run_sync(tx.conn.close)


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
