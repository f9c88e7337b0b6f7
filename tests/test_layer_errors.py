"""Tool errors keep their codes, and a connection stays usable when its session cannot be made.

In-process: the official client talks to ``serve_stdio`` over a socket pair.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Settings, current_session
from mcp_sessions._store import MemoryStore, StoreUnavailable

from .e2e_server import count
from .test_layer import serve_in_process

_STORE_OPS = {"create", "load", "load_by_hash", "terminate", "patch_state", "touch", "expire",
              "list_by_principal", "mark_ready"}  # fmt: skip


class FlakyStore(MemoryStore):
    """A memory store that can be switched off."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name in _STORE_OPS and object.__getattribute__(self, "down"):

            async def fail(*args: Any, **kwargs: Any) -> Any:
                await trio.lowlevel.checkpoint()
                raise StoreUnavailable("the store is down (test)")

            return fail
        return attr


def make_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("layer")

    server.add_tool(count)  # the end-to-end server's counter tool

    @server.tool()
    async def needs_session() -> str:
        """Asks for the session without declaring a `session` parameter."""
        current_session()
        return "unreachable in the modern era"

    return server


@asynccontextmanager
async def connect(
    store: MemoryStore, mode: str, settings: Settings | None = None
) -> AsyncIterator[Client]:
    async with serve_in_process(make_server(), mode, store=store, settings=settings) as client:
        yield client


def code(result: Any) -> str:
    assert result.is_error, result
    assert result.structured_content is not None, result
    value: str = result.structured_content["error"]["code"]
    return value


async def test_a_session_error_in_a_tool_body_keeps_its_code() -> None:
    store = FlakyStore()
    with trio.fail_after(20):
        async with connect(store, "legacy") as client:
            handle = (await client.call_tool("session_open", {})).structured_content["session"]
            assert (await client.call_tool("count", {"session": handle})).structured_content == {
                "result": 1
            }
            store.down = True
            assert code(await client.call_tool("count", {"session": handle})) == (
                "store_unavailable"
            )
            assert code(await client.call_tool("count", {})) == "store_unavailable"
            store.down = False
            assert not (await client.call_tool("count", {"session": handle})).is_error
    with trio.fail_after(20):
        async with connect(store, "auto") as client:  # modern era: no connection session
            assert code(await client.call_tool("needs_session", {})) == "session_required"


async def test_a_connection_whose_session_cannot_be_made_still_serves() -> None:
    store = FlakyStore()
    store.down = True  # the connection session cannot be recorded at `initialize`
    with trio.fail_after(20):
        async with connect(store, "legacy") as client:
            tools = await client.list_tools()  # the handshake worked all the same
            assert any(t.name == "session_open" for t in tools.tools)
            assert code(await client.call_tool("session_open", {})) == "store_unavailable"
            store.down = False
            opened = await client.call_tool("session_open", {})
            assert not opened.is_error
