"""End to end: the official client against the server in a real subprocess, one run per era
(the tool schemas, which need no process, are compared in process)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult

from mcp_sessions import serve_stdio

from ._wire import line_transport
from .conftest import E2E_SERVER, PYTHON

ARGS = ["serve", "--store", "memory", "--cleanup-interval", "0.05",
        "--max-sessions-per-principal", "5", "--principal", "alice"]  # fmt: skip


def params(*extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=PYTHON, args=[E2E_SERVER, *ARGS, *extra])


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


def error_code(result: CallToolResult) -> str:
    assert result.is_error, result
    assert result.structured_content is not None
    code: str = result.structured_content["error"]["code"]
    assert result.structured_content["error"]["message"]
    return code


async def exercise_handle_tools(c: Client) -> None:
    """Every handle-based tool and every error code reachable on one connection."""
    opened = ok(await c.call_tool("session_open", {"metadata": {"who": "test"}}))
    handle = opened["session"]
    assert len(handle) >= 22  # >= 128 bits, URL-safe
    assert set(handle) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert opened["state"] == "idle"
    assert opened["id"].startswith("s_")
    assert {"idle_timeout_s", "expires_at"} <= opened.keys()

    info = ok(await c.call_tool("session_info", {"session": handle}))
    assert info["id"] == opened["id"]
    assert info["kind"] == "handle"
    assert info["version"] == 0
    assert {"created_at", "last_active", "requests", "errors", "expires_at"} <= info.keys()

    patched = ok(
        await c.call_tool("session_state_patch", {"session": handle, "patch": {"a": 1, "b": 2}})
    )
    assert patched == {"version": 1}
    patched = ok(
        await c.call_tool(
            "session_state_patch",
            {"session": handle, "patch": {"a": None, "c": {"d": 3}}, "if_version": 1},
        )
    )
    assert patched == {"version": 2}
    got = ok(await c.call_tool("session_state_get", {"session": handle}))
    assert got == {"state": {"b": 2, "c": {"d": 3}}, "version": 2}
    got = ok(await c.call_tool("session_state_get", {"session": handle, "keys": ["c", "zz"]}))
    assert got == {"state": {"c": {"d": 3}}, "version": 2}

    conflict = await c.call_tool(
        "session_state_patch", {"session": handle, "patch": {"x": 1}, "if_version": 1}
    )
    assert error_code(conflict) == "version_conflict"
    assert conflict.structured_content is not None
    assert conflict.structured_content["error"]["current_version"] == 2

    # A user tool with a `session` parameter gets the session too.
    assert (await c.call_tool("count", {"session": handle})).structured_content == {"result": 1}

    listed = ok(await c.call_tool("session_list", {}))["sessions"]
    assert opened["id"] in [s["id"] for s in listed]
    assert handle not in str(listed)

    for bad in ("nope", "", "x" * 43):
        assert error_code(await c.call_tool("session_info", {"session": bad})) == (
            "session_not_found"
        )

    closed = ok(await c.call_tool("session_close", {"session": handle}))
    assert closed == {"id": opened["id"], "state": "terminated", "reason": "closed"}
    assert error_code(await c.call_tool("session_info", {"session": handle})) == "session_closed"
    assert error_code(await c.call_tool("session_close", {"session": handle})) == "session_closed"

    short = ok(await c.call_tool("session_open", {"idle_timeout_s": 0.1}))["session"]
    await trio.sleep(0.4)
    assert error_code(await c.call_tool("session_info", {"session": short})) == "session_expired"

    handles = []
    with trio.fail_after(5):
        while True:
            result = await c.call_tool("session_open", {})
            if result.is_error:
                assert error_code(result) == "limit_exceeded"
                break
            handles.append(ok(result)["session"])
    assert 3 <= len(handles) <= 5
    for h in handles:
        ok(await c.call_tool("session_close", {"session": h}))


async def exercise_resources(c: Client) -> None:
    import json

    health = json.loads((await c.read_resource("sessions://health")).contents[0].text)  # type: ignore[union-attr]
    assert health["status"] == "ok"
    assert {"live", "by_state"} <= health["sessions"].keys()
    assert health["store"]["healthy"] is True
    assert health["cleanup"]["runs"] >= 1
    assert health["uptime_s"] > 0
    metrics = (await c.read_resource("sessions://metrics")).contents[0].text  # type: ignore[union-attr]
    assert "mcp_sessions_live" in metrics
    assert "mcp_session_requests_total" in metrics


async def exercise_cancellation(c: Client) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    done = await c.call_tool("slow", {"seconds": 0.15}, progress_callback=on_progress)
    assert not done.is_error
    assert seen
    with trio.move_on_after(0.3) as scope:
        await c.call_tool("slow", {"seconds": 30})
    assert scope.cancelled_caught
    with trio.fail_after(30):  # hang guard: the server reports the cancellation when it lands
        while True:
            if "slow cancelled" in ok(await c.call_tool("events", {}))["result"]:
                break
            await trio.sleep(0.02)
    # The connection is fine afterwards.
    assert (await c.call_tool("hello", {})).content[0].text == "hello"  # type: ignore[union-attr]


async def test_legacy_mode_connection_session_and_tools() -> None:
    with trio.fail_after(30):
        async with Client(params(), mode="legacy") as c:
            assert c.protocol_version == "2025-11-25"
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert {"session_open", "session_close", "session_info", "session_list",
                    "session_state_get", "session_state_patch"} <= tools.keys()  # fmt: skip
            # Session tools on a handshake-era connection use its connection session.
            info = ok(await c.call_tool("session_info", {}))
            assert info["kind"] == "connection"
            assert info["state"] == "active"  # the session_info call itself is in flight
            ok(await c.call_tool("session_state_patch", {"patch": {"conn": True}}))
            assert ok(await c.call_tool("session_state_get", {}))["state"] == {"conn": True}
            assert (await c.call_tool("count", {})).structured_content == {"result": 1}
            listed = ok(await c.call_tool("session_list", {}))["sessions"]
            assert [s["kind"] for s in listed] == ["connection"]
            # session_close always needs a handle.
            assert error_code(await c.call_tool("session_close", {})) == "session_required"
            await exercise_handle_tools(c)
            await exercise_resources(c)
            await exercise_cancellation(c)


async def test_auto_mode_handles_required() -> None:
    with trio.fail_after(30):
        async with Client(params(), mode="auto") as c:
            assert c.protocol_version == "2026-07-28"
            calls: list[tuple[str, dict[str, Any]]]
            calls = [("session_info", {}), ("session_state_get", {}),
                     ("session_state_patch", {"patch": {}}), ("count", {}),
                     ("session_close", {})]  # fmt: skip
            for name, args in calls:
                assert error_code(await c.call_tool(name, args)) == "session_required", name
            assert ok(await c.call_tool("session_list", {}))["sessions"] == []
            await exercise_handle_tools(c)
            await exercise_resources(c)
            await exercise_cancellation(c)


async def test_tool_schemas_do_not_depend_on_the_era() -> None:
    """In process: the same server served to a client of each era at once."""
    from .e2e_server import server

    async def schemas(mode: str) -> dict[str, Any]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with client_stream, server_stream, trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_stdio(
                    server, principal="alice", stdin=server_stream, stdout=server_stream
                )
            )
            async with Client(line_transport(client_stream), mode=mode) as c:
                return {t.name: t.input_schema for t in (await c.list_tools()).tools}

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            results: dict[str, Any] = {}

            async def run(mode: str) -> None:
                results[mode] = await schemas(mode)

            nursery.start_soon(run, "legacy")
            nursery.start_soon(run, "auto")
    assert results["legacy"] == results["auto"]
    assert "session" in results["auto"]["session_info"]["properties"]
    assert results["auto"]["session_close"]["required"] == ["session"]


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
