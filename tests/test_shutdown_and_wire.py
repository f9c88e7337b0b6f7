"""Shutdown and wire hardening (issue 9): open listen streams, strict JSON, a locked store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Settings, serve_stdio

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
GRACE = 10.0


def request(i: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": method,
        "params": {**(params or {}), "_meta": META},
    }


def listen(i: int | str) -> dict[str, Any]:
    return request(i, "subscriptions/listen", {"notifications": {"toolsListChanged": True}})


def tool(i: int | str, name: str, **arguments: Any) -> dict[str, Any]:
    return request(i, "tools/call", {"name": name, "arguments": arguments})


class RawClient:
    def __init__(self, stream: trio.testing.StapledStream[Any, Any]) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        await self.stream.send_all(data + b"\n")

    async def recv_line(self) -> bytes | None:
        while True:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self.buffer[:newline])
                del self.buffer[: newline + 1]
                return line
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk

    async def recv(self) -> dict[str, Any]:
        line = await self.recv_line()
        assert line is not None, "the server closed its output"
        value: dict[str, Any] = json.loads(line)
        return value

    async def answer(self, i: int | str) -> dict[str, Any]:
        """Read up to the answer to request ``i`` (skipping notifications and other answers)."""
        while True:
            message = await self.recv()
            if message.get("id") == i and "method" not in message:
                return message

    async def rest(self) -> list[dict[str, Any]]:
        lines = []
        while (line := await self.recv_line()) is not None:
            lines.append(json.loads(line))
        return lines


def slow_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("shutdown-test")

    @server.tool()
    async def slow(seconds: float) -> str:
        await trio.sleep(seconds)
        return "done"

    return server


@asynccontextmanager
async def in_process(
    server: MCPServer[Any], **kwargs: Any
) -> AsyncIterator[tuple[RawClient, trio.Event]]:
    """Serve ``server`` over a memory stream pair; yield a raw client and a "returned" event."""
    client_end, server_end = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        try:
            await serve_stdio(server, stdin=server_end, stdout=server_end, **kwargs)
        finally:
            await server_end.aclose()
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield RawClient(client_end), done
        await done.wait()


# -- item 1: open listen streams do not hold the exit ------------------------------------


async def test_a_call_in_flight_still_finishes_beside_an_open_listen_stream(
    autojump_clock: Any,
) -> None:
    async with in_process(slow_server(), settings=Settings(shutdown_grace=GRACE)) as (
        client,
        done,
    ):
        await client.send(listen(1))
        ack = await client.recv()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        await client.send(tool(2, "slow", seconds=3))
        await trio.sleep(0.5)
        start = trio.current_time()
        await client.stream.send_eof()
        answer = await client.answer(2)
        assert answer["result"]["structuredContent"] == {"result": "done"}
        await done.wait()
        # The call had its time; the listen stream added none of the grace period.
        assert 2 < trio.current_time() - start < 3 + 0.5


async def test_only_a_listen_stream_open_stops_without_waiting_the_grace(
    autojump_clock: Any,
) -> None:
    async with in_process(slow_server(), settings=Settings(shutdown_grace=GRACE)) as (
        client,
        done,
    ):
        await client.send(listen(1))
        ack = await client.recv()
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        await client.send(tool(2, "slow", seconds=0))
        assert "result" in await client.answer(2)
        start = trio.current_time()
        await client.stream.send_eof()
        await client.rest()
        await done.wait()
        assert trio.current_time() - start < 1  # was the whole grace period (10 s)
