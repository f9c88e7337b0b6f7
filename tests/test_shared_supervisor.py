"""Two connections (one per era, or one per principal) sharing one supervisor, in process.

With the memory store, handles live in one process; a stdio process serves one
connection. So "a handle opened in one mode used in the other" is tested here,
over real JSON lines on a socket pair, with the official client.
"""

from __future__ import annotations

from typing import Any

import trio
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Settings, Supervisor, open_supervisor

from ._wire import serve_in_process


def connect(server: MCPServer[Any], supervisor: Supervisor, principal: str, mode: str) -> Any:
    return serve_in_process(server, mode, supervisor=supervisor, principal=principal)


async def test_handle_from_one_era_works_in_the_other_and_not_for_another_principal() -> None:
    server: MCPServer[Any] = MCPServer("shared")
    with trio.fail_after(20):
        async with open_supervisor(Settings()) as supervisor:
            async with connect(server, supervisor, "alice", "legacy") as legacy:
                opened = await legacy.call_tool("session_open", {})
                assert opened.structured_content is not None
                handle = opened.structured_content["session"]
                await legacy.call_tool(
                    "session_state_patch", {"session": handle, "patch": {"from": "legacy"}}
                )
                async with connect(server, supervisor, "alice", "auto") as modern:
                    assert modern.protocol_version == "2026-07-28"
                    got = await modern.call_tool("session_state_get", {"session": handle})
                    assert got.structured_content == {"state": {"from": "legacy"}, "version": 1}
                    await modern.call_tool(
                        "session_state_patch", {"session": handle, "patch": {"to": "modern"}}
                    )
                async with connect(server, supervisor, "mallory", "auto") as other:
                    stolen = await other.call_tool("session_info", {"session": handle})
                    unknown = await other.call_tool("session_info", {"session": "x" * 43})
                    assert stolen.is_error
                    assert stolen.structured_content == unknown.structured_content
                    assert stolen.structured_content == {
                        "error": {"code": "session_not_found", "message": "no such session"}
                    }
                    listed = await other.call_tool("session_list", {})
                    assert listed.structured_content == {"sessions": [], "next_cursor": None}
                got = await legacy.call_tool("session_state_get", {"session": handle})
                assert got.structured_content is not None
                assert got.structured_content["state"] == {"from": "legacy", "to": "modern"}
                kinds = sorted(s.kind.value for s in supervisor.sessions("alice"))
                assert kinds == ["connection", "handle"]
            # The legacy connection ended: its connection session is gone, the handle lives on.
            assert [s.kind.value for s in supervisor.sessions("alice")] == ["handle"]
            tomb_reasons = {
                t.reason.value
                for t in supervisor.tombstones()
                if t.kind.value == "connection" and t.reason is not None
            }
            assert tomb_reasons == {"disconnected"}
