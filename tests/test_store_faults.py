"""Store failures: bad rows, a locked or read-only SQLite file, a PostgreSQL outage,
and group commit's promises when one operation fails or its caller gives up."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mcp_sessions._errors import VersionConflict
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

        op_timeout = 1.0  # the bound each call must keep while PostgreSQL is cut off
        store = PostgresStore(
            dsn, schema=backend.schema, op_timeout=op_timeout, connect_timeout=1.0, max_size=2
        )
        try:
            await store.open()
            await store.create(record("s"))
            assert await store.patch_state("s", {"a": 1}, if_version=0, at=T0) == (1, {"a": 1})

            proxy.cut_all()

            async def bounded(op: str) -> None:
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
                assert trio.current_time() - start < op_timeout + 1.0, op

            # At once: each is bounded on its own, and a short outage lets the pool's
            # reconnection (which backs off 1 s, 2 s, 4 s ...) find PostgreSQL back soon.
            async with trio.open_nursery() as ops:
                for op in ("load", "patch", "health"):
                    ops.start_soon(bounded, op)

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


# -- group commit: batches, savepoints, callers who give up ---------------------


class Gate(dict[str, Any]):
    """A JSON object whose merge into a state document blocks the store's worker.

    Patching ``{"g": Gate()}`` makes the worker thread wait inside that
    operation, in its transaction, until :attr:`proceed` is set: a way to hold
    the worker still, in a known place, through the public API only.
    """

    def __init__(self) -> None:
        super().__init__(gate=True)
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def items(self) -> Any:
        self.entered.set()
        if not self.proceed.wait(timeout=30):
            raise RuntimeError("the gate was never opened")
        return super().items()

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 30)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "s.db", op_timeout=30.0)
    await store.open()
    try:
        await store.create(record("s"))
        await store.create(record("x"))
        yield store
    finally:
        await store.aclose()


async def hold_worker(store: SQLiteStore, nursery: trio.Nursery) -> Gate:
    """Occupy the store's worker with a patch of session "x" that waits at a gate."""
    gate = Gate()
    nursery.start_soon(partial(store.patch_state, "x", {"g": gate}, if_version=None, at=T0))
    await gate.wait_entered()
    return gate


async def test_one_transaction_holds_every_waiting_operation_and_one_failure_fails_alone(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    outcomes: dict[str, Any] = {}

    async def patch(name: str, if_version: int | None) -> None:
        try:
            outcomes[name] = await store.patch_state("s", {name: 1}, if_version=if_version, at=T0)
        except VersionConflict as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        hold = await hold_worker(store, nursery)
        before = store.statistics()
        for i in range(25):
            nursery.start_soon(patch, f"early{i}", None)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(patch, "conflict", 7)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(25):
            nursery.start_soon(patch, f"late{i}", None)
        await trio.testing.wait_all_tasks_blocked()
        assert store.statistics().queued == 51
        hold.proceed.set()
    after = store.statistics()
    # The held patch's transaction, then one for all 51 that waited behind it.
    assert after.write_transactions - before.write_transactions == 2
    assert after.largest_batch == 51
    assert isinstance(outcomes.pop("conflict"), VersionConflict)
    assert sorted(version for version, _ in outcomes.values()) == list(range(1, 51))
    got = await store.load("s")
    assert got is not None
    assert (got.version, len(got.doc), "conflict" in got.doc) == (50, 50, False)


async def test_operation_given_up_after_it_ran_is_not_committed(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    gate = Gate()
    given_up = trio.CancelScope()
    results: dict[str, Any] = {}

    async def abandoned() -> None:
        with given_up:
            results["a"] = await store.patch_state("s", {"a": gate}, if_version=None, at=T0)

    async def other() -> None:
        results["b"] = await store.patch_state("s", {"b": 1}, if_version=None, at=T0)

    async with trio.open_nursery() as nursery:
        hold = await hold_worker(store, nursery)
        nursery.start_soon(abandoned)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(other)  # same transaction, after "a": it sees what "a" wrote
        await trio.testing.wait_all_tasks_blocked()
        hold.proceed.set()
        await gate.wait_entered()  # "a" is running, in the transaction with "b"
        given_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.proceed.set()
    assert "a" not in results
    # "b" ran again without "a": its answer and the store agree that "a" never happened.
    assert results["b"] == (1, {"b": 1})
    got = await store.load("s")
    assert got is not None
    assert (got.version, got.doc) == (1, {"b": 1})


async def test_operation_given_up_while_queued_never_runs(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    given_up = trio.CancelScope()

    async def abandoned() -> None:
        with given_up:
            await store.patch_state("s", {"a": 1}, if_version=None, at=T0)

    async with trio.open_nursery() as nursery:
        hold = await hold_worker(store, nursery)
        nursery.start_soon(abandoned)
        await trio.testing.wait_all_tasks_blocked()
        given_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert store.statistics().queued == 1  # still queued, marked abandoned
        hold.proceed.set()
    assert await store.patch_state("s", {"b": 1}, if_version=0, at=T0) == (1, {"b": 1})


async def test_reads_do_not_wait_for_the_worker(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    async with trio.open_nursery() as nursery:
        hold = await hold_worker(store, nursery)  # holds the write lock, too
        before = store.statistics()
        got = await store.load("s")
        by_hash = await store.load_by_hash("hash-s")
        listed = await store.list_by_principal("alice")
        after = store.statistics()
        hold.proceed.set()
    assert got is not None
    assert by_hash == got
    assert [r.id for r in listed] == ["s", "x"]
    assert after.direct_reads - before.direct_reads == 3
    assert after.transactions == before.transactions


async def test_transaction_failure_fails_every_operation_in_it(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.2, op_timeout=5.0)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    failures: list[Exception] = []

    async def patch(i: int) -> None:
        try:
            await store.patch_state("s", {f"k{i}": i}, if_version=None, at=T0)
        except StoreUnavailable as exc:
            failures.append(exc)

    try:
        await store.create(record("s"))
        before = store.statistics()
        blocker.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(patch, i)
        blocker.execute("ROLLBACK")
        after = store.statistics()
        assert len(failures) == 10
        assert all("locked" in str(exc) for exc in failures)
        assert len({id(exc) for exc in failures}) == 10  # each caller its own exception
        assert after.failed_transactions > before.failed_transactions
        assert after.write_transactions == before.write_transactions
        assert await store.patch_state("s", {"a": 1}, if_version=0, at=T0) == (1, {"a": 1})
    finally:
        blocker.close()
        await store.aclose()


def _worker_threads() -> int:
    return sum(t.name.startswith("mcp-sessions-sqlite") for t in threading.enumerate())


async def test_aclose_finishes_queued_operations_then_stops(tmp_path: Path) -> None:
    threads = _worker_threads()
    store = SQLiteStore(tmp_path / "s.db", op_timeout=30.0)
    await store.open()
    assert _worker_threads() == threads + 1
    await store.create(record("s"))
    await store.create(record("x"))
    versions: list[int] = []

    async def patch(i: int) -> None:
        version, _ = await store.patch_state("s", {f"k{i}": i}, if_version=None, at=T0)
        versions.append(version)

    async with trio.open_nursery() as nursery:
        hold = await hold_worker(store, nursery)
        for i in range(10):
            nursery.start_soon(patch, i)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(store.aclose)
        await trio.testing.wait_all_tasks_blocked()
        hold.proceed.set()
    assert sorted(versions) == list(range(1, 11))
    assert _worker_threads() == threads
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.patch_state("s", {"late": 1}, if_version=None, at=T0)
    assert store.change_epoch() is None
    again = SQLiteStore(tmp_path / "s.db")
    await again.open()
    try:
        got = await again.load("s")
        assert got is not None
        assert got.version == 10
    finally:
        await again.aclose()
