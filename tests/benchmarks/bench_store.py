"""Session store benchmark (plain script, not collected by pytest).

Per backend (memory, sqlite NORMAL, sqlite FULL, postgresql if reachable):
committed patches/s with p50/p99 latency (sequential, through the store API),
the create+terminate rate, and group commit: rounds of 50 patches issued one
after another vs 50 at once (a trio nursery), alternating, with patches/s and
the transactions each way used. Prints a human summary to stderr and one JSON
object as the last line of stdout.

Sweeps (sqlite NORMAL, postgresql if reachable), each on a fresh store filled
with ``--sweep-sessions`` live sessions (plus a tenth as many terminated ones)
none of which is due: one ``store.sweep(now)`` with nothing due
(``sweep_nothing_due_ms_100k_<backend>``, the median of ``--sweep-runs``,
measured as users get it: nobody runs ANALYZE) alternating with one that finds
exactly 100 due (``sweep_100_due_ms_100k_<backend>``: a ``now`` past the
next 100 deadlines, so the rows are not rewritten to make them due). Then the
latency of patches made one after another by *another process*
(``bench_store_patcher.py``) on one session of that store, in phases of
``--patch-seconds``, rotated each of ``--patch-rounds`` rounds: no sweeps
(``patch_p99_ms_idle_<backend>``), sweeps back to back with nothing due
(``patch_p99_ms_during_sweeps_<backend>``), and one sweep every
``--due-interval`` s finding 100 due (``patch_p99_ms_during_due_sweeps_<backend>``),
and, as the control, no sweeps while this process keeps one core busy
(``patch_p99_ms_during_cpu_spin_<backend>``).
The sweeps of the loops pass a lease holder, as the runtime does.
``--sweep-sessions 0`` skips all this; ``--sweep-only`` skips everything else.

    .venv/bin/python tests/benchmarks/bench_store.py [--patches N] [--sessions N] [--rounds N]
        [--sweep-sessions N] [--sweep-runs N] [--patch-seconds S] [--patch-rounds N]
        [--due-interval S] [--sweep-only]

PostgreSQL: ``MCP_SESSIONS_TEST_PG_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``;
a throwaway schema is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
import trio.testing

from mcp_sessions._sql_schema import COLUMNS, JSON_COLUMNS
from mcp_sessions._sql_statements import Statements
from mcp_sessions._state import TerminationReason
from mcp_sessions._store import (
    INITIALIZING,
    LIVE,
    TERMINATED,
    MemoryStore,
    SessionRecord,
    SessionStore,
)
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


# -- sweeps over many sessions ---------------------------------------------------

#: No filled session is due before the fill time plus this (the benchmark ends long before).
_MARGIN = 3600.0
_PATCHER = Path(__file__).with_name("bench_store_patcher.py")
_TEN_YEARS = 10 * 365 * 86400.0


def _count_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _sweep_rows(live: int, t0: float, seed: int = 1) -> tuple[list[dict[str, Any]], list[float]]:
    """``live`` live sessions none due before ``t0 + _MARGIN``, plus ``live // 10`` ended ones.

    Mixed kinds (a third connection sessions on four instances, a tenth of
    those still initializing), 2000 principals plus five heavy ones, three
    idle timeouts; a fifth of the sessions reach their lifetime before their
    idle deadline. Returns the rows and the sorted times at which each live
    row becomes due (with no further activity).
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    dues: list[float] = []
    for i in range(live + live // 10):
        ended = i >= live
        kind = "connection" if rng.random() < 0.3 else "handle"
        if rng.random() < 0.1:
            principal = f"heavy-{rng.randrange(5)}"
        else:
            principal = f"user-{rng.randrange(2000)}"
        idle_timeout = rng.choice((7200.0, 14400.0, 86400.0))
        if ended:
            terminated_at = t0 - rng.uniform(0, 86400)
            last_active = terminated_at - rng.uniform(0, 600)
            created_at = last_active - rng.uniform(0, 3600)
            expires_at = created_at + 86400.0
            state = TERMINATED
            reason: str | None = rng.choice(
                (TerminationReason.CLOSED, TerminationReason.IDLE_TIMEOUT)
            ).value
        else:
            terminated_at = None
            reason = None
            last_active = t0 - rng.uniform(0, idle_timeout - _MARGIN)
            created_at = last_active - rng.uniform(0, 3600)
            if rng.random() < 0.2:
                expires_at = t0 + _MARGIN + rng.uniform(0, 4 * 3600)
            else:
                expires_at = created_at + rng.choice((2 * 86400.0, 7 * 86400.0))
            state = INITIALIZING if kind == "connection" and rng.random() < 0.1 else LIVE
            if state == INITIALIZING:
                last_active = created_at
                dues.append(expires_at)
            else:
                dues.append(min(expires_at, last_active + idle_timeout))
        sid = f"{rng.getrandbits(128):032x}"
        rows.append(
            {
                "id": sid,
                "handle_hash": f"{rng.getrandbits(256):064x}" if kind == "handle" else None,
                "kind": kind,
                "principal": principal,
                "client": {"name": "bench-client", "version": "1.2.3"},
                "metadata": {"tenant": principal, "n": i % 7},
                "state": state,
                "reason": reason,
                "doc": {"cursor": f"c{i}", "items": [i % 13, i % 17], "done": i % 2 == 0},
                "version": rng.randrange(20),
                "created_at": created_at,
                "last_active": last_active,
                "idle_timeout": idle_timeout,
                "expires_at": expires_at,
                "terminated_at": terminated_at,
                "requests": rng.randrange(500),
                "errors": rng.randrange(3),
                "instance": f"bench-instance-{rng.randrange(4)}" if kind == "connection" else None,
            }
        )
    assert min(dues) > t0 + _MARGIN
    return rows, sorted(dues)


def _as_tuples(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        tuple(
            json.dumps(r[c], separators=(",", ":")) if c in JSON_COLUMNS else r[c] for c in COLUMNS
        )
        for r in rows
    ]


def _fill_sqlite(path: Path, rows: list[dict[str, Any]]) -> None:
    """Bulk insert on a connection of our own, one transaction (triggers and indexes apply)."""
    insert = Statements.build(SQLiteStore.dialect).insert
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, _as_tuples(rows))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _fill_pg(dsn: str, schema: str, rows: list[dict[str, Any]]) -> None:
    import psycopg

    with (
        psycopg.connect(dsn, options=f"-c search_path={schema}") as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY sessions ({', '.join(COLUMNS)}) FROM STDIN") as copy,
    ):
        for row in _as_tuples(rows):
            copy.write_row(row)


def _pg_analyzed(dsn: str, schema: str) -> dict[str, Any]:
    """Whether autovacuum analysed ``sessions`` meanwhile (the store never runs ANALYZE)."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT last_autoanalyze IS NOT NULL, autoanalyze_count FROM pg_stat_user_tables "
            "WHERE schemaname = %s AND relname = 'sessions'",
            (schema,),
        ).fetchone()
    return {"autoanalyzed": bool(row and row[0]), "autoanalyze_count": row[1] if row else None}


class _Dues:
    """Walks the sorted deadlines: each ``next(k)`` is a ``now`` at which exactly k more are due."""

    def __init__(self, dues: list[float]) -> None:
        self._dues = dues
        self._next = 0

    def next(self, k: int) -> float:
        end = self._next + k
        if end > len(self._dues):
            raise RuntimeError("out of sessions to make due: raise --sweep-sessions")
        self._next = end
        return self._dues[end - 1]


class _Lines:
    """Lines of a process's stdout."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buf = b""

    async def next(self) -> str:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                raise RuntimeError("the patcher process exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values), 3),
        "max_ms": round(max(values), 3),
        "n": len(values),
    }


async def _timed_sweep(store: SessionStore, now: float, expect: int, **kw: Any) -> float:
    start = time.perf_counter()
    ended = await store.sweep(now, **kw)
    ms = (time.perf_counter() - start) * 1000
    if len(ended) != expect:
        raise AssertionError(f"sweep ended {len(ended)} sessions, expected {expect}")
    return ms


async def bench_sweeps(store: SessionStore, dues: _Dues, runs: int, due: int) -> dict[str, Any]:
    """``runs`` sweeps with nothing due alternating with ``runs`` that find ``due`` due."""
    nothing: list[float] = []
    some: list[float] = []
    for _ in range(runs):
        nothing.append(await _timed_sweep(store, time.time(), 0))
        some.append(await _timed_sweep(store, dues.next(due), due))
    return {
        "nothing_due": _ms(nothing) | {"first_ms": round(nothing[0], 3)},
        "some_due": _ms(some) | {"due": due, "first_ms": round(some[0], 3)},
    }


async def bench_patch_during_sweeps(
    store: SessionStore,
    patcher_args: list[str],
    dues: _Dues,
    *,
    rounds: int,
    seconds: float,
    due: int,
    due_interval: float,
) -> dict[str, Any]:
    """Another process patches one session back to back; here: nothing, or sweeps.

    Phases of ``seconds`` each, in an order rotated every round: ``idle`` (no
    sweeps), ``nothing_due`` (sweeps back to back, none finding anything),
    ``due`` (one sweep every ``due_interval`` s, each ending ``due`` sessions)
    and ``cpu_spin``, the control: this process only spins its event loop, to
    tell what busy sweeps cost the other process through the CPU (two shared
    cores) from what they cost it through the database.
    """
    phases = ("idle", "nothing_due", "due", "cpu_spin")
    latencies: dict[str, list[float]] = {p: [] for p in phases}
    sweeps: dict[str, list[float]] = {p: [] for p in phases}
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(_PATCHER), *patcher_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        if (ready := await lines.next()) != "ready":
            raise RuntimeError(f"patcher said {ready!r}")
        for r in range(rounds):
            for phase in phases[r % len(phases) :] + phases[: r % len(phases)]:
                await proc.stdin.send_all(f"run {seconds}\n".encode())
                reply: list[str] = []
                done = trio.Event()

                async def wait_reply(reply: list[str] = reply, done: trio.Event = done) -> None:
                    reply.append(await lines.next())
                    done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_reply)
                    while not done.is_set():
                        if phase == "idle":
                            await done.wait()
                        elif phase == "cpu_spin":
                            await trio.lowlevel.checkpoint()
                        elif phase == "nothing_due":
                            sweeps[phase].append(
                                await _timed_sweep(
                                    store, time.time(), 0, holder="bench", lease=60.0
                                )
                            )
                        else:
                            ms = await _timed_sweep(
                                store, dues.next(due), due, holder="bench", lease=60.0
                            )
                            sweeps[phase].append(ms)
                            with trio.move_on_after(max(0.0, due_interval - ms / 1000)):
                                await done.wait()
                latencies[phase] += json.loads(reply[0])["latencies_ms"]
        await proc.stdin.send_all(b"quit\n")
        with trio.fail_after(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out: dict[str, Any] = {}
    for phase in phases:
        lat = latencies[phase]
        out[phase] = {
            "patches": len(lat),
            "patch_p50_ms": round(statistics.median(lat), 3),
            "patch_p99_ms": round(_pct(lat, 0.99), 3),
            "patch_max_ms": round(max(lat), 3),
        }
        if sweeps[phase]:
            out[phase]["sweeps"] = _ms(sweeps[phase])
    return out


async def bench_sweep_backend(
    backend: str,
    store: SessionStore,
    fill: Any,
    patcher_args: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    n = args.sweep_sessions
    await store.open()
    try:
        t0 = time.time()
        rows, dues = _sweep_rows(n, t0)
        start = time.perf_counter()
        await trio.to_thread.run_sync(fill, rows)
        fill_s = time.perf_counter() - start
        walker = _Dues(dues)
        singles = await bench_sweeps(store, walker, args.sweep_runs, 100)
        sid = "bench-sweep-patch"
        now = time.time()
        await store.create(
            SessionRecord(
                id=sid,
                handle_hash=f"h-{sid}",
                kind="handle",
                principal="bench",
                created_at=now,
                last_active=now,
                idle_timeout=_TEN_YEARS,
                expires_at=now + _TEN_YEARS,
            )
        )
        patches = await bench_patch_during_sweeps(
            store,
            [*patcher_args[:2], sid, *patcher_args[2:]],
            walker,
            rounds=args.patch_rounds,
            seconds=args.patch_seconds,
            due=100,
            due_interval=args.due_interval,
        )
        stats = store.statistics()
    finally:
        await store.aclose()
    return {
        "live_sessions": n,
        "terminated_sessions": n // 10,
        "fill_s": round(fill_s, 2),
        # Every read of this store here is a sweep's (SQLite: read directly
        # unless the read-only connection was busy, then on the worker).
        "sweep_reads": stats.operations.get("sweep_find", 0),
        "direct_reads": stats.direct_reads,
        "sweep": singles,
        "patch_in_other_process": patches,
    }


async def run_sweep_benchmarks(
    args: argparse.Namespace, tmp: str, dsn: str, pg: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per backend: the detail, and the headline figures for the top of the JSON."""
    label = _count_label(args.sweep_sessions)
    detail: dict[str, Any] = {}
    headline: dict[str, Any] = {}
    path = Path(tmp) / "sweep.db"
    backends: list[tuple[str, SessionStore, Any, list[str], str | None]] = [
        (
            "sqlite",
            SQLiteStore(path, synchronous="NORMAL"),
            lambda rows: _fill_sqlite(path, rows),
            ["sqlite", str(path)],
            None,
        )
    ]
    if pg:
        from mcp_sessions._store_pg import PostgresStore

        schema = f"bench_sweep_{uuid.uuid4().hex[:10]}"
        backends.append(
            (
                "postgresql",
                PostgresStore(dsn, schema=schema),
                lambda rows: _fill_pg(dsn, schema, rows),
                ["postgresql", dsn, schema],
                schema,
            )
        )
    for backend, store, fill, patcher_args, pg_schema in backends:
        try:
            d = await bench_sweep_backend(backend, store, fill, patcher_args, args)
            if pg_schema is not None:
                d |= _pg_analyzed(dsn, pg_schema)
        finally:
            if pg_schema is not None:
                _drop_schema(dsn, pg_schema)
        detail[backend] = d
        sw, pp = d["sweep"], d["patch_in_other_process"]
        idle, quiet, busy, spin = (pp[k] for k in ("idle", "nothing_due", "due", "cpu_spin"))
        headline |= {
            f"sweep_nothing_due_ms_{label}_{backend}": sw["nothing_due"]["median_ms"],
            f"sweep_nothing_due_max_ms_{label}_{backend}": sw["nothing_due"]["max_ms"],
            f"sweep_100_due_ms_{label}_{backend}": sw["some_due"]["median_ms"],
            f"sweep_100_due_max_ms_{label}_{backend}": sw["some_due"]["max_ms"],
            f"patch_p99_ms_idle_{backend}": idle["patch_p99_ms"],
            f"patch_p99_ms_during_sweeps_{backend}": quiet["patch_p99_ms"],
            f"patch_p99_ms_during_due_sweeps_{backend}": busy["patch_p99_ms"],
            f"patch_p99_ms_during_cpu_spin_{backend}": spin["patch_p99_ms"],
        }
        print(
            f"{backend:10} {d['live_sessions']} live + {d['terminated_sessions']} ended "
            f"sessions (filled in {d['fill_s']} s): "
            f"sweep, nothing due: median {sw['nothing_due']['median_ms']} ms, "
            f"max {sw['nothing_due']['max_ms']} ms, first {sw['nothing_due']['first_ms']} ms; "
            f"100 due: median {sw['some_due']['median_ms']} ms, "
            f"max {sw['some_due']['max_ms']} ms ({sw['some_due']['n']} runs each)",
            file=sys.stderr,
        )
        for phase, what in (
            ("idle", "no sweeps"),
            ("nothing_due", "sweeps back to back, nothing due"),
            ("due", f"a sweep of 100 due every {args.due_interval} s"),
            ("cpu_spin", "no sweeps, this process spinning"),
        ):
            p = pp[phase]
            sweeps = p.get("sweeps")
            extra = (
                f" [{sweeps['n']} sweeps, median {sweeps['median_ms']} ms, "
                f"max {sweeps['max_ms']} ms]"
                if sweeps
                else ""
            )
            print(
                f"{'':10} patch in another process, {what:34}: {p['patches']:>6} patches, "
                f"p50 {p['patch_p50_ms']:>7} ms, p99 {p['patch_p99_ms']:>7} ms, "
                f"max {p['patch_max_ms']:>8} ms{extra}",
                file=sys.stderr,
            )
        if "autoanalyzed" in d:
            print(
                f"{'':10} autovacuum analysed sessions meanwhile: {d['autoanalyzed']}",
                file=sys.stderr,
            )
    return detail, headline


async def main(coalesced: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of 50+50 patches")
    parser.add_argument(
        "--sweep-sessions",
        type=int,
        default=100_000,
        help="live sessions in the sweep benchmark (0: skip it)",
    )
    parser.add_argument("--sweep-runs", type=int, default=20, help="sweeps timed each way")
    parser.add_argument(
        "--patch-seconds", type=float, default=3.0, help="length of each patch phase"
    )
    parser.add_argument(
        "--patch-rounds", type=int, default=4, help="rounds of the four patch phases"
    )
    parser.add_argument(
        "--due-interval", type=float, default=0.1, help="seconds between sweeps finding 100 due"
    )
    parser.add_argument(
        "--sweep-only", action="store_true", help="skip everything but the sweep benchmark"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    headline: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, SessionStore]] = []
        if not args.sweep_only:
            stores += [
                ("memory", MemoryStore()),
                ("sqlite_normal", SQLiteStore(Path(tmp) / "normal.db", synchronous="NORMAL")),
                ("sqlite_full", SQLiteStore(Path(tmp) / "full.db", synchronous="FULL")),
            ]
        dsn = os.environ.get("MCP_SESSIONS_TEST_PG_DSN") or DEFAULT_PG
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        pg = _pg_available(dsn)
        if not pg:
            print(f"postgresql: not reachable at {dsn}, skipped", file=sys.stderr)
        elif not args.sweep_only:
            from mcp_sessions._store_pg import PostgresStore

            stores.append(("postgresql", PostgresStore(dsn, schema=schema)))
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
            if pg and not args.sweep_only:
                _drop_schema(dsn, schema)
        if args.sweep_sessions > 0:
            results["sweeps"], headline = await run_sweep_benchmarks(args, tmp, dsn, pg)
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
                "sweep_sessions": args.sweep_sessions,
                **headline,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    trio.run(main, writes_per_1000_requests())
