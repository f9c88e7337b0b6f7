"""The one expiry rule, and the SQL that must say the same thing.

``mcp_sessions._expiry.due`` decides expiry everywhere in Python; the SQL stores
decide it with ``DUE_SQL`` / ``REASON_SQL``. The property tests below evaluate
that SQL over random rows in an in-memory SQLite database (and in PostgreSQL
when ``MCP_SESSIONS_TEST_PG_DSN`` is set) and require the same answer as the
Python rule, row by row, exact boundaries included.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mcp_sessions._expiry import DUE_SQL, REASON_SQL, due, due_params, next_deadline
from mcp_sessions._state import TerminationReason as R
from mcp_sessions._store import SessionRecord

PG_DSN = os.environ.get("MCP_SESSIONS_TEST_PG_DSN")
T0 = 1_700_000_000.0

# -- the rule ------------------------------------------------------------------


def test_not_due_before_either_deadline() -> None:
    assert due(T0 + 9, expires_at=T0 + 100, idle_since=T0, idle_timeout=10) is None


def test_lifetime_is_due_at_its_exact_deadline() -> None:
    assert (
        due(T0 + 100, expires_at=T0 + 100, idle_since=None, idle_timeout=10) is R.LIFETIME_EXCEEDED
    )
    assert due(T0 + 99.999, expires_at=T0 + 100, idle_since=None, idle_timeout=10) is None


def test_idle_is_due_at_its_exact_deadline() -> None:
    assert due(T0 + 10, expires_at=T0 + 100, idle_since=T0, idle_timeout=10) is R.IDLE_TIMEOUT
    assert due(T0 + 9.999, expires_at=T0 + 100, idle_since=T0, idle_timeout=10) is None


def test_lifetime_wins_when_both_are_due() -> None:
    assert due(T0 + 50, expires_at=T0 + 20, idle_since=T0, idle_timeout=10) is R.LIFETIME_EXCEEDED


def test_a_session_that_is_not_idle_cannot_idle_out() -> None:
    assert due(T0 + 1e6, expires_at=T0 + 2e6, idle_since=None, idle_timeout=10) is None


def test_grace_widens_only_the_idle_bound() -> None:
    kw: dict[str, Any] = {"expires_at": T0 + 100, "idle_since": T0, "idle_timeout": 40, "grace": 5}
    assert due(T0 + 44, **kw) is None
    assert due(T0 + 45, **kw) is R.IDLE_TIMEOUT
    assert due(T0 + 100, **kw | {"idle_since": T0 + 99}) is R.LIFETIME_EXCEEDED


def test_grace_is_at_most_a_quarter_of_the_idle_timeout() -> None:
    # A one-second idle timeout gets a quarter second, whatever the touch interval.
    kw: dict[str, Any] = {"expires_at": T0 + 100, "idle_since": T0, "idle_timeout": 1, "grace": 5}
    assert due(T0 + 1.24, **kw) is None
    assert due(T0 + 1.25, **kw) is R.IDLE_TIMEOUT
    assert next_deadline(**kw) == T0 + 1.25


def test_next_deadline() -> None:
    assert next_deadline(expires_at=T0 + 100, idle_since=None, idle_timeout=10) == T0 + 100
    assert next_deadline(expires_at=T0 + 100, idle_since=T0, idle_timeout=10) == T0 + 10
    assert next_deadline(expires_at=T0 + 100, idle_since=T0, idle_timeout=40, grace=5) == T0 + 45
    assert next_deadline(expires_at=T0 + 100, idle_since=T0, idle_timeout=10, grace=5) == T0 + 12.5
    assert next_deadline(expires_at=T0 + 12, idle_since=T0, idle_timeout=10, grace=5) == T0 + 12


def test_stored_record_is_idle_only_in_state_idle() -> None:
    def rec(state: str) -> SessionRecord:
        return SessionRecord(
            id="s",
            handle_hash=None,
            kind="handle",
            principal="p",
            state=state,
            created_at=T0,
            last_active=T0,
            idle_timeout=10,
            expires_at=T0 + 100,
        )

    assert rec("idle").due(T0 + 10) is R.IDLE_TIMEOUT
    assert rec("initializing").due(T0 + 10) is None
    assert rec("initializing").due(T0 + 100) is R.LIFETIME_EXCEEDED
    assert rec("terminated").due(T0 + 1000) is None


# Values on a millisecond grid, around a realistic wall clock.
millis = st.integers(min_value=0, max_value=10**9).map(lambda n: T0 + n / 1000)
spans = st.integers(min_value=1, max_value=10**7).map(lambda n: n / 1000)
graces = st.one_of(
    st.just(0.0), st.integers(min_value=0, max_value=120_000).map(lambda n: n / 1000)
)


@given(expires_at=millis, idle_since=st.none() | millis, idle_timeout=spans, data=st.data())
def test_nothing_is_due_before_next_deadline_and_it_is_due_then(
    expires_at: float, idle_since: float | None, idle_timeout: float, data: st.DataObject
) -> None:
    kw: dict[str, Any] = {
        "expires_at": expires_at,
        "idle_since": idle_since,
        "idle_timeout": idle_timeout,
    }
    deadline = next_deadline(**kw)
    assert due(deadline, **kw) is not None
    before = data.draw(st.integers(min_value=1, max_value=10**6).map(lambda n: deadline - n / 1000))
    assert due(before, **kw) is None


@settings(max_examples=1000)
@given(
    idle_since=st.integers(0, 10**6).map(lambda n: n / 1000),
    idle_timeout=st.integers(1, 10**5).map(lambda n: n / 1000),
    grace=st.integers(1, 10**4).map(lambda n: n / 1000),
)
@example(idle_since=202.024, idle_timeout=50.096, grace=4.371)
def test_with_grace_it_is_due_at_next_deadline(
    idle_since: float, idle_timeout: float, grace: float
) -> None:
    kw: dict[str, Any] = {
        "expires_at": 1e12,
        "idle_since": idle_since,
        "idle_timeout": idle_timeout,
        "grace": grace,
    }
    assert due(next_deadline(**kw), **kw) is not None


# -- the SQL says the same ------------------------------------------------------

STATES = ("idle", "initializing", "terminated")


@st.composite
def rows(draw: st.DrawFn, now: float, grace: float) -> tuple[str, float, float, float]:
    """(state, expires_at, last_active, idle_timeout), often right on a boundary."""
    state = draw(st.sampled_from(STATES))
    idle_timeout = draw(spans)
    expires_at = draw(st.one_of(millis, st.just(now)))
    last_active = draw(
        st.one_of(
            millis,
            st.just((now - grace) - idle_timeout),
            st.just(now - idle_timeout * 1.25),
        )
    )
    return state, expires_at, last_active, idle_timeout


def python_rule(row: tuple[str, float, float, float], now: float, grace: float) -> str | None:
    state, expires_at, last_active, idle_timeout = row
    if state == "terminated":
        return None  # ended: never due again
    reason = due(
        now,
        expires_at=expires_at,
        idle_since=last_active if state == "idle" else None,
        idle_timeout=idle_timeout,
        grace=grace,
    )
    return reason.value if reason is not None else None


def select_sql(param: str) -> str:
    sql = f"SELECT ({DUE_SQL}), {REASON_SQL} FROM sessions"
    return sql.replace("%s", param)


@pytest.fixture(scope="module")
def sqlite_db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def sqlite_answers(
    conn: sqlite3.Connection, table: list[tuple[str, float, float, float]], now: float, grace: float
) -> list[tuple[bool, str]]:
    conn.execute("DROP TABLE IF EXISTS sessions")
    # Column types as the stores declare them (REAL affinity).
    conn.execute(
        "CREATE TABLE sessions (state TEXT, expires_at DOUBLE PRECISION, "
        "last_active DOUBLE PRECISION, idle_timeout DOUBLE PRECISION)"
    )
    conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?)", table)
    params = (*due_params(now, grace), now)
    got = conn.execute(select_sql("?") + " ORDER BY rowid", params).fetchall()
    return [(bool(d), str(r)) for d, r in got]


def assert_same(
    table: list[tuple[str, float, float, float]],
    answers: list[tuple[bool, str]],
    now: float,
    grace: float,
) -> None:
    assert len(answers) == len(table)
    for row, (sql_due, sql_reason) in zip(table, answers, strict=True):
        expected = python_rule(row, now, grace)
        assert sql_due == (expected is not None), (row, now, grace)
        if expected is not None:
            assert sql_reason == expected, (row, now, grace)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[tuple[str, float, float, float]], float, float]:
    now = draw(millis)
    grace = draw(graces)
    table = draw(st.lists(rows(now, grace), min_size=1, max_size=20))
    return table, now, grace


@given(case=cases())
def test_sql_rule_matches_python_rule_in_sqlite(
    sqlite_db: sqlite3.Connection,
    case: tuple[list[tuple[str, float, float, float]], float, float],
) -> None:
    table, now, grace = case
    assert_same(table, sqlite_answers(sqlite_db, table, now, grace), now, grace)


@given(case=cases())
def test_stored_records_due_matches_the_sql(
    sqlite_db: sqlite3.Connection,
    case: tuple[list[tuple[str, float, float, float]], float, float],
) -> None:
    table, now, _ = case  # records take no grace
    answers = sqlite_answers(sqlite_db, table, now, 0.0)
    for (state, expires_at, last_active, idle_timeout), (sql_due, sql_reason) in zip(
        table, answers, strict=True
    ):
        record = SessionRecord(
            id="s",
            handle_hash=None,
            kind="handle",
            principal="p",
            state=state,
            created_at=T0,
            last_active=last_active,
            idle_timeout=idle_timeout,
            expires_at=expires_at,
        )
        reason = record.due(now)
        assert sql_due == (reason is not None)
        if reason is not None:
            assert sql_reason == reason.value


# Exact boundaries (values exact in binary floating point): due, by both.
BOUNDARIES = [
    # (row, now, grace, expected reason)
    (("idle", T0 + 100, T0, 10.0), T0 + 10, 0.0, "idle_timeout"),
    (("idle", T0 + 100, T0, 10.0), T0 + 9.5, 0.0, None),
    (("idle", T0 + 100, T0, 40.0), T0 + 45.25, 5.25, "idle_timeout"),
    (("idle", T0 + 100, T0, 40.0), T0 + 45, 5.25, None),
    (("idle", T0 + 100, T0, 10.0), T0 + 12.5, 5.25, "idle_timeout"),
    (("idle", T0 + 100, T0, 10.0), T0 + 12.25, 5.25, None),
    (("idle", T0 + 100, T0, 10.0), T0 + 100, 0.0, "lifetime_exceeded"),
    (("idle", T0 + 100, T0, 10.0), T0 + 99.875, 0.0, "idle_timeout"),
    (("initializing", T0 + 100, T0, 10.0), T0 + 99.875, 0.0, None),
    (("initializing", T0 + 100, T0, 10.0), T0 + 100, 0.0, "lifetime_exceeded"),
    (("terminated", T0 + 100, T0, 10.0), T0 + 1000, 0.0, None),
]


@pytest.mark.parametrize(("row", "now", "grace", "expected"), BOUNDARIES)
def test_exact_boundaries(
    sqlite_db: sqlite3.Connection,
    row: tuple[str, float, float, float],
    now: float,
    grace: float,
    expected: str | None,
) -> None:
    assert python_rule(row, now, grace) == expected
    assert_same([row], sqlite_answers(sqlite_db, [row], now, grace), now, grace)


# -- and in PostgreSQL ------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    if PG_DSN is None:
        pytest.skip("set MCP_SESSIONS_TEST_PG_DSN to pin the expiry SQL in PostgreSQL too")
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        yield conn


def pg_answers(
    conn: Any, table: list[tuple[str, float, float, float]], now: float, grace: float
) -> list[tuple[bool, str]]:
    values = ", ".join(["(%s::int, %s::text, %s::float8, %s::float8, %s::float8)"] * len(table))
    flat = [v for i, row in enumerate(table) for v in (i, *row)]
    sql = (
        select_sql("%s").replace(
            "FROM sessions",
            f"FROM (VALUES {values}) AS sessions(n, state, expires_at, last_active, idle_timeout)",
        )
        + " ORDER BY n"
    )
    # Placeholders in order: the rule's, the reason's (now), then the rows'.
    got = conn.execute(sql, [*due_params(now, grace), now, *flat]).fetchall()
    return [(bool(d), str(r)) for d, r in got]


@settings(deadline=None)
@given(case=cases())
def test_sql_rule_matches_python_rule_in_postgresql(
    pg: Any, case: tuple[list[tuple[str, float, float, float]], float, float]
) -> None:
    table, now, grace = case
    assert_same(table, pg_answers(pg, table, now, grace), now, grace)


@pytest.mark.parametrize(("row", "now", "grace", "expected"), BOUNDARIES)
def test_exact_boundaries_in_postgresql(
    pg: Any, row: tuple[str, float, float, float], now: float, grace: float, expected: str | None
) -> None:
    assert python_rule(row, now, grace) == expected
    assert_same([row], pg_answers(pg, [row], now, grace), now, grace)
