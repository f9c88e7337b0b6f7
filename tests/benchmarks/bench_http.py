"""Benchmark: one trivial tool over Streamable HTTP, the SDK's server against ``run_http``.

    .venv/bin/python tests/benchmarks/bench_http.py [--calls 1000] [--rounds 3] [--pg DSN]

Servers (separate processes, alternated round by round so drift hits all alike):

- ``sdk-uvicorn``: the SDK's own Streamable HTTP app (``streamable_http_app()``) under
  uvicorn (asyncio), with its own stateful session manager;
- ``sdk-anycorn``: the same SDK app under anycorn on trio (what ``run_http`` runs on,
  without the session layer): separates the ASGI server's cost from the layer's;
- ``run_http``: ``mcp_sessions.run_http`` (anycorn under trio, with the session layer),
  memory store;
- ``run_http+sqlite`` (and ``run_http+pg`` with ``--pg``): the same on a store, where the
  measured call is ``session_state_patch`` on one handle (a store write per call).

The official client drives each in ``legacy`` mode (one HTTP session; every call is one
POST answered with an SSE stream) and in ``2026-07-28`` mode (every call stands alone),
sequentially and 50-way concurrent. Prints calls/s (best round, median in brackets) and
the ratio to ``sdk-uvicorn``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

CONCURRENCY = 50


def make_server() -> MCPServer:
    mcp = MCPServer("bench")

    @mcp.tool()
    async def echo(text: str) -> str:
        return text

    return mcp


def serve(kind: str, port: int, store: str | None) -> None:
    mcp = make_server()
    if kind == "sdk-uvicorn":
        import uvicorn

        app = mcp.streamable_http_app()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
        return
    if kind == "sdk-anycorn":
        import anycorn

        config = anycorn.Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        trio.run(anycorn.serve, mcp.streamable_http_app(), config)
        return
    from mcp_sessions import run_http

    run_http(mcp, port=port, store=store or "memory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
                return
            except OSError:
                await trio.sleep(0.05)


async def drive(url: str, mode: str, calls: int, tool: str, arguments: Any) -> tuple[float, float]:
    async with Client(url, mode=mode) as client:
        if tool == "session_state_patch":
            opened = await client.call_tool("session_open", {})
            assert opened.structured_content is not None
            arguments = {"session": opened.structured_content["session"], "patch": {"n": 1}}
        for _ in range(20):  # warm up
            await client.call_tool(tool, arguments)
        start = time.perf_counter()
        for _ in range(calls):
            await client.call_tool(tool, arguments)
        sequential = calls / (time.perf_counter() - start)
        per_task = max(1, calls // CONCURRENCY)

        async def worker() -> None:
            for _ in range(per_task):
                await client.call_tool(tool, arguments)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)
        concurrent = per_task * CONCURRENCY / (time.perf_counter() - start)
    return sequential, concurrent


async def measure(kind: str, store: str | None, calls: int) -> dict[str, tuple[float, float]]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    if store:
        command += ["--store", store]
    env = dict(os.environ, MCP_SESSIONS_LOG_LEVEL="warning")
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        await wait_up(port)
        url = f"http://127.0.0.1:{port}/mcp"
        tool, arguments = ("echo", {"text": "hi"})
        if store:
            tool, arguments = ("session_state_patch", None)
        return {
            mode: await drive(url, mode, calls, tool, arguments)
            for mode in ("legacy", "2026-07-28")
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


async def main(calls: int, rounds: int, pg: str | None) -> None:
    tmp = tempfile.mkdtemp()
    servers: list[tuple[str, str, str | None]] = [
        ("sdk-uvicorn", "sdk-uvicorn", None),
        ("sdk-anycorn", "sdk-anycorn", None),
        ("run_http", "run_http", None),
        ("run_http+sqlite", "run_http", f"sqlite:///{tmp}/bench.db"),
    ]
    if pg:
        servers.append(("run_http+pg", "run_http", pg))
    results: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name, _, _ in servers}
    for r in range(rounds):
        for name, kind, store in servers:
            got = await measure(kind, store, calls)
            results[name].append(got)
            line = "  ".join(f"{m}: {s:6.0f}/s seq {c:6.0f}/s 50-way" for m, (s, c) in got.items())
            print(f"round {r + 1} {name:16s} {line}", file=sys.stderr)
    print(f"\n{calls} calls each, {rounds} rounds, best round (median in brackets);")
    print("the +store rows call session_state_patch (a write per call), the others echo")
    for mode in ("legacy", "2026-07-28"):
        base_seq = max(x[mode][0] for x in results["sdk-uvicorn"])
        base_conc = max(x[mode][1] for x in results["sdk-uvicorn"])
        print(f"\nmode {mode}")
        print(f"{'server':16s} {'sequential/s':>14s} {'ratio':>6s} {'50-way/s':>14s} {'ratio':>6s}")
        for name, _, _ in servers:
            seqs = [x[mode][0] for x in results[name]]
            concs = [x[mode][1] for x in results[name]]
            print(
                f"{name:16s} {max(seqs):7.0f} [{statistics.median(seqs):5.0f}] "
                f"{max(seqs) / base_seq:5.2f}x {max(concs):7.0f} [{statistics.median(concs):5.0f}] "
                f"{max(concs) / base_conc:5.2f}x"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("sdk-uvicorn", "sdk-anycorn", "run_http"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--store")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", help="also a PostgreSQL store (a DSN)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.store)
    else:
        trio.run(main, args.calls, args.rounds, args.pg)
