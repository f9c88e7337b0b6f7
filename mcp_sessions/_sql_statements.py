"""Every statement the SQL stores run, built once per store from its dialect.

Parameters are listed next to each statement, in order. Expiry is the one rule
of :mod:`mcp_sessions._expiry` (:data:`~mcp_sessions._expiry.DUE_SQL` and
:data:`~mcp_sessions._expiry.REASON_SQL`), never restated here.
"""

from __future__ import annotations

import attrs

from ._expiry import DUE_SQL, IDLE_DUE_SQL, LIFETIME_DUE_SQL, REASON_SQL
from ._sql_dialect import Dialect
from ._sql_schema import COLUMNS, INSTANCE_COLUMNS
from ._state import TerminationReason
from ._store import INITIALIZING, LIVE, TERMINATED

__all__ = ["Statements"]

#: Rows after the paging key ``(created_at, id)`` (parameters: created_at twice, then id).
_AFTER_KEY = "(created_at > %s OR (created_at = %s AND id > %s))"


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
    #: now, now, id, due_params(now, grace) -> RETURNING reason.
    expire: str
    #: now, now, id, unchanged_since -> RETURNING reason (idle, nobody's use written since).
    expire_unchanged: str
    #: id -> state, reason, doc, version (row-locked where the dialect locks rows).
    patch_read: str
    #: doc, version, future_bound(at), at, at, id.
    patch_write: str
    #: future_bound(now), last_active, last_active, requests, errors, expires_at or NULL, id.
    touch: str
    #: principal -> rows of COLUMNS, live only, oldest first.
    list_live: str
    list_live_page: str
    list_all_page: str
    #: principal -> rows of COLUMNS, oldest first.
    list_all: str
    #: limit -> rows of COLUMNS, most recently active first.
    list_recent: str
    #: -> state, kind, count.
    counts: str
    #: now, limit, idle_due_params(now, grace), limit -> ids of due rows (index range scans).
    sweep_find: str
    #: now, now, id, due_params(now, grace) -> RETURNING id, reason.
    sweep_end: str
    #: name, holder, until, now -> RETURNING holder when the lease is (now) the holder's.
    lease_take: str
    #: before -> a row if anything is old enough to purge.
    purge_find: str
    #: before.
    purge: str
    #: due_params(now, grace), limit -> live sessions not due, counted up to limit.
    count_live: str
    #: principal, due_params(now, grace), limit -> the principal's, as :attr:`count_live`.
    count_live_principal: str
    #: evict_before, instance, due_params(now, grace) -> the longest-idle live session
    #: not due (a handle session, or a connection session of that instance).
    evict_victim: str
    #: principal, evict_before, instance, due_params(now, grace) -> the principal's, as above.
    evict_victim_principal: str
    #: key -> takes the admission lock until commit ("" where writers are serialised).
    admit_lock: str
    #: every column of INSTANCE_COLUMNS (insert or replace).
    instance_upsert: str
    #: heartbeat_at, lease_until, id.
    heartbeat: str
    #: id.
    instance_delete: str
    #: -> rows of INSTANCE_COLUMNS, oldest first.
    instances: str
    #: before -> ids of instances whose lease ended before.
    lapsed_instances: str
    #: id, before -> forgets a lapsed instance (rowcount 1 if this call did).
    instance_reap: str
    #: at, instance -> RETURNING ids of its live sessions, now ended ``disconnected``.
    reap_sessions: str
    #: -> the newest schema version.
    schema_version: str
    #: -> one row per problem the database finds in itself, or ``ok`` ("" where none is run).
    integrity_check: str
    #: limit -> whole rows of COLUMNS (the document too), by id: the first chunk of a scan.
    scan_sessions: str
    #: after, limit -> as :attr:`scan_sessions`, the chunk after id ``after``.
    scan_sessions_after: str
    #: now -> id, kind, instance, its lease_until (NULL when unknown) of live sessions
    #: whose instance is unknown or lapsed before now (unordered: sorting would cost SQLite
    #: a scan of every row instead of the partial index).
    orphaned_sessions: str

    @classmethod
    def build(cls, d: Dialect) -> Statements:
        g = d.greatest
        cols = ", ".join(COLUMNS)
        # The document is not sent when the caller already has its version.
        out = ", ".join(
            "CASE WHEN version = %s THEN NULL ELSE doc END" if c == "doc" else c for c in COLUMNS
        )
        select = f"SELECT {out} FROM sessions"
        # _store.later_use: the later use, unless the stored one is in the writer's
        # future (written before the wall clock stepped back). Parameters:
        # _store.future_bound(now), used, used.
        later = (
            "CASE WHEN last_active > COALESCE(%s, last_active) THEN %s "
            f"ELSE {g}(last_active, %s) END"
        )
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
            expire_unchanged=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', reason = {REASON_SQL}, "
                f"terminated_at = %s WHERE id = %s AND state = '{LIVE}' AND last_active <= %s "
                "RETURNING reason"
            ),
            patch_read=d.q(
                "SELECT state, reason, doc, version FROM sessions WHERE id = %s" + d.for_update
            ),
            patch_write=d.q(
                f"UPDATE sessions SET doc = %s, version = %s, last_active = {later} WHERE id = %s"
            ),
            touch=d.q(
                f"UPDATE sessions SET last_active = {later}, "
                f"requests = requests + %s, errors = errors + %s, "
                "expires_at = COALESCE(%s, expires_at) "
                f"WHERE id = %s AND state <> '{TERMINATED}'"
            ),
            list_live=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s AND state <> '{TERMINATED}' "
                "ORDER BY created_at, id"
            ),
            list_all=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s ORDER BY created_at, id"
            ),
            # A page after the key (created_at, id), spelled without row values.
            list_live_page=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s AND state <> '{TERMINATED}' "
                f"AND {_AFTER_KEY} ORDER BY created_at, id LIMIT %s"
            ),
            list_all_page=d.q(
                f"SELECT {cols} FROM sessions WHERE principal = %s "
                f"AND {_AFTER_KEY} ORDER BY created_at, id LIMIT %s"
            ),
            list_recent=d.q(f"SELECT {cols} FROM sessions ORDER BY last_active DESC, id LIMIT %s"),
            counts="SELECT state, kind, COUNT(*) FROM sessions GROUP BY state, kind",
            # Two range scans, one per deadline index; each half is its own
            # subquery so its LIMIT bounds its scan, ordered by its index's key so
            # that no planner (PostgreSQL without statistics, say) prefers a
            # sequential scan, and the most overdue sessions go first.
            sweep_find=d.q(
                f"SELECT id FROM (SELECT id FROM sessions WHERE {LIFETIME_DUE_SQL} "
                "ORDER BY expires_at LIMIT %s) AS a "
                f"UNION SELECT id FROM (SELECT id FROM sessions WHERE {IDLE_DUE_SQL} "
                "ORDER BY last_active + idle_timeout LIMIT %s) AS b"
            ),
            sweep_end=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', reason = {REASON_SQL}, "
                f"terminated_at = %s WHERE id = %s AND {DUE_SQL} RETURNING id, reason"
            ),
            lease_take=d.q(
                "INSERT INTO leases (name, holder, until_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "until_at = excluded.until_at "
                "WHERE leases.until_at <= %s OR leases.holder = excluded.holder "
                # A lease ending beyond a whole lease from now was taken before the
                # wall clock stepped back: it counts as lapsed.
                "OR leases.until_at > excluded.until_at RETURNING holder"
            ),
            purge_find=d.q(
                f"SELECT 1 FROM sessions WHERE state = '{TERMINATED}' AND terminated_at < %s "
                "LIMIT 1"
            ),
            purge=d.q(f"DELETE FROM sessions WHERE state = '{TERMINATED}' AND terminated_at < %s"),
            count_live=d.q(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM sessions WHERE state <> '{TERMINATED}' "
                f"AND NOT ({DUE_SQL}) LIMIT %s) AS live"
            ),
            count_live_principal=d.q(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM sessions WHERE principal = %s "
                f"AND state <> '{TERMINATED}' AND NOT ({DUE_SQL}) LIMIT %s) AS live"
            ),
            evict_victim=d.q(
                f"SELECT id FROM sessions WHERE state = '{LIVE}' AND last_active <= %s "
                f"AND (instance IS NULL OR instance = %s) "
                f"AND NOT ({DUE_SQL}) ORDER BY last_active, id LIMIT 1"
            ),
            evict_victim_principal=d.q(
                f"SELECT id FROM sessions WHERE principal = %s AND state = '{LIVE}' "
                f"AND last_active <= %s AND (instance IS NULL OR instance = %s) "
                f"AND NOT ({DUE_SQL}) ORDER BY last_active, id LIMIT 1"
            ),
            admit_lock=(
                d.q("SELECT pg_advisory_xact_lock(hashtext(%s))") if d.name == "postgresql" else ""
            ),
            instance_upsert=d.q(
                f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(INSTANCE_COLUMNS))}) ON CONFLICT (id) DO UPDATE "
                "SET " + ", ".join(f"{c} = excluded.{c}" for c in INSTANCE_COLUMNS if c != "id")
            ),
            heartbeat=d.q("UPDATE instances SET heartbeat_at = %s, lease_until = %s WHERE id = %s"),
            instance_delete=d.q("DELETE FROM instances WHERE id = %s"),
            instances=f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances "
            "ORDER BY started_at, id",
            lapsed_instances=d.q("SELECT id FROM instances WHERE lease_until < %s"),
            instance_reap=d.q("DELETE FROM instances WHERE id = %s AND lease_until < %s"),
            reap_sessions=d.q(
                f"UPDATE sessions SET state = '{TERMINATED}', "
                f"reason = '{TerminationReason.DISCONNECTED.value}', terminated_at = %s "
                f"WHERE instance = %s AND state <> '{TERMINATED}' RETURNING id"
            ),
            schema_version="SELECT MAX(version) FROM schema_version",
            integrity_check="PRAGMA integrity_check" if d.name == "sqlite" else "",
            # Keyset pagination on the primary key: each chunk is one index range scan.
            scan_sessions=d.q(f"SELECT {cols} FROM sessions ORDER BY id LIMIT %s"),
            scan_sessions_after=d.q(
                f"SELECT {cols} FROM sessions WHERE id > %s ORDER BY id LIMIT %s"
            ),
            # Live sessions that name an instance: the sessions_live_instance index.
            orphaned_sessions=d.q(
                "SELECT s.id, s.kind, s.instance, i.lease_until FROM sessions s "
                "LEFT JOIN instances i ON i.id = s.instance "
                f"WHERE s.state <> '{TERMINATED}' AND s.instance IS NOT NULL "
                "AND (i.id IS NULL OR i.lease_until < %s)"
            ),
        )
