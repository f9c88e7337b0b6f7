"""Benchmark: one trivial tool served three ways, driven by the official client over stdio.

    .venv/bin/python tests/benchmarks/bench_stdio.py [--calls 2000] [--rounds 3]

Servers (alternated round by round, so drift hits all three alike):

- ``sdk-asyncio``: the SDK's own stdio server, ``mcp.run()`` (asyncio);
- ``sdk-trio``: the SDK's own stdio server under ``trio.run(mcp.run_stdio_async)``;
- ``run_stdio``: ``mcp_sessions.run_stdio(mcp)`` (trio-native transport + session layer).

Each is measured sequentially (one call at a time) and 50-way concurrent. Prints
calls/s (best round) and the ratio to ``sdk-asyncio``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer

SERVERS = ("sdk-asyncio", "sdk-trio", "run_stdio")
CONCURRENCY = 50


def make_server() -> MCPServer:
    mcp = MCPServer("bench")

    @mcp.tool()
    async def echo(text: str) -> str:
        return text

    return mcp


def serve(kind: str) -> None:
    mcp = make_server()
    if kind == "sdk-asyncio":
        mcp.run()
    elif kind == "sdk-trio":
        trio.run(mcp.run_stdio_async)
    else:
        from mcp_sessions import run_stdio

        run_stdio(mcp)


async def measure(kind: str, calls: int) -> tuple[float, float]:
    params = StdioServerParameters(command=sys.executable, args=[__file__, "--serve", kind])
    async with Client(params, mode="legacy") as client:
        for _ in range(50):  # warm up
            await client.call_tool("echo", {"text": "hi"})
        start = time.perf_counter()
        for _ in range(calls):
            await client.call_tool("echo", {"text": "hi"})
        sequential = calls / (time.perf_counter() - start)

        per_task = max(1, calls // CONCURRENCY)

        async def worker() -> None:
            for _ in range(per_task):
                await client.call_tool("echo", {"text": "hi"})

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)
        concurrent = per_task * CONCURRENCY / (time.perf_counter() - start)
    return sequential, concurrent


async def main(calls: int, rounds: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in SERVERS}
    for r in range(rounds):
        for kind in SERVERS:
            results[kind].append(await measure(kind, calls))
            seq, conc = results[kind][-1]
            print(f"round {r + 1} {kind:12s} sequential {seq:8.0f}/s  concurrent {conc:8.0f}/s",
                  file=sys.stderr)  # fmt: skip
    base_seq = max(s for s, _ in results["sdk-asyncio"])
    base_conc = max(c for _, c in results["sdk-asyncio"])
    print(f"\n{calls} calls each, {rounds} rounds, best round shown (median in brackets)")
    print(f"{'server':12s} {'sequential/s':>14s} {'ratio':>6s} {'50-way/s':>14s} {'ratio':>6s}")
    for kind in SERVERS:
        seqs = [s for s, _ in results[kind]]
        concs = [c for _, c in results[kind]]
        print(
            f"{kind:12s} {max(seqs):7.0f} [{statistics.median(seqs):5.0f}] "
            f"{max(seqs) / base_seq:5.2f}x {max(concs):7.0f} [{statistics.median(concs):5.0f}] "
            f"{max(concs) / base_conc:5.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=SERVERS)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
    else:
        trio.run(main, args.calls, args.rounds)
