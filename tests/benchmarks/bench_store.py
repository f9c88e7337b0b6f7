"""Session store benchmark (plain script, not collected by pytest).

Per backend (memory, sqlite NORMAL, sqlite FULL, postgresql if reachable):
committed patches/s with p50/p99 latency (sequential, through the store API)
and the create+terminate rate. Prints a human summary to stderr and one JSON
object as the last line of stdout.

    .venv/bin/python tests/benchmarks/bench_store.py [--patches N] [--sessions N]

PostgreSQL: ``MCP_SESSIONS_TEST_PG_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``;
a throwaway schema is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from mcp_sessions._state import TerminationReason
from mcp_sessions._store import MemoryStore, SessionRecord, SessionStore
from mcp_sessions._store_sqlite import SQLiteStore

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _record(session_id: str, now: float) -> SessionRecord:
    return SessionRecord(
        id=session_id,
        handle_hash=f"h-{session_id}",
        kind="handle",
        principal="bench",
        created_at=now,
        last_active=now,
        idle_timeout=600.0,
        expires_at=now + 3600.0,
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_one(store: SessionStore, patches: int, sessions: int) -> dict[str, Any]:
    now = time.time()
    await store.create(_record("bench-patch", now))
    latencies: list[float] = []
    start = time.perf_counter()
    for i in range(patches):
        t = time.perf_counter()
        await store.patch_state("bench-patch", {"n": i}, if_version=None, at=now)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(sessions):
        sid = f"bench-ct-{i}"
        await store.create(_record(sid, now))
        await store.terminate(sid, TerminationReason.CLOSED, now)
    ct_elapsed = time.perf_counter() - start
    return {
        "patches_per_s": round(patches / elapsed, 1),
        "patch_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "patch_p99_ms": round(_pct(latencies, 0.99) * 1000, 3),
        "create_terminate_per_s": round(sessions / ct_elapsed, 1),
    }


def writes_per_1000_requests(store_url: str) -> float | None:
    """Store writes per 1000 requests on one session: needs the runtime; to be filled in."""
    return None


def _pg_available(dsn: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except Exception:
        return False


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, SessionStore]] = [
            ("memory", MemoryStore()),
            ("sqlite_normal", SQLiteStore(Path(tmp) / "normal.db", synchronous="NORMAL")),
            ("sqlite_full", SQLiteStore(Path(tmp) / "full.db", synchronous="FULL")),
        ]
        dsn = os.environ.get("MCP_SESSIONS_TEST_PG_DSN") or DEFAULT_PG
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        pg = _pg_available(dsn)
        if pg:
            from mcp_sessions._store_pg import PostgresStore

            stores.append(("postgresql", PostgresStore(dsn, schema=schema)))
        else:
            print(f"postgresql: not reachable at {dsn}, skipped", file=sys.stderr)
        try:
            for name, store in stores:
                await store.open()
                try:
                    results[name] = await bench_one(store, args.patches, args.sessions)
                finally:
                    await store.aclose()
                r = results[name]
                print(
                    f"{name:14} patches {r['patches_per_s']:>9}/s  "
                    f"p50 {r['patch_p50_ms']:>7} ms  p99 {r['patch_p99_ms']:>7} ms  "
                    f"create+terminate {r['create_terminate_per_s']:>8}/s",
                    file=sys.stderr,
                )
        finally:
            if pg:
                _drop_schema(dsn, schema)
    results["writes_per_1000_requests"] = None  # see writes_per_1000_requests()
    print(json.dumps({"patches": args.patches, "sessions": args.sessions, "results": results}))


if __name__ == "__main__":
    trio.run(main)
