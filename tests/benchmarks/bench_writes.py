"""Store row writes per 1000 tool calls through the handle path clients use (plain script).

    .venv/bin/python tests/benchmarks/bench_writes.py [--calls 1000]
        [--backends sqlite,postgresql] [--dsn DSN] [--server-cmd "/path/to/mcp-sessions"]

What a client does: the official client (``mode="legacy"``) over stdio against
``mcp-sessions serve --store URL`` (the CLI, default settings), opens a handle with
``session_open``, then makes ``--calls`` calls of ``session_state_get``, ``--calls`` of
``session_info`` and ``--calls`` of ``session_state_patch`` on that handle, one phase after
the other. Each phase is followed by ``--settle`` seconds without calls (longer than the
server's ``touch_interval``, 5 s by default) so the coalesced activity writes it caused land
in it. An ``idle`` phase (no calls, one settle period) shows the background writes, and
``shutdown`` the writes made when the client disconnects (after one more ``session_info``
that reads the request count back). ``connect`` is the server's start and the
initialize handshake (which opens the connection's own session).

How rows are counted, on the ``sessions`` table of the bench's own store:

- both backends: ``AFTER INSERT/UPDATE/DELETE ... FOR EACH ROW`` triggers count into a side
  table (``bench_writes``), installed after the schema exists and before the server starts
  (``mcp-sessions status --store URL`` applies the migrations first). Exact, committed rows
  only, visible as soon as the server commits.
- PostgreSQL also: the server's own row counters in ``pg_stat_user_tables``
  (``n_tup_ins + n_tup_upd + n_tup_del``, which also count rows of rolled-back
  transactions) and reads (``seq_scan + idx_scan``: scans begun by any statement, so an
  ``UPDATE ... WHERE id = ...`` counts one index scan as well as its row write). A
  backend publishes its counters at most once a second and, once idle, within 10 s
  (``PGSTAT_IDLE_INTERVAL``), and on exit; so every PostgreSQL phase waits
  ``--pg-stats-wait`` (11 s) more before it reads them, and reads with
  ``pg_stat_clear_snapshot()`` first. The ``pg_stat_xact_*`` views only show the
  reading backend's own transaction, so they cannot see the server's.

SQLite: a temporary file (``sqlite:///tmp/.../sessions.db``). PostgreSQL: ``--dsn``,
``MCP_SESSIONS_TEST_PG_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``, in a
throwaway schema (``?schema=bench_writes_...``) dropped at the end; skipped if unreachable.

Prints a table to stdout and one JSON object as its last line; the server's log to stderr.
``--server-cmd`` runs ``mcp-sessions`` (default: this interpreter's ``-m mcp_sessions``),
e.g. another checkout's ``.venv/bin/mcp-sessions`` for a before/after comparison. About
1 minute for SQLite and 2.5 minutes for PostgreSQL with the defaults. SQLite has no
counters another process can read, so reads are reported for PostgreSQL only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
OPS = ("ins", "upd", "del")
TOOLS = ("session_state_get", "session_info", "session_state_patch")

Counters = dict[str, int]


class SQLiteCounters:
    """Trigger counts on the bench's own SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"

    def install(self) -> None:
        with sqlite3.connect(self.path, isolation_level=None) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE bench_writes (op TEXT PRIMARY KEY, n INTEGER NOT NULL)")
            for op, event in zip(OPS, ("INSERT", "UPDATE", "DELETE"), strict=True):
                conn.execute("INSERT INTO bench_writes VALUES (?, 0)", (op,))
                conn.execute(
                    f"CREATE TRIGGER bench_writes_{op} AFTER {event} ON sessions FOR EACH ROW "
                    f"BEGIN UPDATE bench_writes SET n = n + 1 WHERE op = '{op}'; END"
                )
            conn.execute("COMMIT")

    def read(self) -> Counters:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            return {f"trigger_{op}": n for op, n in conn.execute("SELECT op, n FROM bench_writes")}
        finally:
            conn.close()

    def drop(self) -> None:
        pass  # the temporary directory goes


class PostgresCounters:
    """Trigger counts plus the server's own statistics, in a throwaway schema."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.schema = f"bench_writes_{uuid.uuid4().hex[:10]}"
        sep = "&" if "?" in dsn else "?"
        self.url = f"{dsn}{sep}schema={self.schema}"

    def _conn(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def install(self) -> None:
        s = f'"{self.schema}"'
        with self._conn() as conn, conn.transaction():
            conn.execute(f"CREATE TABLE {s}.bench_writes (op text PRIMARY KEY, n bigint NOT NULL)")
            conn.execute(
                f"CREATE FUNCTION {s}.bench_count() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN UPDATE {s}.bench_writes SET n = n + 1 WHERE op = TG_ARGV[0]; "
                "RETURN NULL; END $$"
            )
            for op, event in zip(OPS, ("INSERT", "UPDATE", "DELETE"), strict=True):
                conn.execute(f"INSERT INTO {s}.bench_writes VALUES (%s, 0)", (op,))
                conn.execute(
                    f"CREATE TRIGGER bench_writes_{op} AFTER {event} ON {s}.sessions "
                    f"FOR EACH ROW EXECUTE FUNCTION {s}.bench_count('{op}')"
                )

    def read(self) -> Counters:
        with self._conn() as conn:
            got: Counters = {
                f"trigger_{op}": n
                for op, n in conn.execute(f'SELECT op, n FROM "{self.schema}".bench_writes')
            }
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT n_tup_ins, n_tup_upd, n_tup_del, seq_scan, coalesce(idx_scan, 0) "
                "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'sessions'",
                (self.schema,),
            ).fetchone()
        assert row is not None, "no statistics row for the sessions table"
        got.update(
            zip(("stat_ins", "stat_upd", "stat_del", "seq_scan", "idx_scan"), row, strict=True)
        )
        return got

    def drop(self) -> None:
        with self._conn() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def _pg_available(dsn: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except Exception:
        return False


def _delta(before: Counters, after: Counters, calls: int, seconds: float) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in after}
    out: dict[str, Any] = {
        "calls": calls,
        "seconds": round(seconds, 2),
        "writes": d["trigger_ins"] + d["trigger_upd"] + d["trigger_del"],
        "by_op": {op: d[f"trigger_{op}"] for op in OPS},
    }
    if "stat_ins" in d:
        out["pg_stat_writes"] = d["stat_ins"] + d["stat_upd"] + d["stat_del"]
        out["pg_stat_by_op"] = {op: d[f"stat_{op}"] for op in OPS}
        out["reads"] = d["seq_scan"] + d["idx_scan"]
        out["reads_by_kind"] = {"seq_scan": d["seq_scan"], "idx_scan": d["idx_scan"]}
    if calls > 1:
        out["writes_per_1000_calls"] = round(out["writes"] * 1000 / calls, 1)
    if calls and "reads" in out:
        out["reads_per_call"] = round(out["reads"] / calls, 2)
    return out


async def run_backend(
    counters: SQLiteCounters | PostgresCounters,
    server_cmd: list[str],
    state_home: Path,
    calls: int,
    wait: float,
) -> dict[str, Any]:
    # The schema first (status applies the migrations), then the counting triggers.
    await trio.run_process(
        [*server_cmd, "status", "--store", counters.url],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "XDG_STATE_HOME": str(state_home)},
    )
    counters.install()
    params = StdioServerParameters(
        command=server_cmd[0],
        args=[*server_cmd[1:], "serve", "--store", counters.url, "--log-level", "warning"],
        env={"XDG_STATE_HOME": str(state_home)},
    )
    phases: dict[str, Any] = {}
    mark = (counters.read(), time.perf_counter())

    async def settle(name: str, n: int) -> None:
        """Close the phase that began at ``mark`` after ``wait`` quiet seconds."""
        nonlocal mark
        await trio.sleep(wait)
        now = (counters.read(), time.perf_counter())
        phases[name] = _delta(mark[0], now[0], n, now[1] - mark[1])
        print(f"  {name}: {phases[name]}", file=sys.stderr)
        mark = now

    async with Client(params, mode="legacy") as client:
        await settle("connect", 0)  # the server's start and the connection's own session

        async def call(tool: str, args: dict[str, Any]) -> dict[str, Any]:
            result = await client.call_tool(tool, args)
            if result.is_error or result.structured_content is None:
                raise RuntimeError(f"{tool} failed: {result.content}")
            return dict(result.structured_content)

        handle = (await call("session_open", {}))["session"]
        await settle("session_open", 1)
        await settle("idle", 0)
        for tool in TOOLS:
            for i in range(calls):
                args: dict[str, Any] = {"session": handle}
                if tool == "session_state_patch":
                    args["patch"] = {"n": i}
                await call(tool, args)
            await settle(tool, calls)
        info = await call("session_info", {"session": handle})
    # The server has exited; its PostgreSQL backends published their counters on exit.
    await trio.sleep(1.0)
    now = (counters.read(), time.perf_counter())
    phases["shutdown"] = _delta(mark[0], now[0], 0, now[1] - mark[1])
    phases["final_session_info"] = {k: info.get(k) for k in ("requests", "version", "state")}
    return phases


def _row(backend: str, name: str, p: dict[str, Any]) -> str:
    by_op = "/".join(str(p["by_op"][op]) for op in OPS)
    per = f"{p['writes_per_1000_calls']:.0f}" if "writes_per_1000_calls" in p else "-"
    stat = str(p.get("pg_stat_writes", "-"))
    reads = p.get("reads_per_call", f"({p['reads']} in all)" if "reads" in p else "-")
    return (
        f"{backend:10s} {name:20s} {p['calls']:>6d} {p['seconds']:>7.1f} {p['writes']:>7d} "
        f"{by_op:>12s} {per:>9s} {stat:>8s} {reads!s:>12s}"
    )


async def main(args: argparse.Namespace) -> None:
    server_cmd = shlex.split(args.server_cmd)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
        for backend in backends:
            counters: SQLiteCounters | PostgresCounters
            wait = args.settle
            if backend == "sqlite":
                counters = SQLiteCounters(Path(tmp) / "sqlite" / "sessions.db")
            elif backend == "postgresql":
                if not _pg_available(args.dsn):
                    print(f"postgresql: not reachable at {args.dsn}, skipped", file=sys.stderr)
                    continue
                counters = PostgresCounters(args.dsn)
                wait += args.pg_stats_wait
            else:
                raise SystemExit(f"unknown backend {backend!r} (sqlite, postgresql)")
            print(f"{backend}: {counters.url}", file=sys.stderr)
            home = Path(tmp) / f"state-{backend}"
            home.mkdir()
            try:
                results[backend] = await run_backend(counters, server_cmd, home, args.calls, wait)
            finally:
                counters.drop()
    print(
        f"\nstore row writes on the sessions table (triggers; ins/upd/del), {args.calls} calls "
        "per tool on one handle, each phase with its settle time; pg-stat = PostgreSQL's own "
        "n_tup_ins+upd+del, reads = its seq_scan+idx_scan"
    )
    print(
        f"{'backend':10s} {'phase':20s} {'calls':>6s} {'secs':>7s} {'writes':>7s} "
        f"{'ins/upd/del':>12s} {'per 1000':>9s} {'pg-stat':>8s} {'reads/call':>12s}"
    )
    for backend, phases in results.items():
        for name, p in phases.items():
            if name != "final_session_info":
                print(_row(backend, name, p))
    print(json.dumps({"calls": args.calls, "server_cmd": args.server_cmd, "results": results}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per tool (default 1000)")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="default: sqlite,postgresql"
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("MCP_SESSIONS_TEST_PG_DSN") or DEFAULT_PG,
        help=f"PostgreSQL DSN (default: $MCP_SESSIONS_TEST_PG_DSN or {DEFAULT_PG})",
    )
    parser.add_argument(
        "--server-cmd",
        default=f"{shlex.quote(sys.executable)} -m mcp_sessions",
        help="command running mcp-sessions (default: this Python's -m mcp_sessions)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=6.0,
        help="quiet seconds after each phase, > the server's touch_interval (default 6)",
    )
    parser.add_argument(
        "--pg-stats-wait",
        type=float,
        default=11.0,
        help="extra seconds per PostgreSQL phase for its statistics to be published (default 11)",
    )
    trio.run(main, parser.parse_args())
