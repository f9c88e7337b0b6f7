"""The built-in session tools with a resume hook that takes a while, for end-to-end tests of
bringing in a session opened by another process.

Run as ``python tests/e2e_slow_resume.py STORE_URL SECONDS``.
"""

from __future__ import annotations

import sys

import trio
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Hooks, Session, run_stdio


async def resume(session: Session) -> None:
    await trio.sleep(float(sys.argv[2]))


if __name__ == "__main__":
    run_stdio(MCPServer("slow-resume"), store=sys.argv[1], principal="alice",
              hooks=Hooks(resume=resume))  # fmt: skip
