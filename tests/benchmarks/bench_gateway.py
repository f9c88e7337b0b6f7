"""Benchmark: what the gateway costs, as a client meets it (the official client over stdio).

    .venv/bin/python tests/benchmarks/bench_gateway.py [--calls 1000] [--rounds 3]

Three ways to one upstream (``tests/gateway_upstream.py``, its ``echo`` tool), alternated
round by round so that drift hits all alike:

- ``direct``: the client starts the upstream itself;
- ``relay``: through ``byte_relay.py``, a process that only copies bytes both ways: the
  floor of any stdio gateway (one more process and two more pipe hops, no protocol);
- ``gateway``: the client starts ``mcp-sessions gateway`` with that upstream in its
  config (the default pool, or ``--pool '{"max": 1}'``).

Each is measured sequentially (one call at a time) and 50-way concurrent; calls/s of the
best round and the gateway/direct ratio are printed. ``--work-ms N`` calls the upstream's
``slow`` tool instead, which waits N ms (a tool that does something: an API call, a query).
Then the latency of one call through the gateway on a pooled session against one that must
start its upstream (the pool emptied first: ``idle_timeout`` 0.1 s, ``min`` 0, waited until
no upstream process is left): median of ``--cold`` tries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = str(ROOT / "tests" / "gateway_upstream.py")
RELAY = str(ROOT / "tests" / "benchmarks" / "byte_relay.py")
CONCURRENCY = 50


def params(kind: str, config: Path) -> StdioServerParameters:
    if kind == "direct":
        return StdioServerParameters(command=sys.executable, args=[UPSTREAM])
    if kind == "relay":
        return StdioServerParameters(command=sys.executable, args=[RELAY, sys.executable, UPSTREAM])
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_sessions", "gateway", "--config", str(config), "--store", "memory",
              "--log-level", "warning"],
    )  # fmt: skip


#: The call: ``echo`` (trivial), or ``slow`` for a tool that waits ``--work-ms``.
CALL: tuple[str, dict[str, object]] = ("echo", {"text": "hi"})


def tool(kind: str) -> str:
    return "up__" + CALL[0] if kind == "gateway" else CALL[0]


async def measure(kind: str, config: Path, calls: int) -> tuple[float, float]:
    name = tool(kind)
    async with Client(params(kind, config), mode="legacy") as client:
        for _ in range(50):  # warm up (and fill the pool)
            await client.call_tool(name, CALL[1])
        start = time.perf_counter()
        for _ in range(calls):
            await client.call_tool(name, CALL[1])
        sequential = calls / (time.perf_counter() - start)

        async def worker(n: int) -> None:
            for _ in range(n):
                await client.call_tool(name, CALL[1])

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker, calls // CONCURRENCY)
        concurrent = (calls // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - start)
    return sequential, concurrent


async def latencies(config: Path, tries: int) -> tuple[float, float]:
    """Median ms of a call that starts the upstream, and of one on a pooled session.

    ``config``'s pool ends idle sessions at once (``idle_timeout`` 0.1 s, ``min`` 0):
    after each pooled run the pool is waited until empty (no upstream process left, per
    ``gateway://status``), so the next call must start its upstream: spawn, initialize,
    call, as a gateway without a pool pays on every call.
    """
    cold: list[float] = []
    warm: list[float] = []
    async with Client(params("gateway", config), mode="legacy") as client:
        for _ in range(tries):
            while True:  # until the idle session has ended
                status = await client.read_resource("gateway://status")
                if not json.loads(status.contents[0].text)["up"]["pids"]:  # type: ignore[union-attr]
                    break
                await trio.sleep(0.05)
            start = time.perf_counter()
            await client.call_tool("up__echo", {"text": "hi"})
            cold.append(time.perf_counter() - start)
            for _ in range(20):
                start = time.perf_counter()
                await client.call_tool("up__echo", {"text": "hi"})
                warm.append(time.perf_counter() - start)
    return statistics.median(cold) * 1000, statistics.median(warm) * 1000


async def main(calls: int, rounds: int, cold_tries: int, pool: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.json"
        upstream = {"command": sys.executable, "args": [UPSTREAM], "pool": pool}
        config.write_text(json.dumps({"mcpServers": {"up": upstream}}))
        results: dict[str, list[tuple[float, float]]] = {"direct": [], "relay": [], "gateway": []}
        for _ in range(rounds):
            for kind in results:
                results[kind].append(await measure(kind, config, calls))
        best = {k: (max(s for s, _ in v), max(c for _, c in v)) for k, v in results.items()}
        print(f"{'':10} {'sequential':>12} {'50-way':>12}   calls/s, best of {rounds}")
        for kind, (seq, conc) in best.items():
            print(f"{kind:10} {seq:12.0f} {conc:12.0f}")
        for kind in ("relay", "gateway"):
            ratio_s = best[kind][0] / best["direct"][0]
            ratio_c = best[kind][1] / best["direct"][1]
            print(f"{'ratio':10} {ratio_s:12.2f} {ratio_c:12.2f}   {kind} / direct")
        cold_config = Path(tmp) / "cold.json"
        quick = {**upstream, "pool": {**pool, "min": 0, "idle_timeout": 0.1}}
        cold_config.write_text(json.dumps({"mcpServers": {"up": quick}}))
        cold, warm = await latencies(cold_config, cold_tries)
        print(f"latency through the gateway: {warm:.2f} ms pooled, {cold:.1f} ms when the "
              f"call starts its upstream (median of {cold_tries})")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--pool", type=json.loads, default={}, help="e.g. '{\"max\": 1}'")
    parser.add_argument("--work-ms", type=float, default=0.0, help="a tool that waits this long")
    args = parser.parse_args()
    if args.work_ms:
        CALL = ("slow", {"seconds": args.work_ms / 1000})
    trio.run(main, args.calls, args.rounds, args.cold, args.pool)
