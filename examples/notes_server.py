"""Per-session notes: an MCP server built on mcp-sessions.

Each session (the connection's own in the handshake era, or one opened with
``session_open`` and named by its handle) keeps its own notes in the session's
JSON state. From a clone set up as the README says, run it with
``.venv/bin/python examples/notes_server.py`` (it serves MCP over stdio: point a
desktop client's ``command`` at that; Ctrl-D ends it).
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from mcp_sessions import current_session, run_stdio

server = MCPServer("notes", instructions="Keep notes per session: add_note, list_notes, clear.")


@server.tool()
async def add_note(text: str, session: str | None = None) -> dict[str, Any]:
    """Add a note to the session; returns how many notes it holds."""
    ctx = current_session()
    notes = [*ctx.state.get("notes", []), text]
    # if_version: if another process changed the notes since we read them, this
    # fails with `version_conflict` instead of silently dropping their note.
    version = await ctx.patch({"notes": notes}, if_version=ctx.version)
    return {"count": len(notes), "version": version}


@server.tool()
async def list_notes(session: str | None = None) -> list[str]:
    """The session's notes, oldest first."""
    notes: list[str] = current_session().state.get("notes", [])
    return notes


@server.tool()
async def clear_notes(session: str | None = None) -> int:
    """Forget the session's notes (a JSON Merge Patch with null deletes them)."""
    return await current_session().patch({"notes": None})


if __name__ == "__main__":
    run_stdio(server)
