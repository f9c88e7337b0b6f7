"""Session store benchmark (plain script, not collected by pytest).

Per backend (memory, sqlite NORMAL, sqlite FULL, postgresql if reachable):
committed patches/s with p50/p99 latency (sequential, through the store API),
the create+terminate rate, and group commit: rounds of 50 patches issued one
after another vs 50 at once (a trio nursery), alternating, with patches/s and
the transactions each way used. Prints a human summary to stderr and one JSON
object as the last line of stdout.

    .venv/bin/python tests/benchmarks/bench_store.py [--patches N] [--sessions N] [--rounds N]

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
import trio.testing

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


def _write_transactions(store: SessionStore) -> int | None:
    stats = getattr(store, "statistics", None)  # absent before group commit
    return stats().write_transactions if stats is not None else None


async def bench_fan_in(store: SessionStore, rounds: int, width: int = 50) -> dict[str, Any]:
    """``width`` patches one after another vs ``width`` at once, alternating, ``rounds`` times."""
    now = time.time()
    await store.create(_record("bench-fan-in", now))
    elapsed = {"sequential": 0.0, "concurrent": 0.0}
    transactions: dict[str, int | None] = {"sequential": 0, "concurrent": 0}

    async def patch(i: int) -> None:
        await store.patch_state("bench-fan-in", {"n": i}, if_version=None, at=now)

    for _ in range(rounds):
        for way in ("sequential", "concurrent"):
            before = _write_transactions(store)
            start = time.perf_counter()
            if way == "sequential":
                for i in range(width):
                    await patch(i)
            else:
                async with trio.open_nursery() as nursery:
                    for i in range(width):
                        nursery.start_soon(patch, i)
            elapsed[way] += time.perf_counter() - start
            after = _write_transactions(store)
            done = transactions[way]
            transactions[way] = (
                done + after - before
                if done is not None and after is not None and before is not None
                else None
            )
    ops = rounds * width
    return {
        "fan_in_width": width,
        "fan_in_rounds": rounds,
        "sequential_patches_per_s": round(ops / elapsed["sequential"], 1),
        "concurrent_patches_per_s": round(ops / elapsed["concurrent"], 1),
        "sequential_transactions": transactions["sequential"],
        "concurrent_transactions": transactions["concurrent"],
    }


_WRITES = ("create", "mark_ready", "terminate", "expire", "patch_state", "touch", "sweep", "purge")


class _CountingStore(MemoryStore):
    """Counts the runtime's calls to the store's write operations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name: str) -> Any:
        if name in _WRITES:
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
        return object.__getattribute__(self, name)


def writes_per_1000_requests(spacing: float = 0.1) -> dict[str, Any]:
    """Store writes the runtime makes for 1000 requests on one session, one every ``spacing`` s.

    Runs the real supervisor on trio's MockClock (so 1000 requests over 100 s
    take no real time) against a store that counts write calls; the backend
    does not matter for the count, which is what touch coalescing decides.
    """
    from mcp_sessions import Settings, open_supervisor

    store = _CountingStore()

    async def run() -> None:
        async with open_supervisor(Settings(), store=store) as sup:
            session, _ = await sup.open_handle_session(principal="bench")
            store.calls.clear()
            for _ in range(1000):
                async with sup.request(session):
                    await trio.sleep(spacing / 2)
                await trio.sleep(spacing / 2)
            await trio.sleep(Settings().touch_interval + 1)
            record = await store.load(session.id)
            assert record is not None
            assert record.requests == 1000

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    by_op = {k: v for k, v in store.calls.items() if v}
    return {"writes": sum(by_op.values()), "by_op": by_op, "request_spacing_s": spacing}


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


async def main(coalesced: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of 50+50 patches")
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
                    results[name] |= await bench_fan_in(store, args.rounds)
                finally:
                    await store.aclose()
                r = results[name]
                print(
                    f"{name:14} patches {r['patches_per_s']:>9}/s  "
                    f"p50 {r['patch_p50_ms']:>7} ms  p99 {r['patch_p99_ms']:>7} ms  "
                    f"create+terminate {r['create_terminate_per_s']:>8}/s",
                    file=sys.stderr,
                )
                ops = r["fan_in_rounds"] * r["fan_in_width"]
                print(
                    f"{'':14} {r['fan_in_width']} at a time: sequential "
                    f"{r['sequential_patches_per_s']:>9}/s in {r['sequential_transactions']} "
                    f"transactions, concurrent {r['concurrent_patches_per_s']:>9}/s in "
                    f"{r['concurrent_transactions']} transactions ({ops} patches each way)",
                    file=sys.stderr,
                )
        finally:
            if pg:
                _drop_schema(dsn, schema)
    results["writes_per_1000_requests"] = coalesced["writes"]
    results["writes_per_1000_requests_detail"] = coalesced
    print(
        f"store writes per 1000 requests on one session (one request every "
        f"{coalesced['request_spacing_s']} s): {coalesced['writes']} {coalesced['by_op']}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "patches": args.patches,
                "sessions": args.sessions,
                "rounds": args.rounds,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    trio.run(main, writes_per_1000_requests())
