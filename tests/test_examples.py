"""The examples do what they say, served in process to the official client over JSON lines."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import trio
import trio.testing
from mcp.client.client import Client

from mcp_sessions import serve_stdio

from ._wire import line_transport
from .conftest import ROOT


def example(name: str) -> ModuleType:
    """A fresh copy of ``examples/<name>`` (its module-level state included)."""
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", ROOT / "examples" / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def served(module: ModuleType, mode: str) -> AsyncIterator[Client]:
    """The example's server, as ``run_stdio(server)`` serves it, and a client of it."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with client_stream, server_stream, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_stdio(module.server, stdin=server_stream, stdout=server_stream)
        )
        async with Client(line_transport(client_stream), mode=mode) as client:
            yield client


def structured(result: Any) -> Any:
    assert not result.is_error, result
    return result.structured_content


async def test_notes_server_keeps_notes_per_session() -> None:
    notes = example("notes_server.py")
    with trio.fail_after(30):
        async with served(notes, mode="legacy") as c:
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
        async with served(notes, mode="auto") as c:
            missing = await c.call_tool("list_notes", {})
            assert missing.is_error
            assert missing.structured_content is not None
            assert missing.structured_content["error"]["code"] == "session_required"
            handle = structured(await c.call_tool("session_open", {}))["session"]
            await c.call_tool("add_note", {"text": "modern", "session": handle})
            assert structured(await c.call_tool("list_notes", {"session": handle})) == {
                "result": ["modern"]
            }


async def test_background_job_reports_progress_and_is_cancelled_with_its_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(300):  # mock time: the job's delays pass at once
        async with served(example("background_job.py"), mode="auto") as c:
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
            await trio.sleep(0.2)  # mock time: ten steps of the job
            state = structured(await c.call_tool("session_state_get", {"session": other}))
            assert state["state"]["job"]["step"] >= 1
            assert structured(await c.call_tool("job_status", {}))[job_session] == "running"
            await c.call_tool("session_close", {"session": other})
            assert structured(await c.call_tool("job_status", {}))[job_session] == "cancelled"
