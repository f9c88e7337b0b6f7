"""Every statement the SQL stores run, built once per store from its dialect.

Parameters are listed next to each statement, in order. Expiry is the one rule
of :mod:`mcp_sessions._expiry` (:data:`~mcp_sessions._expiry.DUE_SQL` and
:data:`~mcp_sessions._expiry.REASON_SQL`), never restated here.
"""

from __future__ import annotations

import attrs

from ._expiry import DUE_SQL, REASON_SQL
from ._sql_dialect import Dialect
from ._sql_schema import COLUMNS
from ._store import INITIALIZING, LIVE, TERMINATED

__all__ = ["Statements"]


@attrs.frozen(kw_only=True)
class Statements:
    """The SQL of every operation, with the dialect's placeholders."""

    #: Every column of :data:`~mcp_sessions._sql_schema.COLUMNS`.
    insert: str
    #: known_version, id -> a row of COLUMNS (``doc`` NULL when the version is known).
    load_by_id: str
    #: known_version, handle_hash -> a row of COLUMNS, as :attr:`load_by_id`.
    load_by_hash: str
    #: at, id.
    mark_ready: str
    #: reason, at, touch last_active (or NULL), requests, errors, id -> RETURNING id.
    terminate: str
    #: id -> reason.
    reason_of: str
    #: now, now, id, now, now - grace -> RETURNING reason.
    expire: str
    #: id -> state, reason, doc, version (row-locked where the dialect locks rows).
    patch_read: str
    #: doc, version, at, id.
    patch_write: str
    #: last_active, requests, errors, id.
    touch: str
    #: principal -> rows of COLUMNS, live only, oldest first.
    list_live: str
    #: principal -> rows of COLUMNS, oldest first.
    list_all: str
    #: limit -> rows of COLUMNS, most recently active first.
    list_recent: str
    #: -> state, kind, count.
    counts: str
    #: now, now, now, now - grace, limit -> RETURNING id, reason.
    sweep: str
    #: before.
    purge: str
    #: -> the newest schema version.
    schema_version: str

    @classmethod
    def build(cls, d: Dialect) -> Statements:
        g = d.greatest
        cols = ", ".join(COLUMNS)
        # The document is not sent when the caller already has its version.
        out = ", ".join(
            "CASE WHEN version = %s THEN NULL ELSE doc END" if c == "doc" else c for c in COLUMNS
        )
        select = f"SELECT {out} FROM sessions"
        return cls(
            insert=d.q(
                f"INSERT INTO sessions ({cols}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
            ),
            load_by_id=d.q(f"{select} WHERE id = %s"),
            load_by_hash=d.q(f"{select} WHERE handle_hash = %s"),
            mark_ready=d.q(
                f"UPDATE sessions SET state = '{LIVE}', last_active = %s "
                f"WHERE id = %s AND state = '{INITIALIZING}'"
            ),
            terminate=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', reason = %s, terminated_at = %s, "
                f"last_active = {g}(last_active, COALESCE(%s, last_active)), "
                "requests = requests + %s, errors = errors + %s "
                f"WHERE id = %s AND state <> '{TERMINATED}' RETURNING id"
            ),
            reason_of=d.q("SELECT reason FROM sessions WHERE id = %s"),
            expire=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', reason = {REASON_SQL}, "
                f"terminated_at = %s WHERE id = %s AND {DUE_SQL} RETURNING reason"
            ),
            patch_read=d.q(
                "SELECT state, reason, doc, version FROM sessions WHERE id = %s" + d.for_update
            ),
            patch_write=d.q(
                f"UPDATE sessions SET doc = %s, version = %s, "
                f"last_active = {g}(last_active, %s) WHERE id = %s"
            ),
            touch=d.q(
                f"UPDATE sessions SET last_active = {g}(last_active, %s), "
                f"requests = requests + %s, errors = errors + %s "
                f"WHERE id = %s AND state <> '{TERMINATED}'"
            ),
            list_live=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s AND state <> '{TERMINATED}' "
                "ORDER BY created_at, id"
            ),
            list_all=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s ORDER BY created_at, id"
            ),
            list_recent=d.q(f"SELECT {cols} FROM sessions ORDER BY last_active DESC, id LIMIT %s"),
            counts="SELECT state, kind, COUNT(*) FROM sessions GROUP BY state, kind",
            sweep=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', reason = {REASON_SQL}, "
                f"terminated_at = %s WHERE id IN (SELECT id FROM sessions WHERE {DUE_SQL} "
                f"ORDER BY created_at, id LIMIT %s{d.skip_locked}) AND state <> '{TERMINATED}' "
                "RETURNING id, reason"
            ),
            purge=d.q(f"DELETE FROM sessions WHERE state = '{TERMINATED}' AND terminated_at < %s"),
            schema_version="SELECT MAX(version) FROM schema_version",
        )
