"""The ``mcp-sessions gateway`` command as a real process: no orphans, bad config files.

An upstream that spawned a grandchild, and the upstream itself, must both be gone once
the gateway exits, by stdin EOF or by SIGTERM (checked by pid). A config file with a
mistake is one line on stderr that names the server and the field, and a non-zero exit.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

from .conftest import PYTHON
from .test_gateway import UPSTREAM, alive, text, wait_dead


def write_config(tmp_path: Path, servers: object) -> Path:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def gateway_params(path: Path, tmp_path: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=PYTHON,
        args=["-m", "mcp_sessions", "gateway", "--config", str(path), "--store", "memory"],
        env={"XDG_STATE_HOME": str(tmp_path)},
    )


@pytest.mark.parametrize("how", ["eof", "sigterm"])
async def test_no_child_or_grandchild_outlives_the_gateway(tmp_path: Path, how: str) -> None:
    path = write_config(tmp_path, {"up": {"command": PYTHON, "args": [UPSTREAM]}})
    params = gateway_params(path, tmp_path)
    if how == "eof":
        async with Client(params, mode="legacy") as c:
            child = int(text(await c.call_tool("up__pid", {})))
            grandchild = int(text(await c.call_tool("up__spawn_grandchild", {})))
            assert alive(child)
            assert alive(grandchild)
        # The client closed the gateway's stdin and waited for it to exit.
    else:
        process = subprocess.Popen(  # noqa: ASYNC220 (its pipes are read in a thread)
            [params.command, *params.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            child, grandchild = await _start_and_spawn(process)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                while process.poll() is None:  # noqa: ASYNC110 (a Popen, not a trio process)
                    await trio.sleep(0.05)
            assert process.returncode == 0, process.stderr.read()  # type: ignore[union-attr]
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
    await wait_dead(child, within=5)
    await wait_dead(grandchild, within=5)


async def _start_and_spawn(process: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Speak the handshake over the pipes by hand; return the child's and grandchild's pids."""
    assert process.stdin is not None
    assert process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def send(message: dict[str, object]) -> None:
        stdin.write(json.dumps(message).encode() + b"\n")
        stdin.flush()

    def receive(request_id: int) -> dict[str, object]:
        while True:
            line = stdout.readline()
            assert line, "the gateway closed its stdout"
            message: dict[str, object] = json.loads(line)
            if message.get("id") == request_id:
                return message

    def handshake_and_calls() -> tuple[int, int]:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}})  # fmt: skip
        receive(1)
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        pids = []
        for i, tool in enumerate(("up__pid", "up__spawn_grandchild"), start=2):
            send({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                  "params": {"name": tool, "arguments": {}}})  # fmt: skip
            result = receive(i)["result"]
            assert isinstance(result, dict)
            pids.append(int(result["content"][0]["text"]))
        return pids[0], pids[1]

    with trio.fail_after(30):
        return await trio.to_thread.run_sync(handshake_and_calls)


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ({"notes": {"command": "x", "pool": {"max": "four"}}}, "mcpServers.notes.pool.max"),
        ({"search": {"command": "x", "url": "https://example.com"}}, "mcpServers.search"),
        ({"a__b": {"command": "x"}}, "mcpServers.a__b"),
    ],
)
async def test_a_bad_config_is_one_line_and_a_failure(
    tmp_path: Path, servers: object, expected: str
) -> None:
    line = await refused(write_config(tmp_path, servers))
    assert expected in line


async def test_a_missing_or_broken_config_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"mcpServers": {')
    for path in (tmp_path / "absent.json", broken):
        assert str(path) in await refused(path)


async def refused(path: Path) -> str:
    """Run ``mcp-sessions gateway --config path``: it must fail with one line on stderr."""
    done = await trio.run_process(
        [PYTHON, "-m", "mcp_sessions", "gateway", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == b""
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
