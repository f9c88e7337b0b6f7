"""Persistence: the server and the official client, real SQLite and PostgreSQL.

In process (JSON lines over a memory stream pair, the official client), where the
server's behaviour is the point: a "restart" is a new supervisor on the same
SQLite file, "two processes" are two supervisors with their own store objects
on one database, the operator's commands run through ``mcp_sessions._cli.main``.
A real process only for ``kill -9``.

- restart: a handle session outlives its server, state intact;
- two servers on one store: open in one, patch in the other, close in one seen in the other,
  interleaved patches lose nothing (SQLite file and PostgreSQL database);
- ``kill -9`` while patching: every acknowledged write is there afterwards and the SQLite file
  passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Hooks, Session, Settings, Supervisor, open_supervisor
from mcp_sessions._cli import main as cli_main
from mcp_sessions._store_url import store_from_url

from ._wire import serve_in_process
from .conftest import PYTHON
from .test_server_e2e import error_code, ok

PG_DSN = os.environ.get("MCP_SESSIONS_TEST_PG_DSN")


def serve_args(store: str, *extra: str) -> list[str]:
    return ["-m", "mcp_sessions", "serve", "--store", store, "--principal", "alice",
            "--log-level", "warning", *extra]  # fmt: skip


@asynccontextmanager
async def runtime(
    url: str,
    settings: Settings | None = None,
    *,
    wall: Callable[[], float] = time.time,
    hooks: Hooks | None = None,
) -> AsyncIterator[Supervisor]:
    """One server's runtime on the store at ``url`` (its own store object)."""
    store = store_from_url(url)
    async with open_supervisor(settings, store=store, wall_clock=wall, hooks=hooks) as sup:
        yield sup


def served(supervisor: Supervisor, mode: str = "auto") -> Any:
    """The official client connected to ``supervisor`` over JSON lines, as principal alice."""
    return serve_in_process(MCPServer("persistence"), mode, supervisor=supervisor)


@asynccontextmanager
async def connect(url: str, mode: str = "auto", **kwargs: Any) -> AsyncIterator[Client]:
    """A server of its own on ``url`` (stopped when the block ends), and a client of it."""
    with trio.fail_after(60):  # hang guard
        async with runtime(url, **kwargs) as sup, served(sup, mode) as client:
            yield client


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sessions.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG_DSN:
        pytest.skip("set MCP_SESSIONS_TEST_PG_DSN to run PostgreSQL end-to-end tests")
    import psycopg

    schema = "e2e_" + uuid.uuid4().hex[:10]
    sep = "&" if "?" in PG_DSN else "?"
    yield f"{PG_DSN}{sep}schema={schema}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_handle_session_resumes_after_a_restart(sqlite_url: str) -> None:
    async with connect(sqlite_url, "legacy") as first:
        opened = ok(await first.call_tool("session_open", {"metadata": {"app": "notes"}}))
        handle = opened["session"]
        ok(await first.call_tool("session_state_patch", {"session": handle, "patch": {"n": 1}}))
    # the first server process has exited (stdin EOF); a new one serves the same file
    async with connect(sqlite_url, "auto") as second:
        got = ok(await second.call_tool("session_state_get", {"session": handle}))
        assert got == {"state": {"n": 1}, "version": 1}
        info = ok(await second.call_tool("session_info", {"session": handle}))
        assert info["id"] == opened["id"]
        assert info["state"] in ("idle", "active")
        listed = ok(await second.call_tool("session_list", {}))["sessions"]
        assert [s["id"] for s in listed if s["kind"] == "handle"] == [opened["id"]]


async def test_session_idle_past_its_timeout_across_a_restart_is_expired(sqlite_url: str) -> None:
    async with connect(sqlite_url, "auto") as first:
        handle = ok(await first.call_tool("session_open", {"idle_timeout_s": 60}))["session"]
    async with connect(sqlite_url, "auto") as again:  # restarted at once: still there
        ok(await again.call_tool("session_info", {"session": handle}))
    # Then down for two minutes (the new server's wall clock says so): past the idle timeout
    # plus one touch interval of grace.
    assert Settings().touch_interval < 60
    async with connect(sqlite_url, "auto", wall=lambda: time.time() + 120) as second:
        result = await second.call_tool("session_info", {"session": handle})
        assert error_code(result) == "session_expired"


async def test_two_servers_on_one_store_share_sessions(shared_url: str) -> None:
    async with connect(shared_url, "legacy") as a, connect(shared_url, "auto") as b:
        handle = ok(await a.call_tool("session_open", {}))["session"]
        assert ok(await b.call_tool("session_state_patch", {"session": handle, "patch": {"x": 1}}))
        got = ok(await a.call_tool("session_state_get", {"session": handle}))
        assert got["state"] == {"x": 1}

        async def patch_many(client: Client, prefix: str) -> None:
            for i in range(15):
                ok(
                    await client.call_tool(
                        "session_state_patch",
                        {"session": handle, "patch": {f"{prefix}{i}": i}},
                    )
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(patch_many, a, "a")
            nursery.start_soon(patch_many, b, "b")
        got = ok(await b.call_tool("session_state_get", {"session": handle}))
        assert got["version"] == 31
        assert set(got["state"]) == {"x"} | {f"a{i}" for i in range(15)} | {
            f"b{i}" for i in range(15)
        }

        closed = ok(await b.call_tool("session_close", {"session": handle}))
        assert closed["reason"] == "closed"
        assert error_code(await a.call_tool("session_info", {"session": handle})) == (
            "session_closed"
        )
        assert error_code(
            await a.call_tool("session_state_patch", {"session": handle, "patch": {"y": 1}})
        ) == ("session_closed")


async def test_operator_can_list_and_close_sessions(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cli(*argv: str) -> str:
        code = await trio.to_thread.run_sync(cli_main, list(argv))
        out = capsys.readouterr().out
        assert code == 0, out
        return out

    async with connect(sqlite_url, "auto") as client:
        opened = ok(await client.call_tool("session_open", {}))
        status = await cli("status", "--store", sqlite_url, "--json")
        assert '"handle"' in status
        listed = await cli("sessions", "list", "--store", sqlite_url)
        assert opened["id"] in listed
        assert opened["session"] not in listed  # never a handle
        await cli("sessions", "close", opened["id"], "--store", sqlite_url)
        result = await client.call_tool("session_info", {"session": opened["session"]})
        assert error_code(result) == "session_closed"


async def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    url = f"sqlite:///{db}"
    acknowledged: dict[str, int] = {}
    handle: str | None = None
    for round_ in range(4):
        proc = await trio.lowlevel.open_process(
            [PYTHON, *serve_args(url)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        async with _raw_client(proc) as call:
            if handle is None:
                handle = (await call("session_open", {}))["session"]

            async def patch_forever(h: str, r: int) -> None:
                i = 0
                while True:
                    key = f"r{r}k{i}"
                    result = await call("session_state_patch", {"session": h, "patch": {key: i}})
                    acknowledged[key] = result["version"]
                    i += 1

            with trio.move_on_after(0.3 + 0.2 * round_):
                await patch_forever(handle, round_)
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: a patch may be in flight
        await proc.wait()
    assert len(acknowledged) >= 20, acknowledged  # enough writes happened to mean something
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    assert handle is not None
    async with connect(url, "auto") as client:
        got = ok(await client.call_tool("session_state_get", {"session": handle}))
    missing = set(acknowledged) - set(got["state"])
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:5]}"
    assert got["version"] >= max(acknowledged.values())


@asynccontextmanager
async def _raw_client(proc: trio.Process) -> AsyncIterator[Any]:
    """A minimal modern-era JSON-RPC client over the process's pipes (no handshake).

    Used where the official client's own cleanup would get in the way of
    killing the server mid-call.
    """
    import json

    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    buffer = bytearray()
    counter = 0
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "crash-test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }

    async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        message = {
            "jsonrpc": "2.0",
            "id": counter,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta},
        }
        await stdin.send_all(json.dumps(message).encode() + b"\n")
        while True:
            newline = buffer.find(b"\n")
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                reply = json.loads(line)
                if reply.get("id") == counter:
                    assert "result" in reply, reply
                    result = reply["result"]
                    assert not result.get("isError"), result
                    structured: dict[str, Any] = result["structuredContent"]
                    return structured
                continue
            chunk = await stdout.receive_some(65536)
            if not chunk:
                raise EOFError("server closed stdout")
            buffer.extend(chunk)

    try:
        yield call
    finally:
        with trio.CancelScope(shield=True):
            await stdin.aclose()


async def test_postgres_outage_gives_store_unavailable_and_recovers(pg_url: str) -> None:
    """A real server behind a loopback proxy that cuts PostgreSQL off, then lets it back."""
    from urllib.parse import urlsplit

    from .test_store_faults import Proxy

    parts = urlsplit(pg_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
        op_timeout = 1.0
        query = parts.query + f"&op_timeout={op_timeout}&store_connect_timeout=1"
        url = parts._replace(netloc=netloc, query=query).geturl()
        async with connect(url, "auto") as client:
            handle = ok(await client.call_tool("session_open", {}))["session"]
            ok(
                await client.call_tool(
                    "session_state_patch", {"session": handle, "patch": {"a": 1}}
                )
            )

            proxy.cut_all()
            start = trio.current_time()
            result = await client.call_tool(
                "session_state_patch", {"session": handle, "patch": {"b": 2}}
            )
            assert error_code(result) == "store_unavailable"
            assert trio.current_time() - start < op_timeout + 4  # bounded: op timeout, plus slack
            health = await client.read_resource("sessions://health")
            text = health.contents[0].text  # type: ignore[union-attr]
            assert '"healthy": false' in text
            assert '"status": "degraded"' in text
            assert len((await client.list_tools()).tools) >= 6  # still serving

            proxy.restore()
            with trio.fail_after(20):  # the pool reconnects by itself
                while True:
                    result = await client.call_tool("session_state_get", {"session": handle})
                    if not result.is_error:
                        break
                    assert error_code(result) == "store_unavailable"
                    await trio.sleep(0.3)
            got = ok(result)
            assert got["state"]["a"] == 1
            patched = ok(
                await client.call_tool(
                    "session_state_patch",
                    {"session": handle, "patch": {"c": 3}, "if_version": got["version"]},
                )
            )
            assert patched["version"] == got["version"] + 1
            health = await client.read_resource("sessions://health")
            assert '"status": "ok"' in health.contents[0].text  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_concurrent_calls_on_a_handle_opened_by_another_process(shared_url: str) -> None:
    """Many calls naming one handle at once, in a server that has not seen it yet and takes a
    while to bring it in (its resume hook sleeps): the first call brings it in, the rest wait
    for it. (The waiters' crash of issue 7 is pinned in process, deterministically, by
    ``test_concurrent_resolves_of_a_handle_opened_elsewhere_share_one_session``; over stdio it
    did not reproduce reliably against the old code.)"""

    async def resume(session: Session) -> None:
        await trio.sleep(0.5)

    async with (
        connect(shared_url, "legacy") as first,
        connect(shared_url, "auto", hooks=Hooks(resume=resume)) as second,
    ):
        handle = ok(await first.call_tool("session_open", {}))["session"]
        ok(await first.call_tool("session_state_patch", {"session": handle, "patch": {"n": 1}}))
        results: list[Any] = []

        async def get() -> None:
            results.append(await second.call_tool("session_state_get", {"session": handle}))

        async def patch(i: int) -> None:
            args = {"session": handle, "patch": {f"k{i}": i}}
            results.append(await second.call_tool("session_state_patch", args))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(get)
                    nursery.start_soon(patch, i)
        assert len(results) == 10
        assert all(not r.is_error for r in results), [r for r in results if r.is_error]
        final = ok(await first.call_tool("session_state_get", {"session": handle}))
        assert final["version"] == 6
        assert final["state"] == {"n": 1, **{f"k{i}": i for i in range(5)}}
