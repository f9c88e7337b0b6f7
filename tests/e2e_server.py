"""A server for the end-to-end tests: the session tools plus a few test tools.

Run as ``python tests/e2e_server.py [mcp-sessions serve options]``.
"""

from __future__ import annotations

import sys

import trio
from mcp.server.mcpserver import Context, MCPServer

from mcp_sessions import current_session
from mcp_sessions._cli import main

server = MCPServer("e2e")
EVENTS: list[str] = []


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Sleep in steps of 0.05 s, reporting progress."""
    steps = max(1, int(seconds / 0.05))
    try:
        for i in range(steps):
            await trio.sleep(0.05)
            await ctx.report_progress(i + 1, steps, f"step {i + 1}")
    except trio.Cancelled:
        EVENTS.append("slow cancelled")
        raise
    EVENTS.append("slow done")
    return "done"


@server.tool()
async def events() -> list[str]:
    """What happened so far."""
    return list(EVENTS)


@server.tool()
async def count(session: str | None = None) -> int:
    """Bump a counter kept in the session's state."""
    ctx = current_session()
    n = int(ctx.state.get("count", 0)) + 1
    await ctx.patch({"count": n})
    return n


@server.tool()
async def hello() -> str:
    print("stray print must not reach stdout")
    return "hello"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], server=server))
