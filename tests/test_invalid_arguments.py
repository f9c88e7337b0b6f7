"""A built-in tool called with arguments that do not fit answers ``invalid_arguments``.

In-process: the official client talks to ``serve_stdio`` over a socket pair.
Each rejected call is followed by a valid one: the server keeps serving.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from mcp.server.mcpserver import MCPServer

from .test_layer import code, ok, serve_in_process


def invalid(result: Any) -> dict[str, Any]:
    """The structured error of an ``invalid_arguments`` result."""
    assert code(result) == "invalid_arguments"
    error: dict[str, Any] = result.structured_content["error"]
    assert set(error) == {"code", "message", "arguments"}
    return error


def make_server() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("invalid-arguments")

    @server.tool()
    async def add(a: int, b: int) -> int:
        """A user tool: its argument errors stay the SDK's."""
        return a + b

    return server


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_wrong_type(mode: str) -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), mode) as client:
            error = invalid(await client.call_tool("session_open", {"idle_timeout_s": "soon"}))
            assert error["arguments"] == ["idle_timeout_s"]
            assert "'idle_timeout_s'" in error["message"]
            assert "soon" not in error["message"]  # the caller's value is not echoed

            error = invalid(await client.call_tool("session_open", {"metadata": [1, 2]}))
            assert error["arguments"] == ["metadata"]
            assert "'metadata'" in error["message"]

            handle = ok(await client.call_tool("session_open", {}))["session"]
            error = invalid(
                await client.call_tool("session_state_patch", {"session": handle, "patch": 5})
            )
            assert error["arguments"] == ["patch"]
            valid = {"session": handle, "patch": {"a": 1}}
            assert ok(await client.call_tool("session_state_patch", valid)) == {"version": 1}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_missing_required_argument(mode: str) -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), mode) as client:
            handle = ok(await client.call_tool("session_open", {}))["session"]
            error = invalid(await client.call_tool("session_state_patch", {"session": handle}))
            assert error["arguments"] == ["patch"]
            assert "missing required argument 'patch'" in error["message"]
            # The session is unharmed and the server keeps serving.
            valid = {"session": handle, "patch": {"a": 1}}
            assert ok(await client.call_tool("session_state_patch", valid)) == {"version": 1}
            info = ok(await client.call_tool("session_info", {"session": handle}))
            assert info["version"] == 1
            assert info["errors"] == 1  # the rejected call counts as a failed request


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_out_of_range_number(mode: str) -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), mode) as client:
            for bad in (-1, 0, "-1"):
                error = invalid(await client.call_tool("session_open", {"idle_timeout_s": bad}))
                assert error["arguments"] == ["idle_timeout_s"]
                assert "'idle_timeout_s'" in error["message"]
                assert "greater than 0" in error["message"]
            opened = ok(await client.call_tool("session_open", {"idle_timeout_s": 30}))
            assert opened["idle_timeout_s"] == 30


async def test_the_published_schema_stays_informative() -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), "auto") as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            idle = tools["session_open"].input_schema["properties"]["idle_timeout_s"]
            assert {"type": "number", "exclusiveMinimum": 0} in idle["anyOf"]
            assert tools["session_state_patch"].input_schema["required"] == ["patch"]


async def test_user_tools_keep_the_sdk_error() -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), "auto") as client:
            result = await client.call_tool("add", {"a": "one", "b": 2})
            assert result.is_error
            assert result.structured_content is None
            assert ok(await client.call_tool("add", {"a": 1, "b": 2})) == {"result": 3}


async def test_a_user_tool_under_a_built_in_name_keeps_the_sdk_error() -> None:
    server = make_server()

    @server.tool()
    async def session_open(idle_timeout_s: int) -> str:
        """The user's own session_open wins over the built-in one."""
        return "mine"

    with trio.fail_after(20):
        async with serve_in_process(server, "auto") as client:
            result = await client.call_tool("session_open", {"idle_timeout_s": "x"})
            assert result.is_error
            assert result.structured_content is None
            assert ok(await client.call_tool("session_open", {"idle_timeout_s": 1})) == {
                "result": "mine"
            }
