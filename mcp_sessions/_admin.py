"""Operator commands on a store: ``mcp-sessions status``, ``check`` and ``sessions``.

These talk to the store directly, not to a running server: they work whether
or not any server is up, and every server sharing the store sees the result
(a session closed here is ``session_closed`` there on its next use). They
print to stdout: they are not the stdio server.

``check`` changes nothing, not even the schema: it opens a SQL store without
migrating it (``open(migrate=False)``), so an older schema is reported as a
problem rather than upgraded, and a missing database, schema or table is not
created. ``status`` and ``sessions`` open the store as a server does, which
brings an older schema up to date (and creates an empty store where there was
none).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from typing import Any

import trio

from ._state import TerminationReason
from ._store import InstanceRecord, SessionRecord, SessionStore, StoreError, StoreUnavailable
from ._store_sql import SQLStoreBase
from ._store_url import redact_url, store_from_url

__all__ = ["run_admin"]


def run_admin(args: argparse.Namespace, url: str) -> int:
    """Run ``status``, ``check`` or ``sessions list|close``; return the exit code."""
    try:
        store = store_from_url(url)
    except ValueError as exc:
        print(f"mcp-sessions: {exc}", file=sys.stderr)
        return 2
    if _missing_sqlite_file(store):
        # Opening would create an empty database (and `check` would call it "ok"):
        # an admin command looks at a store, it never creates one.
        print(f"mcp-sessions: no store at {redact_url(url)} (no database file there)",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        return trio.run(_main, args, store, url)
    except (StoreError, StoreUnavailable) as exc:
        print(f"mcp-sessions: store {redact_url(url)}: {exc}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace, store: SessionStore, url: str) -> int:
    if isinstance(store, SQLStoreBase):
        await store.open(migrate=False)  # look first: never create a store
        if store.missing_schema is not None and args.command != "check":  # (check reports it)
            await store.aclose()
            print(f"mcp-sessions: no store at {redact_url(url)} "
                  f"(schema {store.missing_schema} does not exist)", file=sys.stderr)  # fmt: skip
            return 1
        if args.command != "check":  # (check never upgrades; the others do, as a server)
            await store.aclose()
            await store.open()
    else:
        await store.open()
    try:
        if args.command == "status":
            return await _status(args, store, url)
        if args.command == "check":
            return await _check(args, store, url)
        if args.action == "list":
            return await _list(args, store)
        return await _close(args, store)
    finally:
        await store.aclose()


async def _status(args: argparse.Namespace, store: SessionStore, url: str) -> int:
    counts = await store.counts()
    recent = await store.list_recent(10)
    health = await store.health()
    instances = await store.list_instances()
    now = time.time()
    by_state: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for (state, kind), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
        by_kind[kind] = by_kind.get(kind, 0) + n
    report = {
        "store": redact_url(url),
        "backend": health.backend,
        "healthy": health.ok,
        "schema_version": health.schema_version,
        "sessions_by_state": by_state,
        "sessions_by_kind": by_kind,
        "sessions_by_state_and_kind": {f"{s}/{k}": n for (s, k), n in sorted(counts.items())},
        "requests_total": sum(r.requests for r in recent),
        "most_recently_active": [_summary(r) for r in recent],
        "instances": [_instance_summary(i, now) for i in instances],
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"store: {report['store']} ({health.backend}, healthy={health.ok})")
    print("sessions by state: " + _pairs(by_state))
    print("sessions by kind:  " + _pairs(by_kind))
    print("most recently active:")
    for r in recent:
        print("  " + _line(r))
    if not recent:
        print("  (none)")
    print("instances:")
    for i in instances:
        print("  " + _instance_line(i, now))
    if not instances:
        print("  (none)")
    return 0


async def _check(args: argparse.Namespace, store: SessionStore, url: str) -> int:
    if isinstance(store, SQLStoreBase):
        problems = await store.check_as_found(time.time())
    else:
        problems = await store.check(time.time())
    health = await store.health()
    version = health.schema_version
    if isinstance(store, SQLStoreBase) and store.found_schema is not None:
        version = store.found_schema  # also where health cannot read it: no schema at all
    report = {
        "store": redact_url(url),
        "backend": health.backend,
        "schema_version": version,
        "problems": problems,
        "ok": not problems,
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif problems:
        for problem in problems:
            print(" ".join(problem.splitlines()))  # one line each, whatever the data holds
        print(f"mcp-sessions: {len(problems)} problem(s) in {report['store']}", file=sys.stderr)
    else:
        schema = f", schema v{version}" if version is not None else ""
        print(f"ok: {report['store']} ({health.backend}{schema}): no problems")
    return 1 if problems else 0


def _missing_sqlite_file(store: SessionStore) -> bool:
    from ._store_sqlite import SQLiteStore

    return isinstance(store, SQLiteStore) and not store.path.exists()


async def _list(args: argparse.Namespace, store: SessionStore) -> int:
    limit: int = args.limit  # 0: all
    if args.principal:
        records = await store.list_by_principal(args.principal, include_terminated=args.all)
        records = records[-limit:] if limit else records
    else:
        records = await _recent(store, limit, include_terminated=args.all)
    if args.json:
        print(json.dumps([_summary(r) for r in records], indent=2, sort_keys=True))
    elif records:
        for r in records:
            print(_line(r))
    else:
        print("(no sessions)" if args.all else "(no live sessions)")
    return 0


async def _recent(
    store: SessionStore, limit: int, *, include_terminated: bool
) -> list[SessionRecord]:
    """The ``limit`` (0: all) most recently active sessions, live ones only unless asked.

    ``list_recent`` cannot filter, so the terminated rows among the newest would
    crowd out the live ones: ask for twice as many until enough are live or the
    store has no more.
    """
    fetch = limit if limit else 100
    while True:
        rows = await store.list_recent(fetch)
        found = [r for r in rows if include_terminated or r.live]
        if (limit and len(found) >= limit) or len(rows) < fetch:
            return found[:limit] if limit else found
        fetch *= 2


async def _close(args: argparse.Namespace, store: SessionStore) -> int:
    record = await store.load(args.id)
    if record is None:
        print(f"mcp-sessions: no session {args.id}", file=sys.stderr)
        return 1
    reason = await store.terminate(args.id, TerminationReason.CLOSED, time.time())
    if reason is TerminationReason.CLOSED and record.live:
        print(f"{args.id} closed")
        return 0
    print(f"{args.id} had already ended ({reason.value if reason else 'unknown'})")
    return 0


def _summary(r: SessionRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "kind": r.kind,
        "principal": r.principal,
        "state": r.state,
        "reason": r.reason,
        "created_at": _iso(r.created_at),
        "last_active": _iso(r.last_active),
        "requests": r.requests,
        "errors": r.errors,
        "version": r.version,
    }


def _instance_summary(i: InstanceRecord, now: float) -> dict[str, Any]:
    return {
        "id": i.id,
        "host": i.host,
        "pid": i.pid,
        "version": i.version,
        "started_at": _iso(i.started_at),
        "heartbeat_at": _iso(i.heartbeat_at),
        "lease_until": _iso(i.lease_until),
        "lapsed": i.lapsed(now),
    }


def _instance_line(i: InstanceRecord, now: float) -> str:
    lapsed = " (lapsed)" if i.lapsed(now) else ""
    return (
        f"{i.id}  {i.host} pid {i.pid}  version {i.version or '-'}  "
        f"started {_iso(i.started_at)}  heartbeat {_iso(i.heartbeat_at)}  "
        f"lease until {_iso(i.lease_until)}{lapsed}"
    )


def _line(r: SessionRecord) -> str:
    ended = f" ({r.reason})" if r.reason else ""
    return (
        f"{r.id}  {r.kind:<10} {r.principal:<16} {r.state}{ended}  "
        f"last active {_iso(r.last_active)}  requests {r.requests}"
    )


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")
