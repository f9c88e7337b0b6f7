"""The PostgreSQL session store: for many server instances on many hosts.

Theory of operation
===================

``psycopg`` 3 with a synchronous :class:`psycopg_pool.ConnectionPool`, driven
from trio worker threads (no trio-native PostgreSQL driver is maintained); a
:class:`trio.CapacityLimiter` of ``max_size`` keeps at most one thread per
pooled connection. Every operation is one transaction on one pooled
connection. Patches lock their row (``SELECT ... FOR UPDATE``); the sweep
claims due rows with ``FOR UPDATE SKIP LOCKED`` so concurrent sweepers split
the work and each session is ended exactly once.

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
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg.types.json import Jsonb

from ._store import StoreUnavailable
from ._store_sql import (
    DUE,
    REASON,
    Dialect,
    SQLStoreBase,
    redact_url,
)

__all__ = ["PostgresStore"]

T = TypeVar("T")

POSTGRES = Dialect(
    name="postgresql",
    param="%s",
    json_text=False,
    json_param=Jsonb,
    json_type="JSONB",
    for_update=" FOR UPDATE",
    greatest="GREATEST",
    id_collation='COLLATE "C"',
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
            raise ValueError(f"schema must be a plain SQL identifier, not {schema!r}")
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
        self._limiter = trio.CapacityLimiter(max_size)
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.dsn)!r}, schema={self.schema!r})"

    # -- plumbing ----------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        options = f"-c statement_timeout={int(self.op_timeout * 1000)}"
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

    def _in_thread(self, fn: Callable[[Any], T], write: bool, abandoned: threading.Event) -> T:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"{self._where} is not open")
        with pool.connection(timeout=self.op_timeout) as conn, conn.cursor() as cur:
            result = fn(cur)
            if abandoned.is_set():
                # The caller was told StoreUnavailable: roll back rather than commit.
                raise StoreUnavailable(f"{self._where}: operation abandoned after its timeout")
            return result

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

    def _sweep_sql(self) -> tuple[str, Callable[[float, int], tuple[Any, ...]]]:
        sql = (
            f"WITH due AS (SELECT id FROM sessions WHERE {DUE} ORDER BY created_at, id "
            "LIMIT %s FOR UPDATE SKIP LOCKED) "
            f"UPDATE sessions SET state = 'terminated', reason = {REASON}, terminated_at = %s "
            "FROM due WHERE sessions.id = due.id AND sessions.state <> 'terminated' "
            "RETURNING sessions.id, sessions.reason"
        )
        return sql, lambda now, limit: (now, now, limit, now, now)

    # -- lifecycle ---------------------------------------------------------

    def _migrate(self, cur: Any) -> None:
        # One migrator at a time per schema, across every process (released at commit).
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))",
            (f"mcp_sessions:migrate:{self.schema or ''}",),
        )
        if self.schema:
            cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        self._apply_migrations(cur)

    def _open_sync(self) -> None:
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            self.dsn,
            kwargs=self._connect_kwargs(),
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
                self._migrate(cur)
        except BaseException:
            pool.close(timeout=1.0)
            raise
        self._pool = pool

    async def open(self) -> None:
        """Connect and apply pending migrations. Raises SchemaTooNew or StoreUnavailable."""
        if self._pool is not None:
            return
        await self._call(self._open_sync, "opening", bounded=False)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5.0))
