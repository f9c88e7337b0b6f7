"""``session_list`` pages, and the times every tool reports mean one thing each.

In process: the official client over JSON lines on a socket pair, a real
SQLite file where a store is the point.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

from mcp_sessions import Settings, SQLiteStore, Supervisor, open_supervisor

from ._wire import serve_in_process


def connect(supervisor: Supervisor, principal: str, mode: str) -> Any:
    return serve_in_process(MCPServer("paging"), mode, supervisor=supervisor, principal=principal)


async def page(client: Client, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("session_list", arguments)
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


async def every_page(client: Client, limit: int | None = None) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        arguments: dict[str, Any] = {} if limit is None else {"limit": limit}
        if cursor is not None:
            arguments["cursor"] = cursor
        got = await page(client, **arguments)
        pages.append(got)
        cursor = got["next_cursor"]
        if cursor is None:
            return pages


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def runtime(kind: str, tmp_path: Path, wall: Any = None) -> AsyncIterator[Supervisor]:
    store = SQLiteStore(tmp_path / "s.db") if kind == "sqlite" else None
    extra: dict[str, Any] = {} if wall is None else {"wall_clock": wall}
    settings = Settings(max_sessions=1000, max_sessions_per_principal=1000)
    async with open_supervisor(settings, store=store, **extra) as supervisor:
        yield supervisor


async def test_pages_hold_at_most_100_and_list_each_session_once(
    store_kind: str, tmp_path: Path
) -> None:
    # Every session opened at the same wall instant: the id alone orders them.
    async with runtime(store_kind, tmp_path, wall=lambda: 1_800_000_000.0) as supervisor:
        opened = {
            (await supervisor.open_handle_session(principal="alice"))[0].id for _ in range(230)
        }
        await supervisor.open_handle_session(principal="bob")
        with trio.fail_after(60):
            async with connect(supervisor, "alice", "auto") as client:
                pages = await every_page(client)
                assert [len(p["sessions"]) for p in pages] == [100, 100, 30]
                listed = [s["id"] for p in pages for s in p["sessions"]]
                assert len(listed) == len(set(listed)) == 230
                assert set(listed) == opened  # and none of bob's
                assert listed == sorted(listed)  # same created_at: ordered by id

                small = await every_page(client, limit=7)
                assert [s["id"] for p in small for s in p["sessions"]] == listed
                assert all(len(p["sessions"]) == 7 for p in small[:-1])


async def test_sessions_opened_and_closed_while_paging_never_repeat_a_session(
    store_kind: str, tmp_path: Path
) -> None:
    ticks = itertools.count(1_800_000_000)
    async with runtime(store_kind, tmp_path, wall=lambda: float(next(ticks))) as supervisor:
        first = [(await supervisor.open_handle_session(principal="alice"))[0] for _ in range(5)]
        async with connect(supervisor, "alice", "legacy") as client:
            one = await page(client, limit=2)
            assert [s["id"] for s in one["sessions"]] == [s.id for s in first[:2]]
            await supervisor.close(first[2])  # not listed yet: now it never will be
            late, _ = await supervisor.open_handle_session(principal="alice")
            rest: list[str] = []
            cursor = one["next_cursor"]
            while cursor is not None:
                got = await page(client, cursor=cursor, limit=2)
                rest += [s["id"] for s in got["sessions"]]
                cursor = got["next_cursor"]
            # The connection session of this legacy client was opened after the five.
            assert rest[:2] == [first[3].id, first[4].id]
            assert late.id in rest
            seen = [s.id for s in first[:2]] + rest
            assert len(seen) == len(set(seen))
            assert first[2].id not in seen


@pytest.mark.parametrize(
    "arguments",
    [{"cursor": "not a cursor"}, {"cursor": "WzEsMl0"}, {"limit": 0}, {"limit": 101}],
    ids=["garbage", "wrong-shape", "limit-0", "limit-101"],
)
async def test_a_bad_cursor_or_limit_is_invalid_arguments(
    arguments: dict[str, Any], tmp_path: Path
) -> None:
    async with runtime("memory", tmp_path) as supervisor, connect(supervisor, "a", "auto") as c:
        result = await c.call_tool("session_list", arguments)
        assert result.is_error
        assert result.structured_content is not None
        error = result.structured_content["error"]
        assert error["code"] == "invalid_arguments"
        assert error["arguments"] == list(arguments)


def instant(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def test_expires_at_means_the_same_in_every_tool(autojump_clock: trio.abc.Clock) -> None:
    # One meaning: when the session ends if it is not used again (its idle end,
    # never after its lifetime end); lifetime_ends_at is the lifetime end.
    settings = Settings(idle_timeout=600, max_lifetime=3600)
    wall = lambda: 1_800_000_000 + trio.current_time()  # noqa: E731 (wall time moves with trio's)
    supervising = open_supervisor(settings, wall_clock=wall)
    async with supervising as supervisor, connect(supervisor, "a", "auto") as c:
        opened = (await c.call_tool("session_open", {})).structured_content
        assert opened is not None
        handle = opened["session"]
        await trio.sleep(100)
        info = (await c.call_tool("session_info", {"session": handle})).structured_content
        listed = (await c.call_tool("session_list", {})).structured_content
        assert info is not None
        assert listed is not None
        [row] = listed["sessions"]
        for times in (opened, info, row):
            assert instant(times["lifetime_ends_at"]) == pytest.approx(
                instant(info["created_at"]) + 3600, abs=0.01
            )
        # The info call used the session: both now say 600 s after that use.
        assert instant(info["expires_at"]) == pytest.approx(
            instant(info["last_active"]) + 600, abs=0.01
        )
        assert row["expires_at"] == info["expires_at"]
        assert instant(info["expires_at"]) > instant(opened["expires_at"]) + 99

        for _ in range(6):  # keep it in use until its last use is 3100 s in
            await trio.sleep(500)
            info = (await c.call_tool("session_info", {"session": handle})).structured_content
        assert info is not None
        # Its idle end (3700 s) is past its lifetime end (3600 s): the lifetime ends first.
        assert info["expires_at"] == info["lifetime_ends_at"]


async def test_a_handle_session_kept_across_shutdown_is_logged_as_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mcp_sessions")
    async with open_supervisor(Settings(), store=SQLiteStore(tmp_path / "s.db")) as supervisor:
        kept, _ = await supervisor.open_handle_session(principal="a")
        closed, _ = await supervisor.open_handle_session(principal="a")
        await supervisor.close(closed)
    said = {r.getMessage() for r in caplog.records if r.name.startswith("mcp_sessions")}
    assert f"session {kept.id} leaving this process (shutdown); kept in the store" in said
    assert f"session {kept.id} terminating: shutdown" not in said
    assert f"session {closed.id} terminating: closed" in said
    async with open_supervisor(Settings(), store=SQLiteStore(tmp_path / "s.db")) as supervisor:
        assert [r.id for r in await supervisor.list_records("a")] == [kept.id]
