"""The SQL stores' schema and its forward-only migrations.

Theory of operation
===================

``schema_version`` holds one row per migration applied. Opening a store
applies, inside one transaction that the backend has locked against other
processes opening at once, every migration newer than the newest row; a
database whose newest row is beyond :data:`LATEST_SCHEMA` was written by newer
code and is refused untouched (:class:`~mcp_sessions._store.SchemaTooNew`).
Migrations are appended, never edited once released.

1. The ``sessions`` table and the indexes the queries use (the idle-deadline
   index is on ``last_active + idle_timeout``, the left side of
   :data:`mcp_sessions._expiry.DUE_SQL`).
2. SQLite only: ``store_generation``, one row whose number grows with every
   row written to ``sessions`` (bumped by triggers, so it also counts writers
   that bypass the store). A store compares it around its own transactions to
   tell its own writes from everyone else's (see ``change_epoch``). Code that
   knows only version 1 would write without bumping it, so it must refuse this
   schema, and does. PostgreSQL records the version and changes nothing.
3. Many processes: ``sessions.instance`` (the process serving a connection
   session), ``instances`` (each process's lease), ``leases`` (the sweep
   lease), and the indexes that keep counting O(limit) and sweeps O(due): live
   sessions by principal and by instance, and ``(kind, state)`` for status
   (kind first, so it never competes with the deadline indexes for
   ``state = ...`` lookups).
"""

from __future__ import annotations

import time
from typing import Any

from ._sql_dialect import Dialect
from ._store import LIVE, TERMINATED, SchemaTooNew

__all__ = [
    "COLUMNS",
    "INSTANCE_COLUMNS",
    "JSON_COLUMNS",
    "LATEST_SCHEMA",
    "apply_migrations",
    "found_schema_version",
    "migrations",
    "schema_as_found",
    "schema_too_new_message",
    "schema_too_old_message",
    "table_exists",
]

#: The columns of ``sessions``, in the order every statement selects them.
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
    "instance",
)
#: The columns of ``instances``, in the order every statement selects them.
INSTANCE_COLUMNS = (
    "id",
    "host",
    "pid",
    "version",
    "started_at",
    "heartbeat_at",
    "lease_until",
)
JSON_COLUMNS = frozenset({"client", "metadata", "doc"})

#: The schema version this code writes and understands.
LATEST_SCHEMA = 3

_SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


def _sessions_table(d: Dialect) -> list[str]:
    j = d.json_type
    return [
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
        f"CREATE INDEX sessions_ended ON sessions (terminated_at) WHERE state = '{TERMINATED}'",
        "CREATE INDEX sessions_last_active ON sessions (last_active)",
    ]


def _generation(d: Dialect) -> list[str]:
    if d.name != "sqlite":
        return []
    bump = "UPDATE store_generation SET generation = generation + 1 WHERE id = 1"
    return [
        "CREATE TABLE store_generation ("
        "id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL)",
        "INSERT INTO store_generation (id, generation) VALUES (1, 0)",
        *(
            f"CREATE TRIGGER sessions_{event.lower()}_bumps_generation "
            f"AFTER {event} ON sessions BEGIN {bump}; END"
            for event in ("INSERT", "UPDATE", "DELETE")
        ),
    ]


def _many_processes(d: Dialect) -> list[str]:
    live = f"WHERE state <> '{TERMINATED}'"
    return [
        "ALTER TABLE sessions ADD COLUMN instance TEXT",
        f"""CREATE TABLE instances (
            id TEXT {d.id_collation} PRIMARY KEY,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            version TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX instances_lease ON instances (lease_until)",
        "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
        "until_at DOUBLE PRECISION NOT NULL)",
        f"CREATE INDEX sessions_live_principal ON sessions (principal) {live}",
        f"CREATE INDEX sessions_live_instance ON sessions (instance) {live}",
        "CREATE INDEX sessions_kind_state ON sessions (kind, state)",
    ]


def migrations(d: Dialect) -> list[tuple[int, list[str]]]:
    """Forward-only migrations: (version, statements). Never edit a released entry; append."""
    return [(1, _sessions_table(d)), (2, _generation(d)), (3, _many_processes(d))]


def schema_too_new_message(where: str, found: int) -> str:
    return (
        f"{where} has schema version {found}, but this mcp-sessions knows versions up to "
        f"{LATEST_SCHEMA}: upgrade mcp-sessions (the store was left untouched)"
    )


def apply_migrations(cur: Any, dialect: Dialect, where: str) -> None:
    """Bring the schema up to date inside the caller's (locked) transaction.

    Forward only; a schema newer than this code raises :class:`SchemaTooNew`
    and touches nothing.
    """
    cur.execute(_SCHEMA_VERSION_DDL)
    cur.execute("SELECT MAX(version) FROM schema_version")
    row = cur.fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    if current > LATEST_SCHEMA:
        raise SchemaTooNew(schema_too_new_message(where, current))
    insert = dialect.q("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)")
    for version, statements in migrations(dialect):
        if version <= current:
            continue
        for stmt in statements:
            cur.execute(stmt)
        cur.execute(insert, (version, time.time()))


# -- reading a schema as found, without migrating it (``mcp-sessions check``) ----------


def table_exists(cur: Any, dialect: Dialect, table: str) -> bool:
    """Whether ``table`` exists where the store's statements look for it (PostgreSQL: on the
    connection's ``search_path``). Reads only."""
    if dialect.name == "sqlite":
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    else:
        cur.execute("SELECT to_regclass(%s)", (table,))
    row = cur.fetchone()
    return row is not None and row[0] is not None


def found_schema_version(cur: Any, dialect: Dialect) -> int:
    """The schema version the database holds, 0 when it has none; creates and changes nothing."""
    if not table_exists(cur, dialect, "schema_version"):
        return 0
    cur.execute("SELECT MAX(version) FROM schema_version")
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def schema_too_old_message(found: int) -> str:
    return (
        f"schema version {found}, this code expects {LATEST_SCHEMA} (run a server or "
        "`mcp-sessions status` on this store to upgrade it)"
    )


def schema_as_found(
    cur: Any, dialect: Dialect, where: str, schema: str | None = None
) -> int | None:
    """What a store opened without migrating finds: None when the PostgreSQL ``schema`` it
    names does not exist, else its schema version (0: none). Reads only; a version newer
    than this code raises :class:`SchemaTooNew`, as opening to migrate does."""
    if schema is not None:
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if cur.fetchone() is None:
            return None
    found = found_schema_version(cur, dialect)
    if found > LATEST_SCHEMA:
        raise SchemaTooNew(schema_too_new_message(where, found))
    return found
