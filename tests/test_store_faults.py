"""Store failures: bad rows, a locked or read-only SQLite file, a PostgreSQL outage."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from mcp_sessions._state import TerminationReason
from mcp_sessions._store import StoreUnavailable
from mcp_sessions._store_sqlite import SQLiteStore
from tests.test_store_contract import (
    PG_DSN,
    PG_SKIP,
    T0,
    Backend,
    record,
)

needs_pg = pytest.mark.skipif(PG_DSN is None, reason=PG_SKIP)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=needs_pg)],
)
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = Backend(request.param, tmp_path)
    try:
        yield backend
    finally:
        await backend.close_all()
        backend.cleanup()


async def test_undecodable_row_is_absent_and_logged(
    durable: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = await durable.make()
    await store.create(record("bad"))
    await store.create(record("good", created=T0 + 1))
    # SQLite keeps JSON as text: break it. PostgreSQL's JSONB is always valid JSON:
    # store a document that is not an object.
    bad_doc = "{not json" if durable.name == "sqlite" else "[1, 2]"
    durable.raw(
        "UPDATE sessions SET doc = %s"
        + ("::jsonb" if durable.name == "postgresql" else "")
        + " WHERE id = 'bad'",
        (bad_doc,),
    )
    with caplog.at_level(logging.ERROR, logger="mcp_sessions.store"):
        assert await store.load("bad") is None
        assert await store.load_by_hash("hash-bad") is None
        assert [r.id for r in await store.list_by_principal("alice")] == ["good"]
        assert [r.id for r in await store.list_recent()] == ["good"]
    assert any("bad" in r.getMessage() for r in caplog.records)
    assert all(r.name == "mcp_sessions.store" for r in caplog.records)


async def test_sqlite_bad_state_row_is_absent(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        await store.create(record("s"))
        conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        conn.execute("UPDATE sessions SET state = 'weird', created_at = 'x' WHERE id = 's'")
        conn.close()
        assert await store.load("s") is None
    finally:
        await store.aclose()


async def test_sqlite_locked_past_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.2, op_timeout=3.0)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await store.create(record("s"))
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.patch_state("s", {"a": 1}, if_version=None, at=T0)
        assert time.monotonic() - start < 2.0
        # reads still work under WAL
        got = await store.load("s")
        assert got is not None
        blocker.execute("ROLLBACK")
        assert await store.patch_state("s", {"a": 1}, if_version=None, at=T0) == (1, {"a": 1})
        health = await store.health()
        assert health.ok
    finally:
        blocker.close()
        await store.aclose()


async def test_sqlite_health_reports_lock_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.1, op_timeout=0.5)
    await store.open()
    try:
        assert (await store.health()).ok
    finally:
        await store.aclose()
    closed = await store.health()
    assert not closed.ok
    assert closed.error is not None


async def test_sqlite_read_only_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.2, op_timeout=3.0)
    await store.open()
    try:
        await store.create(record("s"))
        assert store._conn is not None
        if os.geteuid() == 0:
            # root ignores file modes: make the connection read-only instead.
            store._conn.execute("PRAGMA query_only = ON")
        else:
            await store.aclose()
            path.chmod(0o444)
            store = SQLiteStore(path, busy_timeout=0.2, op_timeout=3.0)
            try:
                await store.open()
            except StoreUnavailable:
                return  # cannot even open for writing: also the right answer
        with pytest.raises(StoreUnavailable, match="read"):
            await store.patch_state("s", {"a": 1}, if_version=None, at=T0)
        with pytest.raises(StoreUnavailable):
            await store.terminate("s", TerminationReason.CLOSED, T0)
        got = await store.load("s")
        assert got is not None
        assert got.version == 0
    finally:
        await store.aclose()


async def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SQLiteStore(blocker / "s.db")
    with pytest.raises(StoreUnavailable):
        await store.open()
    await store.aclose()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a sqlite database" * 100)
    store = SQLiteStore(garbage)
    with pytest.raises(StoreUnavailable, match="garbage"):
        await store.open()
    await store.aclose()


# -- PostgreSQL outage through a loopback proxy -----------------------------


class Proxy:
    """A TCP proxy to PostgreSQL that can cut every connection and refuse new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut = False
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self.cut:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                except OSError:
                    pass
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut_all(self) -> None:
        self.cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.cut = False


@needs_pg
async def test_postgres_outage_and_recovery(tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    assert PG_DSN is not None
    parts = urlsplit(PG_DSN)
    backend = Backend("postgresql", tmp_path)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
        dsn = parts._replace(netloc=netloc).geturl()
        from mcp_sessions._store_pg import PostgresStore

        store = PostgresStore(
            dsn, schema=backend.schema, op_timeout=2.0, connect_timeout=1.0, max_size=2
        )
        try:
            await store.open()
            await store.create(record("s"))
            assert await store.patch_state("s", {"a": 1}, if_version=0, at=T0) == (1, {"a": 1})

            proxy.cut_all()
            for op in ("load", "patch", "health"):
                start = trio.current_time()
                if op == "load":
                    with pytest.raises(StoreUnavailable):
                        await store.load("s")
                elif op == "patch":
                    with pytest.raises(StoreUnavailable):
                        await store.patch_state("s", {"b": 2}, if_version=None, at=T0)
                else:
                    health = await store.health()
                    assert not health.ok
                    assert health.error
                assert trio.current_time() - start < 2.0 + 1.0, op

            proxy.restore()
            # The pool reconnects in the background: within a few seconds, without reopening.
            deadline = trio.current_time() + 10
            while True:
                try:
                    got = await store.load("s")
                    break
                except StoreUnavailable:
                    if trio.current_time() > deadline:
                        raise
                    await trio.sleep(0.2)
            assert got is not None
            assert got.version == 1
            assert await store.patch_state("s", {"b": 2}, if_version=1, at=T0) == (
                2,
                {"a": 1, "b": 2},
            )
            assert (await store.health()).ok
        finally:
            await store.aclose()
            backend.cleanup()
            nursery.cancel_scope.cancel()


@needs_pg
async def test_postgres_down_at_open_is_unavailable(tmp_path: Path) -> None:
    from mcp_sessions._store_pg import PostgresStore

    # Nothing listens on port 9 of loopback (discard; refused).
    store = PostgresStore(
        "postgresql://postgres@127.0.0.1:9/test", op_timeout=1.0, connect_timeout=1.0
    )
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert time.monotonic() - start < 5.0
    await store.aclose()


async def test_sqlite_op_timeout_abandons_stuck_operation(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    # busy_timeout longer than op_timeout: the trio side gives up first.
    store = SQLiteStore(path, busy_timeout=3.0, op_timeout=0.3)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await store.create(record("s"))
        blocker.execute("BEGIN IMMEDIATE")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not finish within"):
            await store.patch_state("s", {"a": 1}, if_version=None, at=T0)
        assert time.monotonic() - start < 1.0
        blocker.execute("ROLLBACK")
        # The abandoned thread finishes and rolls back (the caller was told it failed);
        # the store keeps working and never shares the connection meanwhile.
        deadline = time.monotonic() + 5
        while True:
            try:
                version, doc = await store.patch_state("s", {"b": 2}, if_version=None, at=T0)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await trio.sleep(0.1)
        assert (version, doc) == (1, {"b": 2})
    finally:
        blocker.close()
        await store.aclose()
