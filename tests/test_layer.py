"""The session layer in process: which tools get a session, and installing the built-ins.

The official client talks to ``serve_stdio`` over a socket pair.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

from mcp_sessions import SESSION_TOOLS, current_session, serve_stdio

from ._wire import line_transport


@asynccontextmanager
async def serve_in_process(
    server: MCPServer[Any], mode: str, **options: Any
) -> AsyncIterator[Client]:
    """A client connected to ``serve_stdio(server, **options)`` over a socket pair."""
    a, b = trio.socket.socketpair()
    client_end, server_end = trio.SocketStream(a), trio.SocketStream(b)
    options.setdefault("principal", "alice")
    async with client_end, server_end, trio.open_nursery() as nursery:

        async def serve() -> None:
            await serve_stdio(server, stdin=server_end, stdout=server_end, **options)

        nursery.start_soon(serve)
        async with Client(line_transport(client_end), mode=mode) as client:
            yield client
        await client_end.send_eof()


def ok(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


def code(result: Any) -> str:
    assert result.is_error, result
    assert result.structured_content is not None, result
    value: str = result.structured_content["error"]["code"]
    return value


async def whose(session: str | None = None) -> str:
    """Added while serving: the id of the session it runs in."""
    return current_session().id


async def needs_a_handle(session: str) -> str:
    """Added while serving: `session` is required."""
    return current_session().id


async def test_a_tool_added_while_serving_gets_its_session() -> None:
    server: MCPServer[Any] = MCPServer("late")
    with trio.fail_after(20):
        async with serve_in_process(server, "legacy") as client:
            connection_id = ok(await client.call_tool("session_info", {}))["id"]
            opened = ok(await client.call_tool("session_open", {}))
            server.add_tool(whose)  # serving has started: the layer has not seen it
            server.add_tool(needs_a_handle)
            assert ok(await client.call_tool("whose", {"session": opened["session"]})) == {
                "result": opened["id"]
            }
            assert ok(await client.call_tool("whose", {})) == {"result": connection_id}
            assert code(await client.call_tool("needs_a_handle", {})) == "session_required"
            assert code(await client.call_tool("whose", {"session": "nope"})) == (
                "session_not_found"
            )
            assert ok(await client.call_tool("needs_a_handle", {"session": opened["session"]})) == {
                "result": opened["id"]
            }
        async with serve_in_process(server, "auto") as client:  # modern era: handles only
            assert code(await client.call_tool("whose", {})) == "session_required"


async def test_installing_the_session_tools_and_resources_twice_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server: MCPServer[Any] = MCPServer("twice")

    @server.tool()
    async def session_list() -> str:
        """The user's own tool of a built-in's name: it is kept."""
        return "mine"

    with trio.fail_after(20):
        for mode in ("legacy", "auto", "legacy"):  # each serve installs again
            async with serve_in_process(server, mode) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert sorted(names) == sorted(SESSION_TOOLS)  # each once
                uris = [str(r.uri) for r in (await client.list_resources()).resources]
                assert sorted(uris) == ["sessions://health", "sessions://metrics"]
                assert ok(await client.call_tool("session_list", {})) == {"result": "mine"}
                handle = ok(await client.call_tool("session_open", {}))["session"]
                patch = {"session": handle, "patch": {"n": 1}}
                assert ok(await client.call_tool("session_state_patch", patch)) == {"version": 1}
                health = await client.read_resource("sessions://health")
                assert '"status": "ok"' in health.contents[0].text  # type: ignore[union-attr]
    assert "already exists" not in caplog.text


def test_the_sdk_keeps_the_first_tool_of_a_name_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Why installing asks ``list_tools()`` first: ``add_tool`` is idempotent, not quiet."""
    server: MCPServer[Any] = MCPServer("sdk")
    server.add_tool(whose)
    server.add_tool(needs_a_handle, name="whose")
    tools = trio.run(server.list_tools)
    assert [t.name for t in tools] == ["whose"]
    assert "session" not in tools[0].input_schema.get("required", [])  # the first one
    assert "already exists" in caplog.text


async def test_a_tool_replaced_while_serving_is_seen_once_the_client_lists_tools() -> None:
    server: MCPServer[Any] = MCPServer("swap")

    @server.tool(name="swap")
    async def without_session() -> str:
        return "no session"

    with trio.fail_after(20):
        async with serve_in_process(server, "auto") as client:
            handle = ok(await client.call_tool("session_open", {}))["session"]
            assert ok(await client.call_tool("swap", {})) == {"result": "no session"}
            server.remove_tool("swap")
            server.add_tool(whose, name="swap")
            # After tools/list_changed a client lists the tools again; so does the layer.
            await client.list_tools()
            opened_id = ok(await client.call_tool("session_info", {"session": handle}))["id"]
            assert ok(await client.call_tool("swap", {"session": handle})) == {"result": opened_id}
            assert code(await client.call_tool("swap", {})) == "session_required"
