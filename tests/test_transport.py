"""The stdio transport on the wire: a real server process fed raw bytes (``raw_server``), or
the same server served in process over a memory stream where no process is needed (``wire``).

Every test checks that the server ends normally (the process exits 0) and that everything it
wrote to stdout is a JSON-RPC message (one per line).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mcp_sessions import serve_stdio

from .conftest import E2E_SERVER, PYTHON

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}}}  # fmt: skip
TIMEOUT = 30.0  # a hang guard, generous for a busy machine
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(rid: int, name: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}  # fmt: skip


class Raw:
    def __init__(self, proc: trio.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self._buf = b""
        self.lines: list[bytes] = []

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data + b"\n")

    async def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(65536)
                assert chunk, "server closed stdout"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(line)
        message: dict[str, Any] = json.loads(line)
        assert message["jsonrpc"] == "2.0"
        return message

    async def rest(self) -> bytes:
        """Everything left on stdout until the server closes it."""
        assert self.proc.stdout is not None
        with trio.fail_after(TIMEOUT):
            while chunk := await self.proc.stdout.receive_some(65536):
                self._buf += chunk
        rest, self._buf = self._buf, b""
        return rest

    async def handshake(self) -> None:
        await self.send(INIT)
        reply = await self.recv()
        assert reply["id"] == 0
        assert "result" in reply
        await self.send(INITIALIZED)

    async def wait(self) -> int:
        with trio.fail_after(TIMEOUT):
            return await self.proc.wait()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


@asynccontextmanager
async def raw_server(tmp_path: Path, *args: str) -> AsyncIterator[Raw]:
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [PYTHON, E2E_SERVER, "serve", "--store", "memory", "--log-level", "debug", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        yield Raw(proc, stderr_path)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                await stream.aclose()


class Wire:
    """Raw JSON lines to a server served in process (``Raw``'s calls, without a process)."""

    def __init__(self, stream: trio.testing.StapledStream[Any, Any], done: trio.Event) -> None:
        self.stream = stream
        self.done = done  # serve_stdio returned (the process would have exited 0)
        self._buf = b""

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        await self.stream.send_all(data + b"\n")

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._buf:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "server closed stdout"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        assert message["jsonrpc"] == "2.0"
        return message

    async def rest(self) -> bytes:
        """Everything left until the server is done and its end is closed."""
        with trio.fail_after(TIMEOUT):
            while chunk := await self.stream.receive_some(65536):
                self._buf += chunk
        rest, self._buf = self._buf, b""
        return rest

    async def handshake(self) -> None:
        await self.send(INIT)
        reply = await self.recv()
        assert reply["id"] == 0
        assert "result" in reply
        await self.send(INITIALIZED)


@asynccontextmanager
async def wire(**options: Any) -> AsyncIterator[Wire]:
    """The end-to-end test server (tests/e2e_server.py), served in process."""
    from .e2e_server import server

    client, server_end = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        async with server_end:
            await serve_stdio(server, stdin=server_end, stdout=server_end, **options)
            done.set()

    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield Wire(client, done)
        with trio.fail_after(TIMEOUT):
            await client.send_eof()
            await done.wait()


def error(message: dict[str, Any]) -> tuple[Any, int]:
    return message["id"], message["error"]["code"]


async def test_bad_input_gets_errors_and_the_stream_stays_in_sync(tmp_path: Path) -> None:
    async with raw_server(tmp_path, "--max-message-size", "4096") as raw:
        await raw.handshake()
        await raw.send(b"this is not json")
        assert error(await raw.recv()) == (None, -32700)
        await raw.send(b'\xff\xfe{"jsonrpc": "2.0", "id": 1, "method": "ping"}')
        assert error(await raw.recv()) == (None, -32700)
        for value in (b"42", b'"a string"', b"null", b"[1, 2]", b"[]", b"true"):
            await raw.send(value)
            assert error(await raw.recv()) == (None, -32600), value
        # An object that is not a valid request, with a usable id.
        await raw.send({"jsonrpc": "2.0", "id": 7, "method": 5})
        assert error(await raw.recv()) == (7, -32600)
        # An oversize line: answered, skipped to its newline, and the next line is read.
        huge = b'{"jsonrpc": "2.0", "id": 8, "method": "ping", "x": "' + b"a" * 100_000 + b'"}'
        await raw.send(huge)
        assert error(await raw.recv()) == (None, -32600)
        # A cancellation for an id nobody knows is ignored.
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 999}})  # fmt: skip
        # Blank lines are ignored.
        await raw.send(b"   ")
        await raw.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 9, "result": {}}
        # A tool that prints: the print goes to stderr, never to the protocol stream.
        await raw.send(call(10, "hello"))
        reply = await raw.recv()
        assert reply["id"] == 10
        assert reply["result"]["content"][0]["text"] == "hello"
        # A cancelled request gets no response.
        await raw.send(call(11, "slow", seconds=30))
        await trio.sleep(0.2)
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 11}})  # fmt: skip
        await raw.send({"jsonrpc": "2.0", "id": 12, "method": "ping"})
        assert (await raw.recv())["id"] == 12
        # EOF: exit 0 promptly, nothing more on stdout (no answer for 11).
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        assert await raw.rest() == b""
        assert await raw.wait() == 0
        assert "stray print must not reach stdout" in raw.stderr
        assert "terminating: disconnected" in raw.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_lets_in_flight_requests_finish_then_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with raw_server(tmp_path) as raw:
        await raw.handshake()
        await raw.send(call(1, "slow", seconds=0.6))
        await trio.sleep(0.2)
        raw.proc.send_signal(signum)
        reply = await raw.recv()
        assert reply["id"] == 1
        assert reply["result"]["content"][0]["text"] == "done"
        assert await raw.rest() == b""
        assert await raw.wait() == 0
        assert f"stopping ({signum.name})" in raw.stderr


async def test_grace_period_bounds_shutdown(tmp_path: Path) -> None:
    async with raw_server(tmp_path, "--shutdown-grace", "0.3") as raw:
        await raw.handshake()
        await raw.send(call(1, "slow", seconds=30))
        await trio.sleep(0.2)
        raw.proc.send_signal(signal.SIGTERM)
        reply = await raw.recv()
        assert reply["id"] == 1
        assert "error" in reply  # cancelled at the end of the grace period
        assert await raw.wait() == 0


async def test_eof_lets_in_flight_requests_finish() -> None:
    """In process: stdin EOF is the stream's end, no process needed."""
    async with wire() as raw:
        await raw.handshake()
        await raw.send(call(1, "slow", seconds=0.3))
        await raw.stream.send_eof()
        reply = await raw.recv()
        assert reply["result"]["content"][0]["text"] == "done"
        assert await raw.rest() == b""
        assert raw.done.is_set()  # serve_stdio returned normally


async def test_broken_stdout_with_stdin_open_exits_0(tmp_path: Path) -> None:
    async with raw_server(tmp_path) as raw:
        await raw.handshake()
        await raw.send(call(1, "slow", seconds=30))
        assert raw.proc.stdout is not None
        await raw.proc.stdout.aclose()  # the client stops reading; stdin stays open
        assert await raw.wait() == 0
        assert "stdout is gone" in raw.stderr


async def test_client_killed_exits_0(tmp_path: Path) -> None:
    async with raw_server(tmp_path) as raw:
        await raw.handshake()
        await raw.send(call(1, "slow", seconds=30))
        assert raw.proc.stdin is not None
        assert raw.proc.stdout is not None
        await raw.proc.stdout.aclose()
        await raw.proc.stdin.aclose()
        assert await raw.wait() == 0
