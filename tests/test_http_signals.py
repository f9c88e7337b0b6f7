"""A signal while an HTTP server's sessions shut down (after the drain) stops waiting for the
store; it does not kill the process. A real process: signals are the point."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from mcp.client.client import Client

from .conftest import PYTHON, ROOT

# The SDK's HTTP client (httpx2) leaves its SSE async generators to the garbage collector
# when the server goes away under them; trio warns about each (as in test_http.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)

SERVER = """
import trio
from mcp.server.mcpserver import MCPServer
from mcp_sessions import Hooks, run_http

async def slow_teardown(session, reason):
    print("teardown started", flush=True)
    await trio.sleep(2)

run_http(MCPServer("t"), port=0, store="memory", hooks=Hooks(teardown=slow_teardown))
"""


async def test_a_second_signal_while_sessions_shut_down_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-c", SERVER],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
    try:
        with trio.fail_after(20):
            while (found := re.search(r"http://\S+/mcp", log.read_text())) is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
            async with Client(found.group(0), mode="legacy") as client:
                await client.list_tools()  # a handshake-era session, with its teardown
                process.send_signal(signal.SIGTERM)
                while "teardown started" not in log.read_text():  # noqa: ASYNC110
                    await trio.sleep(0.02)
                process.send_signal(signal.SIGTERM)  # while the sessions shut down
                code = await process.wait()
        assert code == 0, log.read_text()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
