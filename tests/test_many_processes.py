"""Many processes, one truth: real server processes sharing one SQLite file or PostgreSQL schema.

- limits: ``--max-sessions-per-principal 3`` holds across three processes opening at once, and
  bringing in a session opened by another process is never refused by the limit;
- instances: the connection sessions of a process killed with ``-9`` are ended ``disconnected``
  by a live process within its ``--instance-lease``, and its instance record is forgotten, while
  its handle sessions live on and serve from the others;
- idle precision: with a durable store a session ends no later than
  ``idle_timeout + min(touch_interval, idle_timeout / 4) + cleanup_interval`` after its last use
  anywhere (not ``idle_timeout + touch_interval``);
- state cap (in process, two servers on one store): a patch past ``max_state_bytes`` is refused
  with ``state_too_large`` and nothing is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

import mcp_sessions

from .conftest import PYTHON
from .test_persistence_e2e import (  # noqa: F401 (pg_url, shared_url, sqlite_url: fixtures)
    pg_url,
    runtime,
    serve_args,
    served,
    shared_url,
    sqlite_url,
)
from .test_server_e2e import error_code, ok

PRINCIPAL = "alice"  # serve_args' principal


@asynccontextmanager
async def connect(store: str, mode: str = "auto", *extra: str) -> AsyncIterator[Client]:
    """A real ``mcp-sessions serve`` process on ``store``, and the official client of it."""
    params = StdioServerParameters(command=PYTHON, args=serve_args(store, *extra))
    with trio.fail_after(60):  # hang guard
        async with Client(params, mode=mode) as client:  # type: ignore[arg-type]
            yield client


@asynccontextmanager
async def servers(url: str, count: int, mode: str, *extra: str) -> AsyncIterator[list[Client]]:
    """``count`` server processes on one store, started at once, each with a connected client."""
    clients: list[Client | None] = [None] * count
    done = trio.Event()

    async def hold(i: int, *, task_status: trio.TaskStatus[None]) -> None:
        async with connect(url, mode, *extra) as client:
            clients[i] = client
            task_status.started()
            await done.wait()

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as starting:
            for i in range(count):
                starting.start_soon(outer.start, hold, i)
        try:
            yield [c for c in clients if c is not None]
        finally:
            done.set()


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Any]:
    """The store the servers share, opened in this process (to look, never as a server)."""
    store = mcp_sessions.store_from_url(url)
    await store.open()
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def wait_for(what: str, within: float, check: Any, interval: float = 0.05) -> float:
    """Poll ``await check()`` until truthy; return the seconds it took (fail past ``within``)."""
    start = trio.current_time()
    with trio.move_on_after(within):
        while True:
            if await check():
                return trio.current_time() - start
            await trio.sleep(interval)
    raise AssertionError(f"not within {within} s: {what}")


# -- limits ------------------------------------------------------------------------------------


async def test_limit_per_principal_holds_across_processes_and_never_refuses_bringing_in(
    shared_url: str,  # noqa: F811
) -> None:
    async with servers(shared_url, 3, "auto", "--max-sessions-per-principal", "3") as procs:
        # Two opens from each process, all six at once.
        results: list[tuple[int, Any]] = []

        async def open_one(p: int) -> None:
            results.append((p, await procs[p].call_tool("session_open", {})))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for p in range(3):
                    for _ in range(2):
                        nursery.start_soon(open_one, p)
        opened = [(p, ok(r)) for p, r in results if not r.is_error]
        refused = [r for _, r in results if r.is_error]
        assert len(opened) == 3, results
        assert len(refused) == 3, results
        for r in refused:
            assert error_code(r) == "limit_exceeded"
            assert r.structured_content is not None
            assert r.structured_content["error"]["limit"] == 3
            assert r.structured_content["error"]["scope"] == f"principal {PRINCIPAL!r}"
        ids = {o["id"] for _, o in opened}
        for client in procs:  # every process lists the same three sessions (the store's)
            listed = ok(await client.call_tool("session_list", {}))["sessions"]
            assert {s["id"] for s in listed} == ids
            # ... and no process may open a fourth, whichever opened the three.
            assert error_code(await client.call_tool("session_open", {})) == "limit_exceeded"

        # Bringing in is never refused: every handle serves in every other process, each of
        # which is at its principal's limit (the store counts three live sessions).
        versions = {o["id"]: 0 for _, o in opened}
        for opener, o in opened:
            for p in range(3):
                if p == opener:
                    continue
                info = ok(await procs[p].call_tool("session_info", {"session": o["session"]}))
                assert info["id"] == o["id"]
                assert info["version"] == versions[o["id"]]
                patched = ok(
                    await procs[p].call_tool(
                        "session_state_patch", {"session": o["session"], "patch": {f"p{p}": p}}
                    )
                )
                versions[o["id"]] += 1
                assert patched == {"version": versions[o["id"]]}
        for opener, o in opened:
            got = ok(await procs[opener].call_tool("session_state_get", {"session": o["session"]}))
            assert got["version"] == 2
            assert got["state"] == {f"p{p}": p for p in range(3) if p != opener}
        # Still exactly three live: bringing in counted nothing new.
        for client in procs:
            assert error_code(await client.call_tool("session_open", {})) == "limit_exceeded"
        async with open_store(shared_url) as store:
            live = await store.list_by_principal(PRINCIPAL)
            assert {r.id for r in live} == ids
            assert all(r.kind == "handle" for r in live)
            # A refused open inserted nothing, not even a terminated record.
            every = await store.list_by_principal(PRINCIPAL, include_terminated=True)
            assert {r.id for r in every} == ids

        # A room freed is free again: close one, open one, and the store is full again. (Opened
        # in the closing process: the others still hold a stale copy of the closed session until
        # they name it, see the test below.)
        opener, o = opened[0]
        closed = ok(await procs[opener].call_tool("session_close", {"session": o["session"]}))
        assert closed["reason"] == "closed"
        ok(await procs[opener].call_tool("session_open", {}))
        for client in procs:
            assert error_code(await client.call_tool("session_open", {})) == "limit_exceeded"
            result = await client.call_tool("session_info", {"session": o["session"]})
            assert error_code(result) == "session_closed"


async def test_room_freed_in_one_process_is_free_in_a_process_that_brought_the_session_in(
    sqlite_url: str,  # noqa: F811
) -> None:
    """The backend does not matter (the refusal happens before the store is asked)."""
    async with servers(sqlite_url, 2, "auto", "--max-sessions-per-principal", "1") as (a, b):
        handle = ok(await a.call_tool("session_open", {}))["session"]
        ok(await b.call_tool("session_info", {"session": handle}))  # b brings it in
        ok(await a.call_tool("session_close", {"session": handle}))  # the store has none live
        async with open_store(sqlite_url) as store:
            assert await store.list_by_principal(PRINCIPAL) == []
        result = await b.call_tool("session_open", {})
        assert not result.is_error, result.structured_content  # limit_exceeded


# -- instances and kill -9 ---------------------------------------------------------------------


@asynccontextmanager
async def legacy_raw_client(proc: trio.Process) -> AsyncIterator[Any]:
    """A handshake-era client speaking JSON-RPC over the process's pipes by hand.

    The official client's cleanup would get in the way of killing the server under it.
    ``call`` returns a tool's structured result, raising on a tool error.
    """
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    buffer = bytearray()
    counter = 0

    async def send(message: dict[str, Any]) -> None:
        await stdin.send_all(json.dumps(message).encode() + b"\n")

    async def request(method: str, params: dict[str, Any]) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        await send({"jsonrpc": "2.0", "id": counter, "method": method, "params": params})
        while True:
            newline = buffer.find(b"\n")
            if newline >= 0:
                reply = json.loads(bytes(buffer[:newline]))
                del buffer[: newline + 1]
                if reply.get("id") == counter and "method" not in reply:
                    assert "result" in reply, reply
                    result: dict[str, Any] = reply["result"]
                    return result
                continue
            chunk = await stdout.receive_some(65536)
            if not chunk:
                raise EOFError("server closed stdout")
            buffer.extend(chunk)

    async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = await request("tools/call", {"name": name, "arguments": arguments})
        assert not result.get("isError"), result
        structured: dict[str, Any] = result["structuredContent"]
        return structured

    with trio.fail_after(30):
        init = await request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "kill-test", "version": "1"},
            },
        )
        assert init["protocolVersion"] == "2025-11-25", init
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    try:
        yield call
    finally:
        with trio.CancelScope(shield=True), suppress(trio.BrokenResourceError):
            await stdin.aclose()


async def test_connection_sessions_of_a_killed_process_end_within_its_lease(
    shared_url: str,  # noqa: F811
) -> None:
    lease = ("--instance-lease", "2")
    proc = await trio.lowlevel.open_process(
        [PYTHON, *serve_args(shared_url, *lease)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with open_store(shared_url) as store, legacy_raw_client(proc) as call_a:
            info = await call_a("session_info", {})  # the connection's own session
            assert info["kind"] == "connection"
            conn_id = info["id"]
            opened = await call_a("session_open", {})
            handle = opened["session"]
            assert (
                await call_a("session_state_patch", {"session": handle, "patch": {"a": 1}})
            ) == {"version": 1}

            # In the store: A's connection session, live, naming A's instance.
            records = {r.id: r for r in await store.list_by_principal(PRINCIPAL)}
            conn = records[conn_id]
            assert conn.kind == "connection"
            assert conn.live
            assert conn.instance is not None
            instance_a = conn.instance
            instances = {i.id: i for i in await store.list_instances()}
            assert instances[instance_a].pid == proc.pid
            assert records[opened["id"]].kind == "handle"
            assert records[opened["id"]].instance is None  # handle sessions belong to nobody

            async with connect(shared_url, "legacy", *lease) as b:
                b_conn = ok(await b.call_tool("session_info", {}))
                assert b_conn["kind"] == "connection"
                assert len(await store.list_instances()) == 2

                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()

                async def a_reaped() -> bool:
                    record = await store.load(conn_id)
                    assert record is not None
                    if record.live:
                        return False
                    assert record.state == "terminated"
                    assert record.reason == "disconnected"
                    return True

                took = await wait_for("A's connection session ended", 6.0, a_reaped)
                # Killed right after a renewal, A's lease ends 5/8 L later; B renews every
                # L/8 and reaps on the renewal after: 7/8 L = 1.75 s, plus slack for load.
                assert took < 4.0, took
                assert instance_a not in {i.id for i in await store.list_instances()}

                # B, its connection session and the handle session A opened all live on.
                assert [i.pid for i in await store.list_instances()] != [proc.pid]  # B's only
                assert ok(await b.call_tool("session_info", {}))["id"] == b_conn["id"]
                record = await store.load(opened["id"])
                assert record is not None
                assert record.live
                got = ok(await b.call_tool("session_state_get", {"session": handle}))
                assert got == {"state": {"a": 1}, "version": 1}
                patched = ok(
                    await b.call_tool("session_state_patch", {"session": handle, "patch": {"b": 2}})
                )
                assert patched == {"version": 2}
                listed = ok(await b.call_tool("session_list", {}))["sessions"]
                assert {s["id"] for s in listed} == {b_conn["id"], opened["id"]}
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


# -- idle precision and the state cap ----------------------------------------------------------

IDLE = ("--idle-timeout", "1", "--touch-interval", "5", "--cleanup-interval", "0.1")
#: idle_timeout + min(touch_interval, idle_timeout / 4) + cleanup_interval
IDLE_BOUND = 1 + min(5, 1 / 4) + 0.1
#: For a loaded machine; the old bound (idle_timeout + touch_interval = 6 s) is far past it.
SLACK = 0.6


async def test_idle_sessions_end_within_their_bound_after_their_last_use_anywhere(
    shared_url: str,  # noqa: F811
) -> None:
    """Watched through the store, so that no call can end a session on the way: ``used`` is
    last used in the other process, ``unused`` only opened."""
    async with servers(shared_url, 2, "auto", *IDLE) as (a, b), open_store(shared_url) as store:
        used = ok(await a.call_tool("session_open", {}))
        unused = ok(await a.call_tool("session_open", {}))
        last_use = {unused["id"]: trio.current_time(), used["id"]: 0.0}
        await trio.sleep(0.8)  # idle, but within its timeout
        # Its last use, in the other process (which brings it in); the server's last use is
        # no later than when the answer is here.
        patch = {"session": used["session"], "patch": {"n": 1}}
        assert ok(await b.call_tool("session_state_patch", patch)) == {"version": 1}
        last_use[used["id"]] = trio.current_time()

        ended_after: dict[str, float] = {}

        async def both_ended() -> bool:
            for session_id, since in last_use.items():
                if session_id in ended_after:
                    continue
                record = await store.load(session_id)
                assert record is not None
                if not record.live:
                    assert record.reason == "idle_timeout"
                    ended_after[session_id] = trio.current_time() - since
            return len(ended_after) == 2

        await wait_for("both sessions ended in the store", 0.8 + IDLE_BOUND + SLACK, both_ended)
        assert ended_after[unused["id"]] <= IDLE_BOUND + SLACK, ended_after
        assert ended_after[used["id"]] <= IDLE_BOUND + SLACK, ended_after
        for client in (a, b):
            for opened in (used, unused):
                result = await client.call_tool("session_info", {"session": opened["session"]})
                assert error_code(result) == "session_expired"


async def test_state_cap_refuses_a_patch_past_it_and_writes_nothing(
    shared_url: str,  # noqa: F811
) -> None:
    """In process (the cap is the point, not the processes): two servers, each with its own
    store object on the one database."""
    cap = mcp_sessions.Settings(max_state_bytes=1000)
    async with (
        runtime(shared_url, cap) as sup_a,
        runtime(shared_url, cap) as sup_b,
        served(sup_a) as a,
        served(sup_b) as b,
        open_store(shared_url) as store,
    ):
        opened = ok(await a.call_tool("session_open", {}))
        handle = opened["session"]
        first = {"keep": "x" * 500}
        patch = {"session": handle, "patch": first}
        assert ok(await a.call_tool("session_state_patch", patch)) == {"version": 1}
        for client in (a, b):  # from the process holding it, and from one bringing it in
            result = await client.call_tool(
                "session_state_patch", {"session": handle, "patch": {"more": "y" * 600}}
            )
            assert error_code(result) == "state_too_large"
            assert result.structured_content is not None
            error = result.structured_content["error"]
            assert error["limit_bytes"] == 1000
            assert error["size_bytes"] > 1000
            assert "1000" in error["message"]
            for reader in (a, b):
                got = ok(await reader.call_tool("session_state_get", {"session": handle}))
                assert got == {"state": first, "version": 1}
            record = await store.load(opened["id"])
            assert record is not None
            assert (dict(record.doc), record.version) == (first, 1)
        # Under the cap is still fine, and only that was written.
        patched = ok(
            await b.call_tool("session_state_patch", {"session": handle, "patch": {"n": 1}})
        )
        assert patched == {"version": 2}
        got = ok(await a.call_tool("session_state_get", {"session": handle}))
        assert got == {"state": {**first, "n": 1}, "version": 2}
