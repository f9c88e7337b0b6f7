"""Transport edge cases found in review, on the wire: raw bytes to a real server process where
pipes or signals are the point, else to the server served in process over a memory stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .test_transport import Raw, call, raw_server, wire


def ping(i: int | str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "ping"}


async def test_every_answer_reaches_a_slow_reader_after_eof(tmp_path: Path) -> None:
    n = 2000  # more answers than a pipe holds: they wait on the client
    async with raw_server(tmp_path) as raw:
        await raw.handshake()
        assert raw.proc.stdin is not None
        await raw.proc.stdin.send_all(b"".join(json.dumps(ping(i)).encode() + b"\n"
                                               for i in range(1, n + 1)))  # fmt: skip
        await trio.sleep(0.3)
        await raw.proc.stdin.aclose()
        await trio.sleep(0.5)  # only now does the client start reading
        ids = [json.loads(line)["id"] for line in (await raw.rest()).splitlines()]
        assert sorted(ids) == list(range(1, n + 1))
        assert await raw.wait() == 0


async def test_a_client_that_never_reads_cannot_hold_the_server(tmp_path: Path) -> None:
    async with raw_server(tmp_path, "--shutdown-grace", "0.5") as raw:
        await raw.handshake()
        assert raw.proc.stdin is not None
        await raw.proc.stdin.send_all(b"".join(json.dumps(ping(i)).encode() + b"\n"
                                               for i in range(1, 4001)))  # fmt: skip
        await trio.sleep(0.3)
        await raw.proc.stdin.aclose()
        with trio.fail_after(15):  # grace + the final flush, not forever (slack for a busy machine)
            assert await raw.proc.wait() == 0


async def test_cancel_naming_the_id_as_a_number_settles_a_string_id() -> None:
    async with wire(shutdown_grace=30) as raw:
        await raw.handshake()
        request = call(0, "slow", seconds=30)
        request["id"] = "7"
        await raw.send(request)
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 7}})  # fmt: skip
        await raw.send(ping(8))
        assert (await raw.recv())["id"] == 8  # both read and handled
        start = time.monotonic()
        await raw.stream.send_eof()
        assert await raw.rest() == b""  # a cancelled request gets no answer
        assert raw.done.is_set()
        assert time.monotonic() - start < 10  # not the 30 s grace period


async def test_request_with_an_invalid_id_gets_invalid_request() -> None:
    async with wire() as raw:
        await raw.handshake()
        await raw.send(b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}')
        reply = await raw.recv()
        assert (reply["id"], reply["error"]["code"]) == (None, -32600)
        await raw.send(b"[" * 5000)  # too deep for the parser: an error, not a crash
        reply = await raw.recv()
        assert (reply["id"], reply["error"]["code"]) == (None, -32700)
        await raw.send(ping(9))
        assert (await raw.recv())["id"] == 9  # still serving, still in sync


async def test_sigterm_while_the_connection_session_tears_down_exits_0(tmp_path: Path) -> None:
    server = tmp_path / "slow_teardown.py"
    server.write_text(
        "import trio\n"
        "from mcp.server.mcpserver import MCPServer\n"
        "from mcp_sessions import Hooks, run_stdio\n"
        "async def teardown(session, reason):\n"
        "    await trio.sleep(2)\n"
        "run_stdio(MCPServer('td'), hooks=Hooks(teardown=teardown))\n"
    )
    err = tmp_path / "err"
    with err.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(server)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    raw = Raw(proc, err)
    try:
        await raw.handshake()
        assert proc.stdin is not None
        await proc.stdin.aclose()
        await trio.sleep(0.7)  # the transport has stopped; teardown is running
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
