"""One contract suite for every session store backend (memory, SQLite, PostgreSQL).

MemoryStore is the reference: every backend must return the same values and
raise the same errors. PostgreSQL tests run when ``MCP_SESSIONS_TEST_PG_DSN``
is set (each test in its own schema, dropped afterwards).
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from mcp_sessions._errors import (
    LimitExceeded,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
    StateTooLarge,
    VersionConflict,
)
from mcp_sessions._state import TerminationReason as R
from mcp_sessions._store import (
    InstanceRecord,
    Limits,
    MemoryStore,
    SchemaTooNew,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreUnavailable,
    Touch,
)
from mcp_sessions._store_url import redact_url, store_from_url

PG_DSN = os.environ.get("MCP_SESSIONS_TEST_PG_DSN")
PG_SKIP = "set MCP_SESSIONS_TEST_PG_DSN to run PostgreSQL store tests"
#: The schema version a fresh store has, and the migrations that got it there.
LATEST = 3
MIGRATED = [(1,), (2,), (3,)]
T0 = 1_700_000_000.0

MakeStore = Callable[[], Awaitable[SessionStore]]


def record(
    session_id: str,
    *,
    principal: str = "alice",
    kind: str = "handle",
    state: str = "idle",
    created: float = T0,
    idle_timeout: float = 60.0,
    lifetime: float = 3600.0,
    handle_hash: str | None = "",
    **extra: Any,
) -> SessionRecord:
    return SessionRecord(
        id=session_id,
        handle_hash=f"hash-{session_id}" if handle_hash == "" else handle_hash,
        kind=kind,
        principal=principal,
        state=state,
        created_at=created,
        last_active=created,
        idle_timeout=idle_timeout,
        expires_at=created + lifetime,
        **extra,
    )


def pg_schema() -> str:
    return f"mcpst_{uuid.uuid4().hex[:12]}"


def drop_pg_schema(schema: str) -> None:
    import psycopg

    assert PG_DSN is not None
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def pg_exec(schema: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    assert PG_DSN is not None
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.execute(f'SET search_path TO "{schema}"')
        cur = conn.execute(sql.encode(), params)
        return list(cur.fetchall()) if cur.description else []


class Backend:
    """Makes opened stores of one backend that share one database; closes them all."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.path = tmp_path / "state" / "sessions.db"
        self.path.parent.mkdir(exist_ok=True)  # a store never creates a directory itself
        self.schema = pg_schema()
        self.stores: list[SessionStore] = []
        self._memory: MemoryStore | None = None

    def new(self, **kwargs: Any) -> SessionStore:
        if self.name == "memory":
            if self._memory is None:
                self._memory = MemoryStore()
            return self._memory
        if self.name == "sqlite":
            from mcp_sessions._store_sqlite import SQLiteStore

            return SQLiteStore(self.path, **kwargs)
        from mcp_sessions._store_pg import PostgresStore

        assert PG_DSN is not None
        return PostgresStore(PG_DSN, schema=self.schema, **kwargs)

    async def make(self, **kwargs: Any) -> SessionStore:
        store = self.new(**kwargs)
        await store.open()
        if store not in self.stores:
            self.stores.append(store)
        return store

    async def close_all(self) -> None:
        for store in self.stores:
            await store.aclose()
        self.stores.clear()

    def raw(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL on the backend's database behind the store's back."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                return list(conn.execute(sql.replace("%s", "?"), params).fetchall())
            finally:
                conn.close()
        assert self.name == "postgresql"
        return pg_exec(self.schema, sql, params)

    def cleanup(self) -> None:
        if self.name == "postgresql":
            drop_pg_schema(self.schema)


BACKENDS = [
    "memory",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(PG_DSN is None, reason=PG_SKIP)),
]
SHARED = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(PG_DSN is None, reason=PG_SKIP)),
]


async def _backend(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = Backend(name, tmp_path)
    try:
        yield backend
    finally:
        await backend.close_all()
        backend.cleanup()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, tmp_path):
        yield b


@pytest.fixture(params=SHARED)
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, tmp_path):
        yield b


@pytest.fixture
async def store(backend: Backend) -> SessionStore:
    return await backend.make()


# -- create / load ---------------------------------------------------------


async def test_create_load_roundtrip(store: SessionStore) -> None:
    rec = record(
        "s1",
        client={"name": "c", "nested": {"v": [1, 2.5, None, True]}},
        metadata={"tag": "x"},
        doc={"a": {"b": 1}},
        version=3,
        requests=2,
        errors=1,
    )
    await store.create(rec)
    assert await store.load("s1") == rec
    assert await store.load_by_hash("hash-s1") == rec
    assert await store.load("nope") is None
    assert await store.load_by_hash("nope") is None
    assert store.backend in ("memory", "sqlite", "postgresql")


async def test_loaded_records_are_copies(store: SessionStore) -> None:
    await store.create(record("s1", doc={"a": [1]}))
    loaded = await store.load("s1")
    assert loaded is not None
    loaded.doc["a"].append(2)
    again = await store.load("s1")
    assert again is not None
    assert again.doc == {"a": [1]}


async def test_known_version_leaves_the_document_out(store: SessionStore) -> None:
    await store.create(record("s1", doc={"big": "x" * 1000}, version=4))
    same = await store.load("s1", known_version=4)
    assert same is not None
    assert (same.doc_loaded, same.doc, same.version) == (False, {}, 4)
    same_by_hash = await store.load_by_hash("hash-s1", known_version=4)
    assert same_by_hash == same
    newer = await store.load("s1", known_version=3)
    assert newer is not None
    assert (newer.doc_loaded, newer.doc) == (True, {"big": "x" * 1000})
    full = await store.load_by_hash("hash-s1")
    assert full == newer
    assert await store.load("nope", known_version=4) is None


async def test_null_handle_hashes_do_not_collide(store: SessionStore) -> None:
    await store.create(record("c1", handle_hash=None, kind="connection"))
    await store.create(record("c2", handle_hash=None, kind="connection"))
    got = await store.load("c2")
    assert got is not None
    assert got.handle_hash is None


async def test_duplicate_create_fails(store: SessionStore) -> None:
    await store.create(record("s1"))
    with pytest.raises(StoreError):
        await store.create(record("s1", handle_hash="other"))
    with pytest.raises(StoreError):
        await store.create(record("s2", handle_hash="hash-s1"))
    assert await store.load("s2") is None


async def test_mark_ready(store: SessionStore) -> None:
    await store.create(record("c1", state="initializing", kind="connection"))
    await store.mark_ready("c1", T0 + 5)
    got = await store.load("c1")
    assert got is not None
    assert (got.state, got.last_active) == ("idle", T0 + 5)
    await store.mark_ready("c1", T0 + 9)  # already ready: no change
    got = await store.load("c1")
    assert got is not None
    assert got.last_active == T0 + 5
    await store.mark_ready("unknown", T0)


# -- ending sessions -------------------------------------------------------


async def test_terminate_exactly_once(store: SessionStore) -> None:
    await store.create(record("s1"))
    touch = Touch("s1", last_active=T0 + 3, requests=4, errors=1)
    assert await store.terminate("s1", R.CLOSED, T0 + 5, touch) is R.CLOSED
    assert await store.terminate("s1", R.EVICTED, T0 + 6) is R.CLOSED
    got = await store.load("s1")
    assert got is not None
    assert (got.state, got.reason, got.terminated_at) == ("terminated", "closed", T0 + 5)
    assert (got.last_active, got.requests, got.errors) == (T0 + 3, 4, 1)
    assert await store.terminate("unknown", R.CLOSED, T0) is None


async def test_terminate_without_touch_keeps_activity(store: SessionStore) -> None:
    await store.create(record("s1", requests=7))
    assert await store.terminate("s1", R.SHUTDOWN, T0 + 1) is R.SHUTDOWN
    got = await store.load("s1")
    assert got is not None
    assert (got.last_active, got.requests) == (T0, 7)


async def test_expire_only_when_due(store: SessionStore) -> None:
    await store.create(record("idle", idle_timeout=10, lifetime=100))
    await store.create(record("old", idle_timeout=1000, lifetime=100))
    await store.create(record("init", state="initializing", idle_timeout=10, lifetime=100))
    assert await store.expire("idle", T0 + 9.5) is None
    assert await store.expire("idle", T0 + 10) is R.IDLE_TIMEOUT
    assert await store.expire("idle", T0 + 11) is None  # already ended
    assert await store.expire("old", T0 + 99) is None
    assert await store.expire("old", T0 + 100) is R.LIFETIME_EXCEEDED
    assert await store.expire("init", T0 + 50) is None  # initializing does not idle out
    assert await store.expire("init", T0 + 100) is R.LIFETIME_EXCEEDED
    assert await store.expire("unknown", T0 + 1000) is None
    got = await store.load("idle")
    assert got is not None
    assert (got.reason, got.terminated_at) == ("idle_timeout", T0 + 10)


async def test_expire_prefers_lifetime_when_both_due(store: SessionStore) -> None:
    await store.create(record("s", idle_timeout=10, lifetime=20))
    assert await store.expire("s", T0 + 30) is R.LIFETIME_EXCEEDED


async def test_grace_widens_the_idle_bound_only(store: SessionStore) -> None:
    await store.create(record("idle", idle_timeout=40, lifetime=100))
    await store.create(record("old", idle_timeout=1000, lifetime=100))
    await store.create(record("swept", idle_timeout=40, lifetime=100))
    await store.create(record("short", idle_timeout=2, lifetime=100))
    assert await store.expire("idle", T0 + 44, grace=5) is None
    assert await store.expire("idle", T0 + 45, grace=5) is R.IDLE_TIMEOUT
    assert await store.expire("old", T0 + 100, grace=5) is R.LIFETIME_EXCEEDED
    # The allowance is min(grace, idle_timeout / 4): half a second for a 2 s timeout.
    assert await store.sweep(T0 + 2.25, grace=5) == []
    assert await store.sweep(T0 + 2.5, grace=5) == [("short", R.IDLE_TIMEOUT)]
    assert await store.sweep(T0 + 44, grace=5) == []
    assert await store.sweep(T0 + 45, grace=5) == [("swept", R.IDLE_TIMEOUT)]


async def test_touch_moves_idle_deadline(store: SessionStore) -> None:
    await store.create(record("s", idle_timeout=10))
    await store.touch([Touch("s", last_active=T0 + 8)])
    assert await store.expire("s", T0 + 12) is None
    assert await store.expire("s", T0 + 18) is R.IDLE_TIMEOUT


# -- state -----------------------------------------------------------------


async def test_patch_state_merge_and_versions(store: SessionStore) -> None:
    await store.create(record("s1"))
    assert await store.patch_state("s1", {"a": 1, "b": {"c": 2}}, if_version=None, at=T0 + 1) == (
        1,
        {"a": 1, "b": {"c": 2}},
    )
    assert await store.patch_state("s1", {"a": None, "b": {"d": [1]}}, if_version=1, at=T0 + 2) == (
        2,
        {"b": {"c": 2, "d": [1]}},
    )
    with pytest.raises(VersionConflict) as info:
        await store.patch_state("s1", {"x": 1}, if_version=1, at=T0 + 3)
    assert (info.value.expected, info.value.current) == (1, 2)
    got = await store.load("s1")
    assert got is not None
    assert (got.version, got.doc, got.last_active) == (2, {"b": {"c": 2, "d": [1]}}, T0 + 2)
    # last_active never moves backwards
    await store.patch_state("s1", {}, if_version=2, at=T0)
    got = await store.load("s1")
    assert got is not None
    assert (got.version, got.last_active) == (3, T0 + 2)


async def test_patch_state_errors(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.patch_state("unknown", {"a": 1}, if_version=None, at=T0)
    await store.create(record("closed"))
    await store.create(record("expired", idle_timeout=1))
    await store.terminate("closed", R.CLOSED, T0 + 1)
    await store.expire("expired", T0 + 2)
    with pytest.raises(SessionClosed) as closed:
        await store.patch_state("closed", {"a": 1}, if_version=None, at=T0 + 3)
    assert closed.value.reason is R.CLOSED
    with pytest.raises(SessionExpired) as expired:
        await store.patch_state("expired", {"a": 1}, if_version=0, at=T0 + 3)
    assert expired.value.reason is R.IDLE_TIMEOUT
    got = await store.load("closed")
    assert got is not None
    assert (got.version, got.doc) == (0, {})


# -- activity --------------------------------------------------------------


async def test_touch(store: SessionStore) -> None:
    await store.create(record("a"))
    await store.create(record("b"))
    await store.terminate("b", R.CLOSED, T0 + 1)
    await store.touch([])
    await store.touch(
        [
            Touch("a", last_active=T0 + 10, requests=3, errors=1),
            Touch("b", last_active=T0 + 10, requests=3),
            Touch("unknown", last_active=T0 + 10, requests=3),
        ]
    )
    await store.touch([Touch("a", last_active=T0 + 5, requests=2)])  # older: no step back
    a = await store.load("a")
    b = await store.load("b")
    assert a is not None
    assert b is not None
    assert (a.last_active, a.requests, a.errors) == (T0 + 10, 5, 1)
    assert (b.last_active, b.requests, b.errors) == (T0, 0, 0)


# -- listing ---------------------------------------------------------------


async def test_list_by_principal(store: SessionStore) -> None:
    await store.create(record("z", created=T0 + 1))
    await store.create(record("y", created=T0 + 2))
    await store.create(record("b", created=T0 + 1))  # same time as z: id breaks the tie
    await store.create(record("other", principal="bob"))
    await store.terminate("y", R.CLOSED, T0 + 3)
    live = await store.list_by_principal("alice")
    assert [r.id for r in live] == ["b", "z"]
    everything = await store.list_by_principal("alice", include_terminated=True)
    assert [r.id for r in everything] == ["b", "z", "y"]
    assert everything[2].state == "terminated"
    assert await store.list_by_principal("nobody") == []


async def test_list_by_principal_pages_by_created_at_then_id(store: SessionStore) -> None:
    for sid, created in [("c", T0 + 1), ("a", T0 + 1), ("d", T0 + 2), ("b", T0 + 1), ("e", T0)]:
        await store.create(record(sid, created=created))
    await store.create(record("other", principal="bob", created=T0 + 1))
    await store.terminate("d", R.CLOSED, T0 + 3)
    first = await store.list_by_principal("alice", limit=2)
    assert [r.id for r in first] == ["e", "a"]
    after = (first[-1].created_at, first[-1].id)
    assert [r.id for r in await store.list_by_principal("alice", after=after)] == ["b", "c"]
    assert [r.id for r in await store.list_by_principal("alice", after=after, limit=1)] == ["b"]
    every = await store.list_by_principal("alice", include_terminated=True, after=after)
    assert [r.id for r in every] == ["b", "c", "d"]
    assert await store.list_by_principal("alice", after=(T0 + 2, "")) == []
    assert await store.list_by_principal("alice", limit=0) == []


async def test_list_recent(store: SessionStore) -> None:
    for i, sid in enumerate(["a", "b", "c", "d"]):
        await store.create(record(sid, created=T0 + i, principal=f"p{i}"))
    await store.touch([Touch("a", last_active=T0 + 10)])
    await store.terminate("c", R.CLOSED, T0 + 20)
    assert [r.id for r in await store.list_recent()] == ["a", "d", "c", "b"]
    assert [r.id for r in await store.list_recent(limit=2)] == ["a", "d"]
    assert await store.list_recent(limit=0) == []


async def test_counts(store: SessionStore) -> None:
    assert await store.counts() == {}
    await store.create(record("a"))
    await store.create(record("b"))
    await store.create(record("c", kind="connection", state="initializing", handle_hash=None))
    await store.terminate("b", R.CLOSED, T0 + 1)
    assert await store.counts() == {
        ("idle", "handle"): 1,
        ("terminated", "handle"): 1,
        ("initializing", "connection"): 1,
    }


# -- sweep / purge ---------------------------------------------------------


async def test_sweep_ends_due_sessions_once(store: SessionStore) -> None:
    await store.create(record("idle", idle_timeout=10))
    await store.create(record("old", lifetime=20, idle_timeout=1000))
    await store.create(record("fresh", idle_timeout=1000))
    await store.create(record("init", state="initializing", idle_timeout=10, handle_hash=None))
    await store.create(record("done", idle_timeout=1))
    await store.terminate("done", R.CLOSED, T0 + 1)
    assert await store.sweep(T0 + 5) == []
    ended = await store.sweep(T0 + 30)
    assert sorted(ended, key=lambda e: e[0]) == [
        ("idle", R.IDLE_TIMEOUT),
        ("old", R.LIFETIME_EXCEEDED),
    ]
    assert await store.sweep(T0 + 30) == []
    got = await store.load("idle")
    assert got is not None
    assert (got.state, got.reason, got.terminated_at) == ("terminated", "idle_timeout", T0 + 30)
    done = await store.load("done")
    assert done is not None
    assert done.reason == "closed"


async def test_sweep_respects_limit(store: SessionStore) -> None:
    for i in range(7):
        await store.create(record(f"s{i}", idle_timeout=1, created=T0 + i / 10))
    first = await store.sweep(T0 + 100, limit=3)
    second = await store.sweep(T0 + 100, limit=3)
    third = await store.sweep(T0 + 100, limit=3)
    assert [len(first), len(second), len(third)] == [3, 3, 1]
    ids = [sid for sid, _ in first + second + third]
    assert sorted(ids) == [f"s{i}" for i in range(7)]
    assert await store.sweep(T0 + 100, limit=0) == []


async def test_purge(store: SessionStore) -> None:
    await store.create(record("a"))
    await store.create(record("b"))
    await store.create(record("c"))
    await store.terminate("a", R.CLOSED, T0 + 1)
    await store.terminate("b", R.CLOSED, T0 + 5)
    assert await store.purge(T0 + 5) == 1
    assert await store.load("a") is None
    assert await store.load_by_hash("hash-a") is None
    assert await store.load("b") is not None
    assert await store.load("c") is not None
    assert await store.purge(T0 + 100) == 1
    assert await store.purge(T0 + 100) == 0
    # the purged handle hash can be used again
    await store.create(record("a2", handle_hash="hash-a"))


async def test_health(store: SessionStore) -> None:
    health = await store.health()
    assert health.ok
    assert health.backend == store.backend
    assert health.error is None
    assert health.latency_s is not None
    assert health.latency_s >= 0
    if store.backend != "memory":
        assert health.schema_version == LATEST
        assert store.durable


async def test_statistics_count_operations_and_transactions(store: SessionStore) -> None:
    before = store.statistics()
    assert before.transactions == before.write_transactions == before.largest_batch == 0
    await store.create(record("s1"))
    await store.patch_state("s1", {"a": 1}, if_version=None, at=T0)
    await store.load("s1")
    await store.load_by_hash("hash-s1")
    with pytest.raises(VersionConflict):
        await store.patch_state("s1", {"a": 2}, if_version=0, at=T0)
    stats = store.statistics()
    assert dict(stats.operations) == {
        "create": 1,
        "patch_state": 2,
        "load": 1,
        "load_by_hash": 1,
    }
    # One at a time, each call is its own transaction (or a direct read, on SQLite).
    assert stats.transactions + stats.direct_reads == 5
    assert stats.write_transactions == 3
    assert (stats.largest_batch, stats.failed_transactions, stats.queued) == (1, 0, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.transactions = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.operations["load"] = 0  # type: ignore[index]


# -- several processes (store instances) on one database --------------------


async def test_concurrent_patches_from_two_instances_lose_nothing(shared: Backend) -> None:
    one = await shared.make()
    two = await shared.make()
    await one.create(record("s"))
    per_task = 10
    tasks = 3

    async def patcher(store: SessionStore, name: str) -> None:
        for i in range(per_task):
            await store.patch_state("s", {f"{name}-{i}": i}, if_version=None, at=T0 + i)

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(patcher, one, f"one{t}")
            nursery.start_soon(patcher, two, f"two{t}")
    got = await two.load("s")
    assert got is not None
    assert got.version == 2 * tasks * per_task
    assert len(got.doc) == 2 * tasks * per_task


async def test_if_version_races_have_one_winner(shared: Backend) -> None:
    one = await shared.make()
    two = await shared.make()
    await one.create(record("s"))
    wins: list[int] = []
    conflicts: list[int] = []

    async def attempt(store: SessionStore, n: int) -> None:
        try:
            await store.patch_state("s", {"winner": n}, if_version=0, at=T0)
            wins.append(n)
        except VersionConflict:
            conflicts.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(attempt, one if n % 2 else two, n)
    assert len(wins) == 1
    assert len(conflicts) == 5


async def test_concurrent_sweeps_end_each_session_once(shared: Backend) -> None:
    one = await shared.make()
    two = await shared.make()
    expired = 40
    for i in range(expired):
        await one.create(record(f"e{i:02}", idle_timeout=1, created=T0 + i / 100))
    await one.create(record("live", idle_timeout=10_000))
    results: list[list[tuple[str, R]]] = []

    async def sweeper(store: SessionStore) -> None:
        while True:
            ended = await store.sweep(T0 + 100, limit=7)
            if not ended:
                return
            results.append(ended)

    async with trio.open_nursery() as nursery:
        for store in (one, two, one, two):
            nursery.start_soon(sweeper, store)
    ids = [sid for batch in results for sid, _ in batch]
    assert len(ids) == expired
    assert len(set(ids)) == expired
    live = await two.load("live")
    assert live is not None
    assert live.live


async def test_concurrent_terminate_has_one_winner(shared: Backend) -> None:
    one = await shared.make()
    two = await shared.make()
    await one.create(record("s"))
    reasons = [R.CLOSED, R.EVICTED, R.SHUTDOWN, R.ERROR]
    results: list[R | None] = []

    async def ender(store: SessionStore, reason: R) -> None:
        results.append(await store.terminate("s", reason, T0 + 1))

    async with trio.open_nursery() as nursery:
        for n, reason in enumerate(reasons):
            nursery.start_soon(ender, one if n % 2 else two, reason)
    assert len(set(results)) == 1
    got = await one.load("s")
    assert got is not None
    assert got.termination_reason is results[0]


# -- group commit ------------------------------------------------------------


async def test_concurrent_patches_share_transactions(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s"))
    start = store.statistics()
    for i in range(50):
        await store.patch_state("s", {f"seq{i}": i}, if_version=None, at=T0)
    sequential = store.statistics()
    versions: list[int] = []

    async def patch(i: int) -> None:
        version, _ = await store.patch_state("s", {f"con{i}": i}, if_version=None, at=T0)
        versions.append(version)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(patch, i)
    concurrent = store.statistics()
    assert sequential.write_transactions - start.write_transactions == 50
    assert concurrent.write_transactions - sequential.write_transactions < 50
    assert concurrent.largest_batch > 1
    assert sorted(versions) == list(range(51, 101))  # serialised all the same
    got = await store.load("s")
    assert got is not None
    assert (got.version, len(got.doc)) == (100, 100)


async def test_a_failing_operation_fails_alone(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s"))
    await store.create(record("t"))
    outcomes: dict[str, object] = {}

    async def patch(name: str, session: str, if_version: int | None) -> None:
        try:
            outcomes[name] = await store.patch_state(
                session, {name: 1}, if_version=if_version, at=T0
            )
        except Exception as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(patch, f"ok{i}", "s", None)
        nursery.start_soon(patch, "conflict", "s", 999)
        nursery.start_soon(patch, "gone", "unknown", None)
        for i in range(20):
            nursery.start_soon(patch, f"other{i}", "t", None)
    assert isinstance(outcomes.pop("conflict"), VersionConflict)
    assert isinstance(outcomes.pop("gone"), SessionNotFound)
    assert all(isinstance(o, tuple) for o in outcomes.values()), outcomes
    s, t = await store.load("s"), await store.load("t")
    assert s is not None
    assert t is not None
    assert (s.version, t.version) == (20, 20)
    assert "conflict" not in s.doc


# -- change detection ----------------------------------------------------------


async def test_change_epoch_moves_only_for_other_writers(shared: Backend) -> None:
    a = await shared.make()
    b = await shared.make()
    if shared.name == "postgresql":
        assert a.change_epoch() is None  # cannot tell cheaply: callers read every time
        return
    await b.create(record("s"))
    first = a.change_epoch()
    assert first is not None
    assert a.change_epoch() == first  # nothing happened

    # a's own writes do not move a's epoch
    await a.create(record("mine"))
    await a.patch_state("s", {"a": 1}, if_version=None, at=T0)
    await a.touch([Touch("s", last_active=T0 + 1)])
    await a.terminate("mine", R.CLOSED, T0 + 2)
    assert a.change_epoch() == first

    # nobody's reads move it
    await a.load("s")
    await a.list_recent()
    await b.load("s")
    await b.counts()
    assert a.change_epoch() == first

    # b's write does, once
    b_before = b.change_epoch()
    await b.patch_state("s", {"b": 1}, if_version=None, at=T0)
    second = a.change_epoch()
    assert second != first
    assert a.change_epoch() == second
    assert b.change_epoch() == b_before  # b's own write

    # a foreign write followed by one of a's own is still seen
    await b.touch([Touch("s", last_active=T0 + 5)])
    await a.patch_state("s", {"a": 2}, if_version=None, at=T0)
    third = a.change_epoch()
    assert third not in (first, second)

    # a write behind every store's back is seen too
    shared.raw("UPDATE sessions SET requests = requests + 1 WHERE id = 's'")
    assert a.change_epoch() != third


async def test_change_epoch_is_none_when_the_backend_cannot_tell(backend: Backend) -> None:
    store = backend.new()
    assert store.change_epoch() is None  # not open
    await store.open()
    try:
        if backend.name in ("memory", "postgresql"):
            assert store.change_epoch() is None
        else:
            assert store.change_epoch() is not None
    finally:
        await store.aclose()
    if backend.name != "memory":
        assert store.change_epoch() is None  # closed


async def test_reads_see_other_writers_at_once(shared: Backend) -> None:
    a = await shared.make()
    b = await shared.make()
    await a.create(record("s"))
    for i in range(1, 4):
        await b.patch_state("s", {"n": i}, if_version=None, at=T0)
        got = await a.load("s")
        by_hash = await a.load_by_hash("hash-s", known_version=i - 1)
        assert got is not None
        assert by_hash is not None
        assert (got.version, got.doc, by_hash.doc) == (i, {"n": i}, {"n": i})
        [listed] = await a.list_by_principal("alice")
        assert listed.version == i


# -- migrations ------------------------------------------------------------


async def test_reopen_keeps_data(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s", doc={"k": "v"}))
    await store.patch_state("s", {"n": 1}, if_version=0, at=T0)
    await shared.close_all()
    again = await shared.make()
    got = await again.load("s")
    assert got is not None
    assert (got.version, got.doc) == (1, {"k": "v", "n": 1})
    assert shared.raw("SELECT version FROM schema_version ORDER BY version") == MIGRATED


async def test_upgrade_from_schema_1_keeps_data(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s", doc={"k": "v"}))
    await shared.close_all()
    # Take the database back to what version 1 of the schema left.
    for index in ("sessions_live_principal", "sessions_live_instance", "sessions_kind_state"):
        shared.raw(f"DROP INDEX {index}")
    shared.raw("ALTER TABLE sessions DROP COLUMN instance")
    shared.raw("DROP TABLE instances")
    shared.raw("DROP TABLE leases")
    if shared.name == "sqlite":
        for event in ("insert", "update", "delete"):
            shared.raw(f"DROP TRIGGER sessions_{event}_bumps_generation")
        shared.raw("DROP TABLE store_generation")
    shared.raw("DELETE FROM schema_version WHERE version >= 2")
    again = await shared.make()
    assert shared.raw("SELECT version FROM schema_version ORDER BY version") == MIGRATED
    got = await again.load("s")
    assert got is not None
    assert got.doc == {"k": "v"}
    other = await shared.make()
    epoch = again.change_epoch()
    await other.patch_state("s", {"n": 1}, if_version=0, at=T0)
    assert again.change_epoch() != epoch or shared.name == "postgresql"


async def test_schema_too_new_is_refused_untouched(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s", doc={"k": "v"}))
    await shared.close_all()
    shared.raw("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    before = shared.raw("SELECT id, doc, version FROM sessions")
    newer = shared.new()
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        await newer.open()
    await newer.aclose()
    assert shared.raw("SELECT id, doc, version FROM sessions") == before
    assert shared.raw("SELECT MAX(version) FROM schema_version") == [(99,)]


async def test_two_instances_open_a_fresh_store_at_once(shared: Backend) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(shared.make)
    assert shared.raw("SELECT version FROM schema_version ORDER BY version") == MIGRATED


async def test_sqlite_in_a_missing_directory_is_unavailable_and_creates_nothing(
    tmp_path: Path,
) -> None:
    from mcp_sessions._store_sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "missing" / "s.db")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await store.open()
    assert not (tmp_path / "missing").exists()


async def test_sqlite_creates_directory_when_asked_and_uses_wal(tmp_path: Path) -> None:
    from mcp_sessions._store_sqlite import SQLiteStore

    path = tmp_path / "deep" / "er" / "s.db"
    store = SQLiteStore(path, synchronous="FULL", create_directory=True)
    await store.open()
    try:
        await store.create(record("s"))
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        (hash_,) = conn.execute("SELECT handle_hash FROM sessions").fetchone()
        assert hash_ == "hash-s"
    finally:
        conn.close()


def test_default_sqlite_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mcp_sessions._store_sqlite import default_sqlite_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_sqlite_path() == tmp_path / "mcp-sessions" / "sessions.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_sqlite_path() == tmp_path / "home" / ".local/state/mcp-sessions/sessions.db"


# -- store URLs ------------------------------------------------------------


def test_store_from_url() -> None:
    from mcp_sessions._store_sqlite import SQLiteStore

    assert isinstance(store_from_url("memory"), MemoryStore)
    assert isinstance(store_from_url("memory:"), MemoryStore)
    s = store_from_url("sqlite:///tmp/x/s.db?synchronous=full")
    assert isinstance(s, SQLiteStore)
    assert (str(s.path), s.synchronous) == ("/tmp/x/s.db", "FULL")
    rel = store_from_url("sqlite://rel/s.db")
    assert isinstance(rel, SQLiteStore)
    assert str(rel.path) == "rel/s.db"
    bare = store_from_url("sessions.db")
    assert isinstance(bare, SQLiteStore)
    assert bare.synchronous == "NORMAL"
    assert isinstance(store_from_url("/var/lib/x/sessions"), SQLiteStore)
    pytest.importorskip("psycopg_pool")
    from mcp_sessions._store_pg import PostgresStore

    pg = store_from_url("postgresql://u:pw@db:5432/app?schema=s1&sslmode=disable&max_size=8")
    assert isinstance(pg, PostgresStore)
    assert (pg.dsn, pg.schema, pg.max_size) == (
        "postgresql://u:pw@db:5432/app?sslmode=disable",
        "s1",
        8,
    )
    assert "pw" not in repr(pg)
    assert isinstance(store_from_url("postgres://db/app"), PostgresStore)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis://localhost",
        "mysql://u:secret@h/db",
        "sessions",
        "sqlite://",
        "sqlite:///x.db?synchronous=off",
        "sqlite:///x.db?bogus=1",
        "postgresql://h/db?schema=bad-name",
    ],
)
def test_store_from_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        store_from_url(url)
    assert "secret" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert (
        redact_url("postgresql://h/db?password=s3cret&x=1") == "postgresql://h/db?password=***&x=1"
    )
    assert redact_url("host=h password=s3cret user=u") == "host=h password=*** user=u"
    assert redact_url("sqlite:///a/b.db") == "sqlite:///a/b.db"


async def test_change_epoch_moves_across_a_close_and_reopen(shared: Backend) -> None:
    """A write made while a store object was closed is news when it opens again."""
    if shared.name == "postgresql":
        pytest.skip("PostgreSQL cannot tell cheaply (change_epoch is None)")
    a = await shared.make()
    b = await shared.make()
    await a.create(record("s"))
    before = a.change_epoch()
    await a.aclose()
    await b.patch_state("s", {"while": "closed"}, if_version=None, at=T0)
    await a.open()
    assert a.change_epoch() != before


# -- many processes: limits, instances, sweeps, clocks ------------------------------


def limits(**kw: Any) -> Limits:
    base: dict[str, Any] = {"max_sessions": 100, "max_per_principal": 2, "now": T0 + 1}
    return Limits(**(base | kw))


async def test_create_counts_live_sessions_atomically_with_the_insert(store: SessionStore) -> None:
    await store.create(record("a1"), limits=limits())
    await store.create(record("a2"), limits=limits())
    with pytest.raises(LimitExceeded) as info:
        await store.create(record("a3"), limits=limits())
    assert (info.value.limit, info.value.scope) == (2, "principal 'alice'")
    assert await store.load("a3") is None  # nothing inserted
    await store.create(record("b1", principal="bob"), limits=limits())
    with pytest.raises(LimitExceeded) as info:
        await store.create(record("c1", principal="carol"), limits=limits(max_sessions=3))
    assert info.value.scope == "global"
    # Ended and due sessions take no room.
    await store.terminate("a1", R.CLOSED, T0 + 2)
    await store.create(record("a4"), limits=limits(now=T0 + 2))
    assert await store.create(record("a5"), limits=limits(now=T0 + 61)) == []  # a2, a4 idle out


async def test_concurrent_creates_never_pass_the_limit(store: SessionStore) -> None:
    refused = 0

    async def open_one(i: int) -> None:
        nonlocal refused
        try:
            await store.create(record(f"s{i}"), limits=limits(max_per_principal=5))
        except LimitExceeded:
            refused += 1

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(open_one, i)
    assert refused == 15
    assert len(await store.list_by_principal("alice")) == 5


async def test_create_evicts_the_longest_idle_session_not_recently_active(
    store: SessionStore,
) -> None:
    await store.create(record("old"))
    await store.create(record("newer", created=T0 + 10))
    evicting = limits(now=T0 + 30, evict_before=T0 + 20)
    assert await store.create(record("new", created=T0 + 30), limits=evicting) == ["old"]
    got = await store.load("old")
    assert got is not None
    assert (got.state, got.reason) == ("terminated", "evicted")
    # Nothing idle long enough: refused, nothing ended.
    with pytest.raises(LimitExceeded):
        await store.create(record("newest"), limits=limits(now=T0 + 31, evict_before=T0 + 5))
    assert [r.id for r in await store.list_by_principal("alice")] == ["newer", "new"]


def instance(instance_id: str, renewed: float, lease: float = 10.0) -> InstanceRecord:
    return InstanceRecord(
        id=instance_id,
        host="h",
        pid=1,
        started_at=T0,
        heartbeat_at=renewed,
        lease_until=renewed + lease,
    )


async def test_instances_renew_and_lapsed_ones_are_reaped(store: SessionStore) -> None:
    await store.register_instance(instance("i_a", T0))
    await store.register_instance(instance("i_b", T0))
    await store.create(record("conn_a", kind="connection", handle_hash=None, instance="i_a"))
    await store.create(record("conn_b", kind="connection", handle_hash=None, instance="i_b"))
    await store.create(record("handle"))
    assert (await store.load("conn_a")).instance == "i_a"  # type: ignore[union-attr]
    assert await store.heartbeat("i_b", T0 + 8, T0 + 18) is True
    assert await store.reap_instances(T0 + 10, T0 + 11) == []  # i_a's lease ends at T0+10
    assert await store.reap_instances(T0 + 12, T0 + 12) == ["conn_a"]
    assert [i.id for i in await store.list_instances()] == ["i_b"]
    got = await store.load("conn_a")
    assert got is not None
    assert (got.state, got.reason) == ("terminated", "disconnected")
    assert (await store.load("handle")).live  # type: ignore[union-attr]
    assert (await store.load("conn_b")).live  # type: ignore[union-attr]
    assert await store.heartbeat("i_a", T0 + 13, T0 + 23) is False  # it was reaped
    assert await store.remove_instance("i_b", T0 + 14) == ["conn_b"]  # its live one ends
    assert await store.list_instances() == []


async def test_only_the_sweep_lease_holder_sweeps(store: SessionStore) -> None:
    await store.create(record("s1", idle_timeout=10))
    await store.create(record("s2", idle_timeout=20))
    assert await store.sweep(T0 + 11, holder="i_a", lease=60) == [("s1", R.IDLE_TIMEOUT)]
    assert await store.sweep(T0 + 21, holder="i_b", lease=60) == []  # i_a holds it
    assert await store.sweep(T0 + 22, holder="i_a", lease=60) == [("s2", R.IDLE_TIMEOUT)]
    await store.create(record("s3", idle_timeout=10, created=T0 + 80))
    assert await store.sweep(T0 + 95, holder="i_b", lease=60) == [("s3", R.IDLE_TIMEOUT)]


async def test_a_stored_time_in_the_writers_future_is_replaced(store: SessionStore) -> None:
    # Written before the wall clock stepped back an hour: "last active" is in the future.
    await store.create(record("s", created=T0 + 3600))
    await store.touch([Touch("s", last_active=T0 + 10, now=T0 + 10)])
    assert (await store.load("s")).last_active == T0 + 10  # type: ignore[union-attr]
    await store.touch([Touch("s", last_active=T0 + 5, now=T0 + 12)])  # later stays
    assert (await store.load("s")).last_active == T0 + 10  # type: ignore[union-attr]
    await store.touch([Touch("s", last_active=T0 + 11, now=T0 + 9)])  # small skew: no reset
    assert (await store.load("s")).last_active == T0 + 11  # type: ignore[union-attr]


async def test_a_patch_past_max_bytes_writes_nothing(store: SessionStore) -> None:
    await store.create(record("s"))
    await store.patch_state("s", {"a": "x" * 10}, if_version=None, at=T0, max_bytes=30)
    with pytest.raises(StateTooLarge) as info:
        await store.patch_state("s", {"b": "y" * 10}, if_version=None, at=T0, max_bytes=30)
    assert info.value.limit == 30
    got = await store.load("s")
    assert got is not None
    assert (got.version, got.doc) == (1, {"a": "x" * 10})


async def test_an_open_refused_for_one_scope_evicts_nobody_for_another(store: SessionStore) -> None:
    await store.create(record("bob", principal="bob", created=T0))  # long idle
    await store.create(record("alice", created=T0 + 990))  # recently active
    at_limits = limits(max_sessions=2, max_per_principal=1, now=T0 + 1000, evict_before=T0 + 900)
    with pytest.raises(LimitExceeded):
        await store.create(record("new", created=T0 + 1000), limits=at_limits)
    got = await store.load("bob")
    assert got is not None
    assert got.live  # evicting bob for the global limit was undone with the refusal


async def test_opens_with_limits_and_patches_from_two_stores_never_deadlock(
    shared: Backend,
) -> None:
    # One connection each (PostgreSQL): every operation of a hop shares one transaction.
    options: dict[str, Any] = {"max_size": 1} if shared.name == "postgresql" else {}
    one, two = await shared.make(**options), await shared.make(**options)
    rows = ["s_1", "s_5", "s_9", "s_d"]
    for row in rows:
        await one.create(record(row))
    failures: list[BaseException] = []

    async def run(coro: Awaitable[object]) -> None:
        try:
            await coro
        except StoreUnavailable as exc:  # a deadlock that outlived its retries
            failures.append(exc)

    async def worker(store: SessionStore, n: int) -> None:
        for k in range(n):
            async with trio.open_nursery() as nursery:
                # A create sorting after the patched rows, and patches of the shared rows.
                opening = record(f"s_{uuid.uuid4().hex[:8]}", principal=f"p{k}")  # between rows
                nursery.start_soon(run, store.create(opening, limits=limits(max_sessions=10**6)))
                for row in (rows[k % 4], rows[(k * 3 + 1) % 4]):
                    nursery.start_soon(
                        run, store.patch_state(row, {"k": k}, if_version=None, at=T0)
                    )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, one, 150)
        nursery.start_soon(worker, two, 150)
    assert failures == []
