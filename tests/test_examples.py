"""The examples run, and do what they say, with the official client over stdio."""

from __future__ import annotations

from typing import Any

import trio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

from .conftest import PYTHON, ROOT


def example(name: str) -> StdioServerParameters:
    return StdioServerParameters(command=PYTHON, args=[str(ROOT / "examples" / name)])


def structured(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


async def test_notes_server_keeps_notes_per_session() -> None:
    with trio.fail_after(30):
        async with Client(example("notes_server.py"), mode="legacy") as c:
            # The connection's own session.
            assert structured(await c.call_tool("add_note", {"text": "one"}))["count"] == 1
            assert structured(await c.call_tool("add_note", {"text": "two"}))["count"] == 2
            # A separate handle session has its own notes.
            handle = structured(await c.call_tool("session_open", {}))["session"]
            await c.call_tool("add_note", {"text": "other", "session": handle})
            assert structured(await c.call_tool("list_notes", {})) == {"result": ["one", "two"]}
            assert structured(await c.call_tool("list_notes", {"session": handle})) == {
                "result": ["other"]
            }
            await c.call_tool("clear_notes", {})
            assert structured(await c.call_tool("list_notes", {})) == {"result": []}
        async with Client(example("notes_server.py"), mode="auto") as c:
            missing = await c.call_tool("list_notes", {})
            assert missing.is_error
            assert missing.structured_content is not None
            assert missing.structured_content["error"]["code"] == "session_required"
            handle = structured(await c.call_tool("session_open", {}))["session"]
            await c.call_tool("add_note", {"text": "modern", "session": handle})
            assert structured(await c.call_tool("list_notes", {"session": handle})) == {
                "result": ["modern"]
            }


async def test_background_job_reports_progress_and_is_cancelled_with_its_session() -> None:
    with trio.fail_after(30):
        async with Client(example("background_job.py"), mode="auto") as c:
            handle = structured(await c.call_tool("session_open", {}))["session"]
            progress: list[tuple[float, float | None, str | None]] = []

            async def on_progress(p: float, total: float | None, message: str | None) -> None:
                progress.append((p, total, message))

            result = await c.call_tool(
                "run_job", {"steps": 4, "delay": 0.02, "session": handle},
                progress_callback=on_progress,
            )  # fmt: skip
            assert structured(result) == {"result": "done"}
            assert [p for p, _, _ in progress] == [1, 2, 3, 4]
            assert progress[-1][1] == 4

            other = structured(await c.call_tool("session_open", {}))["session"]
            job_session = structured(
                await c.call_tool("start_job", {"steps": 1000, "delay": 0.02, "session": other})
            )["result"]
            await trio.sleep(0.2)
            state = structured(await c.call_tool("session_state_get", {"session": other}))
            assert state["state"]["job"]["step"] >= 1
            assert structured(await c.call_tool("job_status", {}))[job_session] == "running"
            await c.call_tool("session_close", {"session": other})
            assert structured(await c.call_tool("job_status", {}))[job_session] == "cancelled"
