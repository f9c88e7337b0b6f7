"""``mcp-sessions check`` and the store's ``check``; ``mcp-sessions status`` lists instances.

The stores are real: a SQLite file under ``tmp_path`` and, when
``MCP_SESSIONS_TEST_PG_DSN`` is set, PostgreSQL in a schema of its own that is
dropped afterwards. Damage is done behind the store's back with raw SQL. The
command line runs in-process (``main([...])``; it calls ``trio.run`` itself, so
those tests are synchronous and seed their stores with ``trio.run`` too).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from mcp_sessions._cli import main
from mcp_sessions._state import TerminationReason
from mcp_sessions._store import InstanceRecord, SessionStore, StoreUnavailable
from mcp_sessions._store_sql import SQLStoreBase

from .conftest import PYTHON
from .test_store_contract import BACKENDS, MIGRATED, PG_DSN, PG_SKIP, SHARED, Backend, record

NOW = time.time()
HOUR = 3600.0


def instance(
    instance_id: str, *, lease_until: float, host: str = "h1", pid: int = 4242
) -> InstanceRecord:
    return InstanceRecord(
        id=instance_id,
        host=host,
        pid=pid,
        version="9.9",
        started_at=NOW - 2 * HOUR,
        heartbeat_at=lease_until - 30,
        lease_until=lease_until,
    )


def url_of(backend: Backend) -> str:
    if backend.name == "sqlite":
        return f"sqlite:///{backend.path}"
    assert PG_DSN is not None
    return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={backend.schema}"


def iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


DEAD_LEASE = NOW - 400.0


async def seed_healthy(store: SessionStore) -> None:
    """A live instance with a connection session, and a handle session (nobody's)."""
    await store.register_instance(instance("i_live", lease_until=NOW + HOUR))
    await store.create(record("s_conn", kind="connection", handle_hash=None, instance="i_live",
                              created=NOW))  # fmt: skip
    await store.create(record("s_handle", created=NOW))


async def seed_orphans(store: SessionStore) -> None:
    """What a process killed with -9 leaves when no other process is left to reap it."""
    await seed_healthy(store)
    await store.register_instance(instance("i_dead", lease_until=DEAD_LEASE, host="h2", pid=99))
    for session_id, owner in [("s_orphan", "i_dead"), ("s_lost", "i_gone"), ("s_ended", "i_dead")]:
        await store.create(record(session_id, kind="connection", handle_hash=None,
                                  instance=owner, created=NOW))  # fmt: skip
    await store.terminate("s_ended", TerminationReason.CLOSED, NOW)  # ended: nobody's problem


ORPHAN_LINES = [
    f"instance i_dead (h2, pid 99) lease lapsed at {iso(DEAD_LEASE)}",
    "session s_lost (connection) belongs to unknown instance i_gone",
    f"session s_orphan (connection) belongs to instance i_dead whose lease lapsed at "
    f"{iso(DEAD_LEASE)}",
]


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``main`` points the root logger at (captured) stderr: put it back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("mcp_sessions")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


# -- the store method, every backend --------------------------------------------


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        await b.close_all()
        b.cleanup()


async def test_a_healthy_store_has_no_problems(backend: Backend) -> None:
    store = await backend.make()
    assert await store.check(NOW) == []
    await seed_healthy(store)
    assert await store.check(NOW) == []


async def test_orphans_and_lapsed_instances_are_the_same_lines_on_every_backend(
    backend: Backend,
) -> None:
    store = await backend.make()
    await seed_orphans(store)
    before = await store.counts(), await store.list_instances()
    assert await store.check(NOW) == ORPHAN_LINES
    # Read-only: nothing was reaped or ended.
    assert (await store.counts(), await store.list_instances()) == before
    live = await store.load("s_orphan")
    assert live is not None
    assert live.live
    # A lease counts until it ends: checked before then, i_dead was fine.
    assert await store.check(DEAD_LEASE - 1) == [
        "session s_lost (connection) belongs to unknown instance i_gone"
    ]


@pytest.fixture(params=SHARED)
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        await b.close_all()
        b.cleanup()


def spoil_client(backend: Backend, session_id: str) -> None:
    """Make a session's ``client`` column undecodable (PostgreSQL's JSONB must stay JSON)."""
    bad = "'not json'" if backend.name == "sqlite" else "'[1, 2]'::jsonb"
    backend.raw(f"UPDATE sessions SET client = {bad} WHERE id = %s", (session_id,))


async def test_undecodable_rows_are_found_across_chunks(shared: Backend) -> None:
    store = await shared.make()
    for i in range(7):
        await store.create(record(f"s_{i}", created=NOW))
    for session_id in ("s_0", "s_3", "s_4", "s_6"):  # first, chunk boundaries, last
        spoil_client(shared, session_id)
    store.check_chunk = 2  # type: ignore[attr-defined]
    problems = await store.check(NOW)
    assert [p.split(":")[0] for p in problems] == [
        "session row s_0",
        "session row s_3",
        "session row s_4",
        "session row s_6",
    ]
    assert all("undecodable (" in p and "client" in p for p in problems)


async def test_a_schema_newer_than_the_code_is_a_problem(shared: Backend) -> None:
    store = await shared.make()
    await seed_healthy(store)
    # Written by newer code after this store opened (opening would have refused it).
    shared.raw("INSERT INTO schema_version (version, applied_at) VALUES (4, 0)")
    assert await store.check(NOW) == ["schema version 4, this code expects 3"]


async def test_sqlite_integrity_check_lines_are_problems(tmp_path: Path) -> None:
    import sqlite3

    b = Backend("sqlite", tmp_path)
    store = await b.make()
    for i in range(3):
        await store.create(record(f"s_{i}", created=NOW - i))
    await b.close_all()
    # Redefine an index behind SQLite's back: its entries no longer match the rows.
    conn = sqlite3.connect(b.path, isolation_level=None)
    try:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = replace(sql, '(last_active)', '(idle_timeout)') "
            "WHERE name = 'sessions_last_active'"
        )
        conn.execute("PRAGMA writable_schema = OFF")
    finally:
        conn.close()
    store = await b.make()
    try:
        problems = await store.check(NOW)
    finally:
        await b.close_all()
    assert problems
    assert all(
        p.startswith("integrity check: ") and "sessions_last_active" in p for p in problems
    ), problems


# -- the command line ---------------------------------------------------------


@pytest.fixture(params=SHARED)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        b.cleanup()


def seed(backend: Backend, *steps: Callable[[SessionStore], Awaitable[None]]) -> None:
    """Open the backend's store, run ``steps`` on it, close it (outside any trio run)."""

    async def run() -> None:
        store = await backend.make()
        try:
            for step in steps:
                await step(store)
        finally:
            await backend.close_all()

    trio.run(run)


def test_check_a_clean_store_exits_0(db: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    seed(db, seed_healthy)
    url = url_of(db)
    assert main(["check", "--store", url]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"ok: {url} ({db.name}, schema v3): no problems"]
    assert err == ""
    assert main(["check", "--store", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "store": url,
        "backend": db.name,
        "schema_version": 3,
        "problems": [],
        "ok": True,
    }


def test_check_prints_one_line_per_problem_and_exits_1(
    db: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(db, seed_orphans)
    spoil_client(db, "s_handle")
    expected_count = 4
    if db.name == "sqlite":  # PostgreSQL's typed columns cannot hold a bad instance row
        db.raw(
            "INSERT INTO instances (id, host, pid, version, started_at, heartbeat_at, "
            "lease_until) VALUES ('i_bad', 'h3', 'not a pid', '', %s, %s, %s)",
            (NOW, NOW, NOW + HOUR),
        )
        expected_count += 1
    url = url_of(db)
    assert main(["check", "--store", url]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == expected_count, lines
    assert lines[0].startswith("session row s_handle: undecodable (")
    assert "client" in lines[0]
    if db.name == "sqlite":
        assert lines[1].startswith("instance row i_bad: undecodable (")
        assert "pid" in lines[1]
    assert lines[-3:] == ORPHAN_LINES
    # Only the summary on stderr: the codec's logging stays out of it.
    assert err.splitlines() == [f"mcp-sessions: {expected_count} problem(s) in {url}"]

    assert main(["check", "--store", url, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"] == lines
    # Checking changed nothing: the orphan is still live, the dead instance still there.
    assert db.raw("SELECT state FROM sessions WHERE id = 's_orphan'") == [("idle",)]
    assert db.raw("SELECT COUNT(*) FROM instances WHERE id = 'i_dead'") == [(1,)]


def test_status_lists_instances(db: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    seed(db, seed_orphans)
    url = url_of(db)
    assert main(["status", "--store", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_id = {i["id"]: i for i in report["instances"]}
    assert sorted(by_id) == ["i_dead", "i_live"]
    assert by_id["i_dead"] == {
        "id": "i_dead",
        "host": "h2",
        "pid": 99,
        "version": "9.9",
        "started_at": iso(NOW - 2 * HOUR),
        "heartbeat_at": iso(DEAD_LEASE - 30),
        "lease_until": iso(DEAD_LEASE),
        "lapsed": True,
    }
    assert by_id["i_live"]["lapsed"] is False
    assert main(["status", "--store", url]) == 0
    text = capsys.readouterr().out
    instances = text.split("instances:\n", 1)[1].splitlines()
    assert len(instances) == 2
    assert any(line.strip().startswith("i_dead  h2 pid 99") and "(lapsed)" in line
               for line in instances)  # fmt: skip
    assert any(line.strip().startswith("i_live  h1 pid 4242") and "(lapsed)" not in line
               for line in instances)  # fmt: skip


def test_status_without_instances_says_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Backend("sqlite", tmp_path)
    seed(db)
    assert main(["status", "--store", url_of(db)]) == 0
    assert capsys.readouterr().out.endswith("instances:\n  (none)\n")
    assert main(["status", "--store", url_of(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == []


def test_check_bad_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--store", "redis://localhost/0"]) == 2
    assert "unsupported session store" in capsys.readouterr().err


def test_check_a_missing_sqlite_file_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo" / "sessions.db"
    assert main(["check", "--store", f"sqlite:///{path}"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "no database file" in err
    assert not path.parent.exists()


def test_check_an_unreachable_store_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://nobody@127.0.0.1:9/none?store_connect_timeout=1&op_timeout=1"
    assert main(["check", "--store", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    last = err.splitlines()[-1]  # after the driver's own warnings
    assert last.startswith("mcp-sessions: store postgresql://nobody@127.0.0.1:9/none")
    assert "unavailable" in last


def test_check_a_schema_too_new_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = Backend("sqlite", tmp_path)
    seed(db)
    db.raw("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    assert main(["check", "--store", url_of(db)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "schema version 99" in err


async def test_the_command_exits_1_from_a_subprocess(tmp_path: Path) -> None:
    b = Backend("sqlite", tmp_path)
    store = await b.make()
    await seed_orphans(store)
    await b.close_all()
    with trio.fail_after(30):
        result = await trio.run_process(
            [PYTHON, "-m", "mcp_sessions", "check", "--store", url_of(b)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert result.stdout.decode().splitlines() == ORPHAN_LINES


# -- check looks, never upgrades -------------------------------------------------


def downgrade(backend: Backend, version: int) -> None:
    """Take a closed store back to what schema ``version`` (1 or 2) left, data kept (as
    test_store_contract.py::test_upgrade_from_schema_1_keeps_data does)."""
    for index in ("sessions_live_principal", "sessions_live_instance", "sessions_kind_state"):
        backend.raw(f"DROP INDEX {index}")
    backend.raw("ALTER TABLE sessions DROP COLUMN instance")
    backend.raw("DROP TABLE instances")
    backend.raw("DROP TABLE leases")
    if version < 2 and backend.name == "sqlite":
        for event in ("insert", "update", "delete"):
            backend.raw(f"DROP TRIGGER sessions_{event}_bumps_generation")
        backend.raw("DROP TABLE store_generation")
    backend.raw("DELETE FROM schema_version WHERE version > %s", (version,))


def schema_objects(backend: Backend) -> list[tuple[Any, ...]]:
    """Every table, column, index and trigger of the store's database (or schema)."""
    if backend.name == "sqlite":
        return backend.raw("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    return backend.raw(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY 1, 2"
    ) + backend.raw(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1"
    )


def pg_schema_exists(schema: str) -> bool:
    import psycopg

    assert PG_DSN is not None
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        return found.fetchone() is not None


@pytest.mark.parametrize("version", [1, 2])
def test_check_an_older_schema_reports_it_exits_1_and_upgrades_nothing(
    db: Backend, version: int, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(db, seed_healthy)
    downgrade(db, version)
    before = schema_objects(db), db.raw("SELECT * FROM schema_version ORDER BY version")
    sessions = db.raw("SELECT id, state, version FROM sessions ORDER BY id")
    url = url_of(db)
    expected = [
        f"schema version {version}, this code expects 3 (run a server or `mcp-sessions status` "
        "on this store to upgrade it)"
    ]
    assert main(["check", "--store", url]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == expected
    assert err.splitlines() == [f"mcp-sessions: 1 problem(s) in {url}"]
    assert main(["check", "--store", url, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "store": url,
        "backend": db.name,
        "schema_version": version,
        "problems": expected,
        "ok": False,
    }
    # Nothing was migrated, created or written.
    assert (schema_objects(db), db.raw("SELECT * FROM schema_version ORDER BY version")) == before
    assert db.raw("SELECT id, state, version FROM sessions ORDER BY id") == sessions
    # `status` opens the store as a server does: that upgrades it, and check is then happy.
    assert main(["status", "--store", url, "--json"]) == 0
    assert db.raw("SELECT version FROM schema_version ORDER BY version") == MIGRATED
    capsys.readouterr()
    assert main(["check", "--store", url]) == 0


def test_check_a_sqlite_file_without_the_schema_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE unrelated (x INTEGER)")
    finally:
        conn.close()
    url = f"sqlite:///{path}"
    assert main(["check", "--store", url]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["no mcp-sessions schema"]
    assert err.splitlines() == [f"mcp-sessions: 1 problem(s) in {url}"]
    assert main(["check", "--store", url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["schema_version"] == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("unrelated",)]
    finally:
        conn.close()


@pytest.mark.skipif(PG_DSN is None, reason=PG_SKIP)
def test_check_a_missing_postgresql_schema_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Backend("postgresql", tmp_path)
    try:
        url = url_of(db)
        assert main(["check", "--store", url]) == 1
        out, err = capsys.readouterr()
        assert out.splitlines() == [f"schema {db.schema} does not exist"]
        assert err.splitlines()[-1] == f"mcp-sessions: 1 problem(s) in {url}"
        assert not pg_schema_exists(db.schema)
        # An empty schema is there, but holds no store.
        db.raw(f'CREATE SCHEMA "{db.schema}"')
        assert main(["check", "--store", url]) == 1
        assert capsys.readouterr().out.splitlines() == ["no mcp-sessions schema"]
        assert db.raw("SELECT COUNT(*) FROM information_schema.tables "
                      "WHERE table_schema = current_schema()") == [(0,)]  # fmt: skip
    finally:
        db.cleanup()


async def test_a_store_opened_without_migrating_reads_and_refuses_writes(shared: Backend) -> None:
    store = await shared.make()
    await store.create(record("s", created=NOW))
    await shared.close_all()
    looker = shared.new()
    assert isinstance(looker, SQLStoreBase)
    await looker.open(migrate=False)
    try:
        assert looker.found_schema == 3
        assert looker.missing_schema is None
        got = await looker.load("s")
        assert got is not None
        assert got.id == "s"
        assert (await looker.health()).schema_version == 3
        assert await looker.check_as_found(NOW) == []
        with pytest.raises(StoreUnavailable):
            await looker.create(record("t", created=NOW))
        with pytest.raises(StoreUnavailable):
            await looker.terminate("s", TerminationReason.CLOSED, NOW)
    finally:
        await looker.aclose()
    assert shared.raw("SELECT id, state FROM sessions") == [("s", "idle")]
    # Opened as usual afterwards, it writes again (nothing sticks from the look).
    again = await shared.make()
    await again.create(record("t", created=NOW))
    assert isinstance(again, SQLStoreBase)
    assert again.found_schema is None
