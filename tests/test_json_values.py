"""A value some backend cannot store, or that is not JSON, is ``invalid_arguments`` everywhere.

The runtime checks a state patch and session metadata before any store sees
them, so memory, SQLite and PostgreSQL (when ``MCP_SESSIONS_TEST_PG_DSN`` is
set, in a schema of its own that is dropped afterwards) answer the same:
nothing is written and the session keeps working.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mcp_sessions import InvalidArguments, Settings, open_supervisor
from mcp_sessions._jsonvalue import MAX_DEPTH, check_json_value
from mcp_sessions._store import MemoryStore, SessionStore

from .test_invalid_arguments import invalid, make_server
from .test_layer import ok, serve_in_process

PG_DSN = os.environ.get("MCP_SESSIONS_TEST_PG_DSN")
SETTINGS = Settings(idle_timeout=60, cleanup_interval=1, touch_interval=5, max_lifetime=3600)


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep (the outermost counts as one)."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


# (value, words the message must hold, where it must point)
BAD: list[tuple[str, Any, str, str]] = [
    ("nul-in-string", {"a": {"b": "x\x00y"}}, "NUL character (\\u0000)", "/a/b"),
    ("nul-in-key", {"a": {"k\x00": 1}}, "key that holds a NUL", "/a/k\\u0000"),
    ("nul-in-list", {"a": ["ok", "\x00"]}, "NUL character", "/a/1"),
    ("surrogate-in-string", {"a": "\ud800"}, "lone surrogate", "/a"),
    ("surrogate-in-key", {"\udfff": 1}, "key that holds a lone surrogate", "/\\udfff"),
    ("nan", {"a": math.nan}, "nan", "/a"),
    ("infinity", {"a": [math.inf]}, "inf", "/a/0"),
    ("minus-infinity", {"a": -math.inf}, "-inf", "/a"),
    ("not-json-type", {"a": {1, 2}}, "type set", "/a"),
    ("tuple", {"a": (1, 2)}, "type tuple", "/a"),
    ("bytes", {"a": b"x"}, "type bytes", "/a"),
    ("int-key", {"a": {1: "x"}}, "key of type int", "/a"),
    ("too-deep", nested(MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}", "/n" * MAX_DEPTH),
    ("long-key", {"k" * 1000: "\x00"}, "NUL", "/" + "k" * 64 + "\u2026"),
]


def backends() -> list[Any]:
    skip = pytest.mark.skip(reason="set MCP_SESSIONS_TEST_PG_DSN to run PostgreSQL tests")
    return [
        "memory",
        "sqlite",
        pytest.param("postgres", marks=() if PG_DSN else (skip,)),
    ]


@asynccontextmanager
async def store_for(backend: str, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if backend == "memory":
        yield MemoryStore()
    elif backend == "sqlite":
        from mcp_sessions._store_sqlite import SQLiteStore

        yield SQLiteStore(tmp_path / "sessions.db")
    else:
        import psycopg

        from mcp_sessions._store_pg import PostgresStore

        assert PG_DSN is not None
        schema = f"mcpjv_{uuid.uuid4().hex[:12]}"
        try:
            yield PostgresStore(PG_DSN, schema=schema)
        finally:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_good_values_pass() -> None:
    good = {
        "s": "héllo ✓ 😀",
        "n": [0, -1, 2**80, 1.5, -0.0, True, False, None],
        "o": {"": {"~/": []}},
    }
    check_json_value(good, what="state patch", argument="patch")
    check_json_value(nested(MAX_DEPTH), what="state patch", argument="patch")
    check_json_value({"k" * 100_000: 1}, what="metadata", argument="metadata")


@pytest.mark.parametrize(("name", "value", "words", "where"), BAD, ids=[b[0] for b in BAD])
def test_messages_say_what_and_where(name: str, value: Any, words: str, where: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        check_json_value(value, what="state patch", argument="patch")
    message = str(info.value)
    assert message.startswith(f"state patch: value at {where} "), message
    assert words in message, message
    assert info.value.code == "invalid_arguments"
    assert info.value.details() == {"arguments": ["patch"]}
    message.encode("utf-8")  # the message itself is storable and sendable


def test_top_level_value() -> None:
    with pytest.raises(InvalidArguments, match=r"^metadata: value is of type object,"):
        check_json_value(object(), what="metadata", argument="metadata")
    with pytest.raises(InvalidArguments, match=r"^state patch: value is nan, which is not"):
        check_json_value(math.nan, what="state patch", argument="patch")


@pytest.mark.parametrize("backend", backends())
async def test_every_backend_refuses_the_same(backend: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            store_for(backend, tmp_path) as store,
            open_supervisor(SETTINGS, store=store) as sup,
        ):
            session, _ = await sup.open_handle_session(principal="alice", metadata={"k": 1})
            assert await session.patch_state({"a": {"b": "ok"}}) == 1
            for name, value, words, where in BAD:
                with pytest.raises(InvalidArguments, match=r"^state patch: ") as info:
                    await session.patch_state(value)
                assert words in str(info.value), name
                assert f"value at {where} " in str(info.value), name
                with pytest.raises(InvalidArguments):
                    await sup.patch_state(session, value, if_version=1)
                assert session.version == 1, name
                assert session.state_document() == {"a": {"b": "ok"}}, name

                with pytest.raises(InvalidArguments, match=r"^metadata: ") as info:
                    await sup.open_handle_session(principal="alice", metadata=value)
                assert info.value.details() == {"arguments": ["metadata"]}, name

            # Nothing was written: one session in the store, at version 1.
            records = await store.list_by_principal("alice", include_terminated=True)
            assert [(r.id, r.version) for r in records] == [(session.id, 1)]
            # The session keeps working.
            assert await session.patch_state({"a": {"c": "\u00e9"}}) == 2
            assert session.state_document() == {"a": {"b": "ok", "c": "\u00e9"}}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_tool_error_code(mode: str) -> None:
    with trio.fail_after(20):
        async with serve_in_process(make_server(), mode) as client:
            error = invalid(await client.call_tool("session_open", {"metadata": {"k": "a\x00"}}))
            assert error["arguments"] == ["metadata"]
            assert "metadata: value at /k holds a NUL character" in error["message"]

            handle = ok(await client.call_tool("session_open", {}))["session"]
            patch = {"session": handle, "patch": {"a": {"b": "\x00"}}}
            error = invalid(await client.call_tool("session_state_patch", patch))
            assert error["arguments"] == ["patch"]
            assert error["message"].startswith("state patch: value at /a/b holds a NUL")
            valid = {"session": handle, "patch": {"a": 1}}
            assert ok(await client.call_tool("session_state_patch", valid)) == {"version": 1}
