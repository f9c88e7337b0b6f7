"""Benchmark: the session tools over stdio against the SDK's own server with a trivial tool.

    .venv/bin/python tests/benchmarks/bench_tools.py [--calls 1500] [--rounds 6]
        [--server-cmd "/path/to/mcp-sessions"] [--store URL]

Two servers, driven by the official client (``mode="legacy"``) over stdio, alternated
round by round (sdk, sessions, sdk, sessions, ...) so drift hits both alike:

- ``sdk``: the SDK's own asyncio stdio server (``MCPServer`` with one trivial tool
  ``echo``, served by ``mcp.run()``);
- ``sessions``: ``mcp-sessions serve`` on the default SQLite store
  (``$XDG_STATE_HOME/mcp-sessions/sessions.db``, with ``XDG_STATE_HOME`` pointed at a
  fresh temporary directory every round, so the real store is never touched), all
  other settings at their defaults except the log level (warning: no line per session).

Measured, each sequentially (one call at a time) and 50-way concurrent:

- ``sdk echo``: the trivial tool;
- ``state_patch``: ``session_state_patch`` on one handle;
- ``state_get``: ``session_state_get`` on one handle;
- ``state_patch 50 handles``: 50-way only, each of the 50 callers on its own handle.

Prints calls/s (best round, median in brackets) and each figure's ratio to ``sdk echo``
(sequential to sequential, 50-way to 50-way; best to best, median to median), then one
JSON object as the last line of stdout, which also has every round's figures and the
median of the per-round ratios (each round against the same round's ``sdk echo``).
Progress goes to stderr. The defaults take about 2 minutes on a 2-core machine.

``--server-cmd`` is the command that runs ``mcp-sessions`` (default: this interpreter's
``-m mcp_sessions``), e.g. another checkout's ``.venv/bin/mcp-sessions`` for a
before/after comparison. ``--store`` replaces the default store (e.g. ``memory``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

CONCURRENCY = 50
WARMUP = 50

MEASURES = ("sdk echo", "state_patch", "state_get", "state_patch 50 handles")


def serve_sdk() -> None:
    from mcp.server.mcpserver import MCPServer

    mcp = MCPServer("bench")

    @mcp.tool()
    async def echo(text: str) -> str:
        return text

    mcp.run()


Call = Callable[[int], Awaitable[None]]


def _checked(client: Client, tool: str, args: Callable[[int], dict[str, Any]]) -> Call:
    async def call(i: int) -> None:
        result = await client.call_tool(tool, args(i))
        if result.is_error:
            raise RuntimeError(f"{tool} failed: {result.content}")

    return call


async def sequential(call: Call, calls: int) -> float:
    for i in range(WARMUP):
        await call(i)
    start = time.perf_counter()
    for i in range(calls):
        await call(i)
    return calls / (time.perf_counter() - start)


async def concurrent(calls_by_worker: list[Call], calls: int) -> float:
    """``calls`` calls (rounded down to a multiple of the workers) from len(workers) tasks."""
    per_task = max(1, calls // len(calls_by_worker))

    async def warm(call: Call) -> None:
        await call(0)

    async def worker(call: Call) -> None:
        for i in range(per_task):
            await call(i)

    async with trio.open_nursery() as nursery:
        for call in calls_by_worker:
            nursery.start_soon(warm, call)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for call in calls_by_worker:
            nursery.start_soon(worker, call)
    return per_task * len(calls_by_worker) / (time.perf_counter() - start)


async def measure_sdk(calls: int) -> dict[str, tuple[float | None, float | None]]:
    params = StdioServerParameters(command=sys.executable, args=[__file__, "--serve-sdk"])
    async with Client(params, mode="legacy") as client:
        echo = _checked(client, "echo", lambda i: {"text": "hi"})
        seq = await sequential(echo, calls)
        conc = await concurrent([echo] * CONCURRENCY, calls)
    return {"sdk echo": (seq, conc)}


async def measure_sessions(
    calls: int, server_cmd: list[str], state_home: Path, store: str | None
) -> dict[str, tuple[float | None, float | None]]:
    args = [*server_cmd[1:], "serve"]
    if store:
        args += ["--store", store]
    env = {"XDG_STATE_HOME": str(state_home), "MCP_SESSIONS_LOG_LEVEL": "warning"}
    params = StdioServerParameters(command=server_cmd[0], args=args, env=env)
    async with Client(params, mode="legacy") as client:

        async def open_handle() -> str:
            result = await client.call_tool("session_open", {})
            if result.is_error or not result.structured_content:
                raise RuntimeError(f"session_open failed: {result.content}")
            return str(result.structured_content["session"])

        handle = await open_handle()
        handles = [await open_handle() for _ in range(CONCURRENCY)]

        def patch(h: str) -> Call:
            return _checked(
                client, "session_state_patch", lambda i: {"session": h, "patch": {"n": i}}
            )

        get = _checked(client, "session_state_get", lambda i: {"session": handle})
        return {
            "state_patch": (
                await sequential(patch(handle), calls),
                await concurrent([patch(handle)] * CONCURRENCY, calls),
            ),
            "state_get": (
                await sequential(get, calls),
                await concurrent([get] * CONCURRENCY, calls),
            ),
            "state_patch 50 handles": (None, await concurrent([patch(h) for h in handles], calls)),
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


async def main(args: argparse.Namespace) -> None:
    server_cmd = shlex.split(args.server_cmd)
    rounds: dict[str, list[tuple[float | None, float | None]]] = {m: [] for m in MEASURES}
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        for r in range(args.rounds):
            for kind in ("sdk", "sessions"):
                if kind == "sdk":
                    got = await measure_sdk(args.calls)
                else:
                    home = Path(tmp) / f"round-{r}"
                    home.mkdir()
                    got = await measure_sessions(args.calls, server_cmd, home, args.store)
                for name, (seq, conc) in got.items():
                    rounds[name].append((seq, conc))
                    print(f"round {r + 1} {name:24s} sequential {_fmt(seq):>6s}/s  "
                          f"50-way {_fmt(conc):>6s}/s", file=sys.stderr)  # fmt: skip

    def figures(name: str, column: int) -> list[float | None]:
        return [v[column] for v in rounds[name]]

    results: dict[str, Any] = {}
    print(
        f"\n{args.calls} calls per figure, {args.rounds} rounds, alternating; best round "
        "shown, median in brackets; ratio = to 'sdk echo' (best / median)"
    )
    print(f"{'measure':24s} {'sequential/s':>16s} {'ratio':>12s} {'50-way/s':>16s} {'ratio':>12s}")
    for name in MEASURES:
        row: dict[str, Any] = {}
        cells: list[str] = []
        for column, label in ((0, "sequential"), (1, "concurrent50")):
            mine = figures(name, column)
            sdk = figures("sdk echo", column)
            values = [v for v in mine if v is not None]
            ref = [v for v in sdk if v is not None]
            if not values or not ref:
                cells += [f"{'-':>16s}", f"{'-':>12s}"]
                continue
            best, median = max(values), statistics.median(values)
            ratio = (best / max(ref), median / statistics.median(ref))
            paired = [m / b for m, b in zip(mine, sdk, strict=True) if m is not None and b]
            row[label] = {
                "best": round(best, 1),
                "median": round(median, 1),
                "ratio_best": round(ratio[0], 3),
                "ratio_median": round(ratio[1], 3),
                "ratio_paired_median": round(statistics.median(paired), 3),
                "rounds": [round(v, 1) for v in values],
            }
            cells += [f"{best:7.0f} [{median:6.0f}]", f"{ratio[0]:5.2f}x/{ratio[1]:4.2f}x"]
        results[name] = row
        print(f"{name:24s} {' '.join(cells)}")
    print(
        json.dumps(
            {
                "calls": args.calls,
                "rounds": args.rounds,
                "concurrency": CONCURRENCY,
                "server_cmd": args.server_cmd,
                "store": args.store or "default sqlite",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-sdk", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1500, help="calls per figure (default 1500)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument(
        "--server-cmd",
        default=f"{shlex.quote(sys.executable)} -m mcp_sessions",
        help="command running mcp-sessions (default: this Python's -m mcp_sessions)",
    )
    parser.add_argument("--store", help="store URL instead of the default SQLite store")
    cli = parser.parse_args()
    if cli.serve_sdk:
        serve_sdk()
    else:
        trio.run(main, cli)
