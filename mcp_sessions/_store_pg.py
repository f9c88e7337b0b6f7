"""The PostgreSQL session store: for many server instances on many hosts.

Theory of operation
===================

``psycopg`` 3 with a synchronous :class:`psycopg_pool.ConnectionPool` (no
trio-native PostgreSQL driver is maintained), driven by group commit
(:mod:`._sql_worker`): ``max_size`` worker threads, one per pooled connection,
each take everything queued and run it as one transaction per hop, every
operation in its own savepoint. Writes of a hop are ordered by session id, so
two hops lock rows in the same order; a deadlock or serialisation failure
that happens anyway is retried (the whole transaction was rolled back). Patches
lock their row (``SELECT ... FOR UPDATE``); the sweep ends due rows with
conditional updates, so each session is ended exactly once whoever sweeps.
Opening a session with limits takes a transaction-scoped advisory lock
(``pg_advisory_xact_lock``) before it counts, so two instances never both
take the last place.

Why threads per connection rather than psycopg's pipeline mode: every
operation is a read-modify-write with Python between its statements (a patch
reads the document, merges, writes), so a pipeline could not overlap the
statements of one operation, and an error in a pipeline aborts everything
queued behind it up to the next sync point, which fights the per-operation
savepoints that keep one caller's failure from failing the others. Threads
per connection keep PostgreSQL's row-level concurrency (hops on different
connections run in parallel) and group commit still shares each transaction
and its WAL flush among every operation that arrived meanwhile.

Change detection (:meth:`PostgresStore.change_epoch`) is not offered: it
returns None, so a caller reads the record on each use (one round trip).

Bounded failure: the pool checks a connection on checkout (a dead one, e.g.
after a server restart, is replaced), connecting gives up after
``connect_timeout``, the server cancels statements after ``op_timeout``
(``statement_timeout``), TCP keepalives and ``tcp_user_timeout`` notice a
vanished peer, and every call is bounded by ``op_timeout`` on the trio side
(a stuck thread is abandoned, never waited for). All of those surface as
:class:`~mcp_sessions._store.StoreUnavailable`; the pool reconnects in the
background, so the store works again once the server is back, without being
reopened.

``schema=`` puts the tables in that schema (created if missing) via the
connections' ``search_path``: several independent stores can share a database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
import trio
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from ._sql_dialect import Dialect
from ._sql_schema import apply_migrations, schema_as_found
from ._sql_worker import Transactions
from ._store import StoreUnavailable
from ._store_sql import SQLStoreBase
from ._store_url import redact_url

__all__ = ["PostgresStore"]

POSTGRES = Dialect(
    name="postgresql",
    param="%s",
    json_text=False,
    json_param=Jsonb,
    json_type="JSONB",
    for_update=" FOR UPDATE",
    greatest="GREATEST",
    id_collation='COLLATE "C"',
    multi_statement=True,
)

# Lower case only: PostgreSQL folds an unquoted name to lower case, so "MySchema"
# would be one schema in search_path and another where it is quoted.
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _PoolTransactions(Transactions):
    """A pooled connection per hop; psycopg opens the transaction at the first statement."""

    def __init__(
        self, pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]], store: PostgresStore
    ) -> None:
        self._pool = pool
        self._store = store

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection(timeout=self._store.op_timeout) as conn:
            yield conn

    def begin(self, conn: Any, cur: Any, write: bool) -> None:
        pass  # psycopg begins a transaction with the first statement

    def commit(self, conn: Any, cur: Any, write: bool) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        if not conn.closed:
            conn.rollback()

    def usable(self, conn: Any) -> bool:
        return bool(conn.info.transaction_status == TransactionStatus.INTRANS)

    def op_failed(self, exc: Exception) -> bool:
        # Lost connections, timeouts, deadlocks, a read-only server: the transaction.
        # Constraint, value and statement errors: the operation (after its savepoint).
        return not isinstance(
            exc,
            psycopg.OperationalError
            | psycopg.InterfaceError
            | psycopg.InternalError
            | psycopg_pool.PoolTimeout,
        )

    def retryable(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.TransactionRollback)

    def failure(self, exc: BaseException) -> Exception:
        if isinstance(exc, Exception):
            mapped = self._store._map_error(exc)
            if mapped is not None:
                return StoreUnavailable(str(mapped))
        return StoreUnavailable(f"{self._store._where} unavailable: {exc!r}")


class PostgresStore(SQLStoreBase):
    """Sessions in a PostgreSQL database, shared by every instance that connects to it."""

    backend = "postgresql"
    durable = True
    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        op_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        schema: str | None = None,
    ) -> None:
        if schema is not None and not _IDENT.match(schema):
            raise ValueError(
                "schema must be a plain lower-case SQL identifier (a-z, 0-9 and _, "
                f"at most 63 characters, not starting with a digit), not {schema!r}"
            )
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self.dsn = dsn
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.op_timeout = op_timeout
        self.connect_timeout = connect_timeout
        self._where = f"postgresql store {redact_url(dsn)}" + (
            f" (schema {schema})" if schema else ""
        )
        super().__init__()
        self._lock_key = f"mcp_sessions:admit:{schema or ''}"
        self._lifecycle = trio.Lock()
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.dsn)!r}, schema={self.schema!r})"

    # -- plumbing ----------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        # Counting under the admission lock needs each statement to see what the
        # lock's previous holder committed: READ COMMITTED, whatever the database's default.
        options = (
            f"-c statement_timeout={int(self.op_timeout * 1000)} "
            r"-c default_transaction_isolation=read\ committed"
        )
        if self.schema:
            options += f" -c search_path={self.schema}"
        return {
            "connect_timeout": max(1, round(self.connect_timeout)),
            "options": options,
            "application_name": "mcp-sessions",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": int(max(self.op_timeout, self.connect_timeout) * 1000),
        }

    def _map_error(self, exc: Exception) -> Exception | None:
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return StoreUnavailable(
                f"{self._where} unavailable: no connection within the timeout ({exc})"
            )
        if isinstance(
            exc, psycopg.OperationalError | psycopg.InterfaceError | psycopg.InternalError
        ):
            return StoreUnavailable(f"{self._where} unavailable: {exc}")
        return None

    def _is_duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)

    # -- lifecycle ---------------------------------------------------------

    def _migrate(self, cur: Any) -> None:
        # One migrator at a time per schema, across every process (released at commit).
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))",
            (f"mcp_sessions:migrate:{self.schema or ''}",),
        )
        if self.schema:
            cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        apply_migrations(cur, self.dialect, self._where)

    def _open_sync(
        self, migrate: bool = True
    ) -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
        kwargs = self._connect_kwargs()
        if not migrate:
            # Opened to look only: the server itself refuses every write.
            options = str(kwargs.get("options", ""))
            kwargs["options"] = f"{options} -c default_transaction_read_only=on".strip()
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            self.dsn,
            kwargs=kwargs,
            min_size=self.min_size,
            max_size=self.max_size,
            open=False,
            timeout=self.op_timeout,
            check=psycopg_pool.ConnectionPool.check_connection,
            name="mcp-sessions",
        )
        try:
            pool.open(wait=self.min_size > 0, timeout=self.connect_timeout)
            with pool.connection(timeout=self.connect_timeout) as conn, conn.cursor() as cur:
                if migrate:
                    self._migrate(cur)
                else:  # note what is there; CREATE SCHEMA and migrations are for migrate
                    found = schema_as_found(cur, self.dialect, self._where, self.schema)
                    self.found_schema = 0 if found is None else found
                    self.missing_schema = self.schema if found is None else None
        except BaseException:
            pool.close(timeout=1.0)
            raise
        return pool

    async def open(self, *, migrate: bool = True) -> None:
        """Connect and apply pending migrations. Raises SchemaTooNew or StoreUnavailable.

        With ``migrate=False`` (``mcp-sessions check``), create and change
        nothing: no schema, no table, and every transaction is read-only (see
        :meth:`SQLStoreBase.open`).
        """
        async with self._lifecycle:
            if self._worker is not None:
                return
            self.found_schema = self.missing_schema = None
            # Bounded by the driver's own timeouts; never abandoned, so nothing it
            # creates can leak from a thread nobody waits for.
            pool = await self._in_thread(lambda: self._open_sync(migrate))
            worker = self._worker_for(
                _PoolTransactions(pool, self),
                threads=self.max_size,
                sort_writes=True,
                multi_statement=True,
            )
            self._pool = pool
            worker.start()
            self._worker = worker

    async def aclose(self) -> None:
        """Finish what is queued, stop the workers, close the pool."""
        async with self._lifecycle:
            await self._stop_worker()
            pool, self._pool = self._pool, None
            if pool is not None:
                await trio.to_thread.run_sync(
                    lambda: pool.close(timeout=5.0), abandon_on_cancel=True
                )
