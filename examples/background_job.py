"""A session that runs background work.

``run_job`` starts a job owned by the session (``SessionContext.start_soon``)
and waits for it, relaying its progress to the client as MCP progress
notifications. ``start_job`` starts one and returns at once; the job keeps its
progress in the session state. Either way the job belongs to the session: when
the session ends (``session_close``, idle timeout, disconnect, shutdown) the job
is cancelled. ``job_status`` reports what became of each job.

From a clone set up as the README says, run it with
``.venv/bin/python examples/background_job.py`` (MCP over stdio; Ctrl-D ends it).
"""

from __future__ import annotations

import contextlib

import trio
from mcp.server.mcpserver import Context, MCPServer

from mcp_sessions import SessionContext, current_session, run_stdio

server = MCPServer("jobs")
#: What became of each job, by session id: running, done or cancelled.
JOBS: dict[str, str] = {}


async def _job(
    sctx: SessionContext, steps: int, delay: float, progress: trio.MemorySendChannel[int]
) -> None:
    JOBS[sctx.id] = "running"
    try:
        async with progress:
            for step in range(1, steps + 1):
                await trio.sleep(delay)
                await sctx.patch({"job": {"step": step, "steps": steps}})
                # Nobody may be listening (start_job): then the update is skipped.
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    progress.send_nowait(step)
        JOBS[sctx.id] = "done"
    except trio.Cancelled:
        JOBS[sctx.id] = "cancelled"
        raise


@server.tool()
async def run_job(steps: int, ctx: Context, delay: float = 0.05, session: str | None = None) -> str:
    """Run a job in the session and wait for it, reporting progress."""
    sctx = current_session()
    send, receive = trio.open_memory_channel[int](steps)
    sctx.start_soon(_job, sctx, steps, delay, send)
    async with receive:
        async for step in receive:
            await ctx.report_progress(step, steps, f"step {step} of {steps}")
    return JOBS.get(sctx.id, "unknown")


@server.tool()
async def start_job(steps: int, delay: float = 0.05, session: str | None = None) -> str:
    """Start a job in the session and return; it runs until done or the session ends."""
    sctx = current_session()
    send, receive = trio.open_memory_channel[int](0)
    receive.close()
    sctx.start_soon(_job, sctx, steps, delay, send)
    return sctx.id


@server.tool()
async def job_status() -> dict[str, str]:
    """What became of each job, by session id."""
    return dict(JOBS)


if __name__ == "__main__":
    run_stdio(server)
