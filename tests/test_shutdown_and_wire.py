"""Shutdown and wire hardening (issue 9): open listen streams, strict JSON, a locked store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCResponse
from pydantic import ValidationError

from mcp_sessions import Settings, serve_stdio
from mcp_sessions._stopping import StoreWaits
from mcp_sessions._tools import install_session_tools
from mcp_sessions._transport import StdioTransport

from .test_store_contract import PG_DSN, PG_SKIP, drop_pg_schema, pg_schema

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

    async def rest_lines(self) -> list[bytes]:
        lines = []
        while (line := await self.recv_line()) is not None:
            lines.append(line)
        return lines

    async def rest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in await self.rest_lines()]


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


# -- item 4: strict JSON on the wire -------------------------------------------------------


def number_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("numbers")

    @server.tool()
    async def echo_number(x: float) -> float:
        return x

    @server.tool()
    async def not_a_number() -> dict[str, float]:
        return {"x": float("nan"), "y": float("inf")}

    return server


NON_JSON_LINES = [
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}',
    b'{"jsonrpc":"2.0","id":2,"method":"ping","params":{"x":Infinity}}',
    b'{"jsonrpc":"2.0","id":3,"method":"ping","params":{"x":-Infinity}}',
    b'{"jsonrpc":"2.0","id":4,"method":"ping","params":{"x":1e400}}',
    b'{"jsonrpc":"2.0","id":5,"method":"ping","params":{"x":-1E+0400}}',
    b'{"jsonrpc":"2.0","id":6,"method":"ping","params":{"x":1' + b"0" * 400 + b".5}}",
    b'{"jsonrpc":"2.0","id":7,"method":"ping","params":NaN}',
]


async def test_nan_infinity_and_overflowing_numbers_get_parse_error(autojump_clock: Any) -> None:
    async with in_process(number_server()) as (client, _done):
        for line in NON_JSON_LINES:
            await client.send(line)
            reply = await client.recv()
            assert reply["id"] is None, line
            assert reply["error"]["code"] == -32700, line
        # Still serving, still in sync; look-alikes that are JSON pass.
        await client.send(tool(8, "echo_number", x=1e308))
        reply = await client.answer(8)
        assert reply["result"]["structuredContent"] == {"result": 1e308}
        await client.send(tool(9, "echo_number", x=1.5e-300))
        assert (await client.answer(9))["result"]["structuredContent"] == {"result": 1.5e-300}
        text = "NaN Infinity 1e400 1" + "0" * 400
        await client.send(request(10, "tools/call", {"name": "echo_number", "arguments": {"x": 2},
                                                     "note": text}))  # fmt: skip
        assert (await client.answer(10))["result"]["structuredContent"] == {"result": 2}
        await client.stream.send_eof()
        await client.rest()


async def test_session_open_with_an_overflowing_idle_timeout(autojump_clock: Any) -> None:
    async with in_process(MCPServer("open")) as (client, _done):
        await client.send(
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"session_open",'
            b'"arguments":{"idle_timeout_s":1e400},"_meta":' + json.dumps(META).encode() + b"}}"
        )
        reply = await client.recv()
        assert (reply["id"], reply["error"]["code"]) == (None, -32700)
        await client.stream.send_eof()
        await client.rest()


async def test_session_open_refuses_an_infinite_idle_timeout(autojump_clock: Any) -> None:
    # Infinity cannot come over stdio any more; from any other source it is invalid_arguments.
    server: MCPServer[Any] = MCPServer("open")
    await install_session_tools(server)
    session_open = server._tool_manager.get_tool("session_open")
    assert session_open is not None
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError):
            session_open.fn_metadata.validate_arguments({"idle_timeout_s": bad})
    async with in_process(server) as (client, _done):
        await client.send(tool(1, "session_open", idle_timeout_s="Infinity"))
        reply = await client.answer(1)
        assert reply["result"]["structuredContent"]["error"]["code"] == "invalid_arguments"
        await client.stream.send_eof()
        await client.rest()


def strict_json(line: bytes) -> Any:
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written"))


async def test_a_result_holding_nan_is_answered_with_an_error_not_written() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    transport = StdioTransport(server_end, server_end)
    client = RawClient(client_end)
    nan = {"x": [1.0, {"y": float("nan")}], "z": "NaN"}
    await transport.writer.send(SessionMessage(JSONRPCResponse(jsonrpc="2.0", id=7, result=nan)))
    reply = strict_json(await client.recv_line() or b"")
    assert reply["id"] == 7
    assert reply["error"]["code"] == -32603
    assert "NaN or Infinity" in reply["error"]["message"]
    fine = {"x": None, "z": "Infinity", "n": 1e308}
    await transport.writer.send(SessionMessage(JSONRPCResponse(jsonrpc="2.0", id=8, result=fine)))
    assert strict_json(await client.recv_line() or b"") == {
        "jsonrpc": "2.0",
        "id": 8,
        "result": fine,
    }


async def test_a_tool_returning_nan_writes_only_strict_json(autojump_clock: Any) -> None:
    async with in_process(number_server()) as (client, _done):
        await client.send(tool(1, "not_a_number"))
        while True:
            line = await client.recv_line()
            assert line is not None
            reply = strict_json(line)
            if reply.get("id") == 1:
                break
        await client.send(tool(2, "echo_number", x=3))  # still serving
        assert (await client.answer(2))["result"]["structuredContent"] == {"result": 3}
        await client.stream.send_eof()
        for line in await client.rest_lines():
            strict_json(line)


# -- item 6: "at once" does not wait for a locked store ------------------------------------


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": "init",
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


async def open_two_sessions(client: RawClient) -> None:
    """A legacy handshake (a connection session) and ``session_open`` (a handle session)."""
    await client.send(INITIALIZE)
    await client.answer("init")
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    await client.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "session_open", "arguments": {}}})  # fmt: skip
    assert "result" in await client.answer(1)


@asynccontextmanager
async def locked_sqlite_server(
    tmp_path: Path, grace: float, **kwargs: Any
) -> AsyncIterator[tuple[RawClient, trio.Event]]:
    """A server on a SQLite store with a connection session and a handle session open;
    then another connection takes the write lock (``BEGIN IMMEDIATE``) and holds it."""
    path = tmp_path / "sessions.db"
    server = slow_server()
    settings = Settings(shutdown_grace=grace)
    async with in_process(server, store=f"sqlite:///{path}", settings=settings, **kwargs) as (
        client,
        done,
    ):
        await open_two_sessions(client)
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            yield client, done
        finally:
            locker.execute("ROLLBACK")
            locker.close()


async def test_a_locked_store_holds_a_stop_no_longer_than_the_grace(tmp_path: Path) -> None:
    grace = 1.0
    with trio.fail_after(60):  # hang guard; it took 25 s
        async with locked_sqlite_server(tmp_path, grace) as (client, done):
            start = time.monotonic()
            await client.stream.send_eof()
            await client.rest()
            await done.wait()
            elapsed = time.monotonic() - start
    assert elapsed < grace + 2.0


async def test_a_second_signal_stops_at_once_with_the_store_locked(tmp_path: Path) -> None:
    grace = 30.0
    with trio.fail_after(60):  # hang guard
        async with locked_sqlite_server(tmp_path, grace, handle_signals=True) as (client, done):
            start = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            # (Another signal: trio delivers a signal pending twice only once.)
            os.kill(os.getpid(), signal.SIGINT)
            await done.wait()
            elapsed = time.monotonic() - start
            await client.stream.send_eof()
    assert elapsed < 3.0  # not the 30 s grace, nor the store's timeouts


async def test_a_closed_stdout_stops_at_once_with_the_store_locked(tmp_path: Path) -> None:
    grace = 30.0
    with trio.fail_after(60):  # hang guard
        async with locked_sqlite_server(tmp_path, grace) as (client, done):
            slow = {"name": "slow", "arguments": {"seconds": 0.2}}  # (a legacy connection)
            await client.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": slow})
            start = time.monotonic()
            await client.stream.aclose()  # the client is gone: its answer cannot be written
            await done.wait()
            elapsed = time.monotonic() - start
    assert elapsed < 3.0  # the call's 0.2 s; not the 30 s grace, nor the store's timeouts


async def test_abandoning_ends_a_shielded_wait_already_running(autojump_clock: Any) -> None:
    waits = StoreWaits()
    ended_at: list[float] = []

    async def write() -> None:
        with trio.CancelScope(shield=True), waits.bounded(100):
            await trio.sleep(1000)  # a store that does not answer
        ended_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(write)
        await trio.sleep(1)
        waits.limit(trio.current_time() + 5)  # the stop's budget: running waits too
        await trio.sleep(1)
        assert ended_at == []
        waits.abandon()  # a second signal
        nursery.cancel_scope.cancel()  # (shielded: this alone would not end them)
    assert ended_at == [2, 2]
    with waits.bounded(100) as scope:  # a later wait ends at once
        await trio.sleep(1)
    assert scope.cancelled_caught


@pytest.mark.skipif(PG_DSN is None, reason=PG_SKIP)
async def test_a_postgresql_row_lock_holds_a_stop_no_longer_than_the_grace() -> None:
    import psycopg

    assert PG_DSN is not None
    schema = pg_schema()
    grace = 2.0
    server: MCPServer[Any] = MCPServer("pg-locked")
    settings = Settings(shutdown_grace=grace)
    store = f"{PG_DSN}?schema={schema}"
    try:
        with trio.fail_after(60):  # hang guard; it took 12.5 s
            async with in_process(server, store=store, settings=settings) as (client, done):
                await open_two_sessions(client)
                with psycopg.connect(PG_DSN) as locker:
                    locker.execute(f'SET search_path TO "{schema}"')
                    locker.execute("SELECT * FROM sessions FOR UPDATE")
                    locker.execute("SELECT * FROM instances FOR UPDATE")
                    start = time.monotonic()
                    await client.stream.send_eof()
                    await client.rest()
                    await done.wait()
                    elapsed = time.monotonic() - start
                    locker.rollback()
        assert elapsed < grace + 2.0
    finally:
        drop_pg_schema(schema)


async def test_only_a_hard_stop_abandons_the_store_not_the_final_flush() -> None:
    _client_end, server_end = trio.testing.memory_stream_pair()
    transport = StdioTransport(server_end, server_end)
    calls: list[str] = []
    transport.on_hard_stop = lambda: calls.append("abandon the store")
    # The grace period ran out and the answers did not get out within the final
    # flush: the writes are abandoned, the store is not.
    await transport._hard_stop_after(0)
    assert calls == []
    transport.stop("SIGTERM", hard=True)  # a second signal: once, however many
    transport.stop("broken", hard=True)
    assert calls == ["abandon the store"]
