"""Unit tests of the session runtime, on trio's MockClock (no real sleeps)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from mcp_sessions import (
    ClientInfo,
    Hooks,
    InvalidTransition,
    LimitExceeded,
    LimitPolicy,
    Session,
    SessionClosed,
    SessionExpired,
    SessionKind,
    SessionNotFound,
    SessionSetupFailed,
    SessionState,
    Settings,
    SettingsError,
    ShuttingDown,
    Supervisor,
    TerminationReason,
    TransitionEvent,
    VersionConflict,
    hash_handle,
    open_supervisor,
)

S = SessionState
R = TerminationReason


@pytest.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with open_supervisor(Settings(idle_timeout=60, cleanup_interval=1)) as supervisor:
        yield supervisor


class Gate:
    """A request held open until released: ``await gate.enter(sup, session)`` in a task."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.outcome: BaseException | str | None = None

    async def hold(self, sup: Supervisor, session: Session) -> None:
        try:
            async with sup.request(session):
                self.entered.set()
                await self.release.wait()
            self.outcome = "ok"
        except Exception as exc:
            self.outcome = exc


async def start_request(nursery: trio.Nursery, sup: Supervisor, session: Session) -> Gate:
    gate = Gate()
    nursery.start_soon(gate.hold, sup, session)
    await gate.entered.wait()
    return gate


# -- lifecycle -----------------------------------------------------------------


async def test_handle_session_is_idle_after_creation(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, handle = await sup.open_handle_session(principal="alice")
    assert session.state is S.IDLE
    assert session.kind is SessionKind.HANDLE
    assert session.handle_hash == hash_handle(handle)
    assert len(handle) >= 22  # >= 128 bits, URL-safe base64
    assert all(c.isalnum() or c in "-_" for c in handle)
    assert handle not in repr(session)
    assert handle not in repr(session.snapshot())
    assert await sup.resolve_handle(handle, "alice") is session


async def test_requests_hold_session_active_until_the_last_finishes(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    async with trio.open_nursery() as nursery:
        first = await start_request(nursery, sup, session)
        second = await start_request(nursery, sup, session)
        assert session.state is S.ACTIVE
        assert session.in_flight == 2
        first.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert session.state is S.ACTIVE
        second.release.set()
    assert session.state is S.IDLE
    assert (first.outcome, second.outcome) == ("ok", "ok")
    assert session.snapshot().requests == 2


async def test_request_error_is_counted_and_propagates(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    with pytest.raises(KeyError):
        async with sup.request(session):
            raise KeyError("boom")
    assert session.state is S.IDLE
    assert (session.requests, session.errors) == (1, 1)
    stats = sup.statistics()
    assert (stats.requests, stats.request_errors) == (1, 1)
    assert stats.request_duration.count == 1


async def test_connection_session_waits_for_ready(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session = await sup.create_session(
        kind=SessionKind.CONNECTION,
        principal="alice",
        client=ClientInfo(name="c", version="1", protocol_version="2025-06-18"),
        ready=False,
    )
    assert session.state is S.INITIALIZING
    async with trio.open_nursery() as nursery:
        gate = await start_request(nursery, sup, session)  # the in-flight `initialize`
        assert session.state is S.INITIALIZING
        sup.mark_ready(session)
        assert session.state is S.ACTIVE
        gate.release.set()
    assert session.state is S.IDLE
    assert session.client.protocol_version == "2025-06-18"


async def test_connection_session_ready_without_requests_is_idle(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session = await sup.create_session(kind=SessionKind.CONNECTION, principal="a", ready=False)
    sup.mark_ready(session)
    assert session.state is S.IDLE
    with pytest.raises(InvalidTransition):
        sup.mark_ready(session)
    assert session.state is S.IDLE


async def test_disconnect_ends_an_initializing_session(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session = await sup.create_session(kind=SessionKind.CONNECTION, principal="a", ready=False)
    await sup.close(session, R.DISCONNECTED)
    assert (session.state, session.reason) == (S.TERMINATED, R.DISCONNECTED)
    with pytest.raises(SessionClosed):
        sup.mark_ready(session)


# -- expiry --------------------------------------------------------------------


async def test_idle_session_expires_after_timeout(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, handle = await sup.open_handle_session(principal="alice")
    await trio.sleep(59.5)
    assert session.state is S.IDLE
    await trio.sleep(0.5 + sup.settings.cleanup_interval)  # within one scan interval
    assert (session.state, session.reason) == (S.TERMINATED, R.IDLE_TIMEOUT)
    with pytest.raises(SessionExpired) as info:
        await sup.resolve_handle(handle, "alice")
    assert info.value.code == "session_expired"
    assert sup.statistics().expired == 1


async def test_idle_clock_restarts_after_each_request(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    for _ in range(5):
        await trio.sleep(50)
        async with sup.request(session):
            pass
    assert trio.current_time() > 240  # well past one idle timeout in total
    assert session.state is S.IDLE
    await trio.sleep(62)
    assert session.reason is R.IDLE_TIMEOUT


async def test_busy_session_never_idles_out(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    async with trio.open_nursery() as nursery:
        gate = await start_request(nursery, sup, session)
        await trio.sleep(600)
        assert session.state is S.ACTIVE
        gate.release.set()
    assert gate.outcome == "ok"


async def test_per_session_idle_timeout_overrides_the_default(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice", idle_timeout=5)
    await trio.sleep(7)
    assert session.reason is R.IDLE_TIMEOUT


async def test_lifetime_is_absolute_even_while_busy(autojump_clock: trio.testing.MockClock) -> None:
    settings = Settings(idle_timeout=60, max_lifetime=100, cleanup_interval=1)
    async with open_supervisor(settings) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        async with trio.open_nursery() as nursery:
            gate = await start_request(nursery, sup, session)
            await trio.sleep(102)
        assert (session.state, session.reason) == (S.TERMINATED, R.LIFETIME_EXCEEDED)
        assert isinstance(gate.outcome, SessionExpired)


async def test_tombstone_is_forgotten_after_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(tombstone_retention=100, cleanup_interval=1)
    async with open_supervisor(settings) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        await sup.close(session)
        with pytest.raises(SessionClosed):
            sup.get(session.id)
        assert sup.tombstone(session.id) is not None
        await trio.sleep(102)
        with pytest.raises(SessionNotFound):
            sup.get(session.id)
        with pytest.raises(SessionNotFound):
            await sup.resolve_handle(handle, "alice")


async def test_scan_tick_only_touches_due_entries(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    sessions = [(await sup.open_handle_session(principal=f"p{i}"))[0] for i in range(50)]
    for s in sessions[:10]:
        async with sup.request(s):
            pass
    assert sup.scan_once() == 0
    # one heap entry per session, however many requests it saw
    assert sup.scheduled_deadlines == 50


# -- handles and principals ----------------------------------------------------


async def test_foreign_and_unknown_handles_look_the_same(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    _, handle = await sup.open_handle_session(principal="alice")
    errors = []
    for attempt, principal in [(handle, "mallory"), ("no-such-handle", "alice"), ("", "alice")]:
        with pytest.raises(SessionNotFound) as info:
            await sup.resolve_handle(attempt, principal)
        errors.append((type(info.value), str(info.value), info.value.code))
    assert len(set(errors)) == 1
    await sup.close(await sup.resolve_handle(handle, "alice"))
    # and a closed session of someone else is still just "not found"
    with pytest.raises(SessionNotFound):
        await sup.resolve_handle(handle, "mallory")
    assert sup.statistics().handle_validations == {"ok": 1, "not_found": 4}


async def test_sessions_lists_one_principal(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    a1, _ = await sup.open_handle_session(principal="alice")
    a2, _ = await sup.open_handle_session(principal="alice")
    await sup.open_handle_session(principal="bob")
    assert [s.id for s in sup.sessions("alice")] == [a1.id, a2.id]
    assert len(sup.sessions()) == 3


# -- close and cancellation ----------------------------------------------------


async def test_close_cancels_requests_and_background_work(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    background_cancelled = trio.Event()

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            background_cancelled.set()

    session.start_soon(forever)
    async with trio.open_nursery() as nursery:
        gate = await start_request(nursery, sup, session)
        assert session.snapshot().background_tasks == 1
        await sup.close(session)
    assert background_cancelled.is_set()
    assert isinstance(gate.outcome, SessionClosed)
    assert gate.outcome.reason is R.CLOSED
    assert (session.state, session.reason) == (S.TERMINATED, R.CLOSED)
    assert session.snapshot().background_tasks == 0
    with pytest.raises(SessionClosed):
        async with sup.request(session):
            pass  # pragma: no cover
    with pytest.raises(SessionClosed):
        session.start_soon(forever)


async def test_request_closing_its_own_session_is_not_cancelled(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    async with sup.request(session):
        await sup.close(session)
        assert session.state is S.TERMINATED
        await trio.sleep(1)  # still running: not cancelled
    assert session.reason is R.CLOSED


async def test_close_is_idempotent_and_keeps_the_first_reason(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    assert sup.terminate(session, R.EVICTED) is True
    assert sup.terminate(session, R.CLOSED) is False
    await sup.close(session, R.ERROR)
    assert session.reason is R.EVICTED


async def test_state_document_merge_patch_and_versions(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    session, _ = await sup.open_handle_session(principal="alice")
    assert (session.state_document(), session.version) == ({}, 0)
    assert await session.patch_state({"a": 1, "b": {"c": 2, "d": 3}}) == 1
    assert await session.patch_state({"b": {"c": None}, "e": [1]}, if_version=1) == 2
    assert session.state_document() == {"a": 1, "b": {"d": 3}, "e": [1]}
    with pytest.raises(VersionConflict) as info:
        await session.patch_state({"a": 2}, if_version=1)
    assert (info.value.expected, info.value.current, info.value.code) == (1, 2, "version_conflict")
    assert session.state_document()["a"] == 1
    document = session.state_document()
    document["a"] = 99  # a copy: the session is unchanged
    assert session.state_document()["a"] == 1
    await sup.close(session)
    with pytest.raises(SessionClosed):
        await session.patch_state({"a": 3})


# -- limits ----------------------------------------------------------------------


async def test_global_limit_rejects_with_a_clear_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor(Settings(max_sessions=2)) as sup:
        await sup.open_handle_session(principal="a")
        await sup.open_handle_session(principal="b")
        with pytest.raises(LimitExceeded) as info:
            await sup.open_handle_session(principal="c")
        assert info.value.code == "limit_exceeded"
        assert "global" in str(info.value)
        assert "2 live sessions" in str(info.value)
        assert sup.live_count == 2


async def test_per_principal_limit_rejects_only_that_principal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor(Settings(max_sessions_per_principal=1)) as sup:
        await sup.open_handle_session(principal="alice")
        with pytest.raises(LimitExceeded) as info:
            await sup.open_handle_session(principal="alice")
        assert "'alice'" in str(info.value)
        await sup.open_handle_session(principal="bob")
        assert sup.live_count == 2


async def test_eviction_policy_evicts_the_longest_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(max_sessions=3, limit_policy=LimitPolicy.EVICT_IDLE)
    async with open_supervisor(settings) as sup:
        oldest, _ = await sup.open_handle_session(principal="a")
        await trio.sleep(1)
        middle, _ = await sup.open_handle_session(principal="b")
        await trio.sleep(1)
        newest, _ = await sup.open_handle_session(principal="c")
        await trio.sleep(1)
        async with sup.request(oldest):  # now the oldest is the most recently idle
            pass
        fresh, _ = await sup.open_handle_session(principal="d")
        assert (middle.state, middle.reason) == (S.TERMINATED, R.EVICTED)
        assert {s.id for s in sup.sessions()} == {oldest.id, newest.id, fresh.id}


async def test_eviction_never_takes_a_busy_session(autojump_clock: trio.testing.MockClock) -> None:
    settings = Settings(max_sessions_per_principal=1, limit_policy=LimitPolicy.EVICT_IDLE)
    async with open_supervisor(settings) as sup:
        busy, _ = await sup.open_handle_session(principal="a")
        async with trio.open_nursery() as nursery:
            gate = await start_request(nursery, sup, busy)
            with pytest.raises(LimitExceeded) as info:
                await sup.open_handle_session(principal="a")
            assert "no session in that scope is idle" in str(info.value)
            gate.release.set()
        assert busy.state is S.IDLE


# -- hooks -----------------------------------------------------------------------


async def test_setup_hook_runs_while_initializing(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[SessionState] = []

    async def setup(session: Session) -> None:
        seen.append(session.state)
        await session.patch_state({"ready": True})

    async with open_supervisor(hooks=Hooks(setup=setup)) as sup:
        session, _ = await sup.open_handle_session(principal="a")
        assert seen == [S.INITIALIZING]
        assert session.state is S.IDLE
        assert session.state_document() == {"ready": True}


@pytest.mark.parametrize("failure", ["raise", "hang"])
async def test_setup_failure_or_timeout_ends_the_session_with_error(
    autojump_clock: trio.testing.MockClock, failure: str
) -> None:
    async def setup(session: Session) -> None:
        if session.principal != "a":
            return
        if failure == "raise":
            raise RuntimeError("no database")
        await trio.sleep_forever()

    torn_down: list[R] = []

    async def teardown(session: Session, reason: R) -> None:
        torn_down.append(reason)

    settings = Settings(setup_timeout=5)
    async with open_supervisor(settings, hooks=Hooks(setup=setup, teardown=teardown)) as sup:
        start = trio.current_time()
        with pytest.raises(SessionSetupFailed) as info:
            await sup.open_handle_session(principal="a")
        assert "error" in str(info.value)
        if failure == "hang":
            assert trio.current_time() - start == pytest.approx(5)
        assert sup.live_count == 0
        assert sup.statistics().hook_errors == {"setup": 1}
        assert sup.statistics().terminated == {("handle", "error"): 1}
        other, _ = await sup.open_handle_session(principal="b")  # the runtime carries on
        assert other.state is S.IDLE
    assert torn_down == [R.ERROR, R.SHUTDOWN]


async def test_teardown_runs_once_shielded_and_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[str, R]] = []

    async def teardown(session: Session, reason: R) -> None:
        calls.append((session.id, reason))
        await trio.sleep(3)  # survives the cancellation that ended the session
        calls.append((session.id, reason))
        if reason is R.EVICTED:
            await trio.sleep_forever()

    settings = Settings(teardown_timeout=10)
    async with open_supervisor(settings, hooks=Hooks(teardown=teardown)) as sup:
        a, _ = await sup.open_handle_session(principal="a")
        b, _ = await sup.open_handle_session(principal="b")
        await sup.close(a)
        await sup.close(a)
        start = trio.current_time()
        await sup.close(b, R.EVICTED)
        assert trio.current_time() - start == pytest.approx(10)
        assert b.state is S.TERMINATED
    assert calls == [(a.id, R.CLOSED)] * 2 + [(b.id, R.EVICTED)] * 2
    assert sup.statistics().hook_errors == {"teardown": 1}


async def test_failing_teardown_is_counted_and_session_still_terminates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def teardown(session: Session, reason: R) -> None:
        raise RuntimeError("flush failed")

    async with open_supervisor(hooks=Hooks(teardown=teardown)) as sup:
        session, _ = await sup.open_handle_session(principal="a")
        await sup.close(session)
        assert session.state is S.TERMINATED
        assert sup.live_count == 0
        assert sup.statistics().hook_errors == {"teardown": 1}


async def test_observers_see_every_transition_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[TransitionEvent] = []

    async def observer(event: TransitionEvent) -> None:
        events.append(event)

    async with open_supervisor(hooks=Hooks(observers=[observer])) as sup:
        session, _ = await sup.open_handle_session(principal="a")
        async with sup.request(session):
            pass
        await sup.close(session)
    trail = [(e.previous, e.state) for e in events if e.session_id == session.id]
    assert trail == [
        (None, S.INITIALIZING),
        (S.INITIALIZING, S.IDLE),
        (S.IDLE, S.ACTIVE),
        (S.ACTIVE, S.IDLE),
        (S.IDLE, S.TERMINATING),
        (S.TERMINATING, S.TERMINATED),
    ]
    assert events[-1].reason is R.CLOSED


async def test_slow_or_failing_observer_never_blocks_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(event: TransitionEvent) -> None:
        await trio.sleep(1000)

    async def failing(event: TransitionEvent) -> None:
        raise ValueError("observer bug")

    settings = Settings(observer_queue_size=2, teardown_timeout=5)
    hooks = Hooks(observers=[failing, slow])
    async with open_supervisor(settings, hooks=hooks) as sup:
        session, _ = await sup.open_handle_session(principal="a")
        start = trio.current_time()
        for _ in range(20):
            async with sup.request(session):
                pass
        assert trio.current_time() == start  # no request waited on an observer
        stats = sup.statistics()
        assert stats.observer_dropped > 0
        assert stats.hook_errors["observer"] >= 1
        assert session.state is S.IDLE


# -- failure isolation -------------------------------------------------------------


async def test_background_crash_ends_only_its_own_session(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    victim, _ = await sup.open_handle_session(principal="a")
    bystander, _ = await sup.open_handle_session(principal="b")
    sibling_cancelled = trio.Event()

    async def sibling() -> None:
        try:
            await trio.sleep_forever()
        finally:
            sibling_cancelled.set()

    async def crash() -> None:
        await trio.sleep(1)
        raise ZeroDivisionError("bug in background job")

    victim.start_soon(sibling)
    victim.start_soon(crash)
    bystander.start_soon(sibling)
    await trio.sleep(2)
    assert (victim.state, victim.reason) == (S.TERMINATED, R.ERROR)
    assert sibling_cancelled.is_set()
    assert bystander.state is S.IDLE
    assert bystander.snapshot().background_tasks == 1
    assert sup.statistics().background_errors == 1
    fresh, _ = await sup.open_handle_session(principal="c")  # the supervisor carries on
    assert fresh.state is S.IDLE


async def test_block_exception_is_not_wrapped_in_a_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def body() -> None:
        async with open_supervisor() as sup:
            await sup.open_handle_session(principal="a")
            raise KeyError("user bug")

    with pytest.raises(KeyError):
        await body()


# -- shutdown ----------------------------------------------------------------------


async def test_shutdown_lets_requests_finish_within_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    torn_down: list[R] = []

    async def teardown(session: Session, reason: R) -> None:
        torn_down.append(reason)

    settings = Settings(shutdown_grace=10)
    outcomes: dict[str, Any] = {}
    async with open_supervisor(settings, hooks=Hooks(teardown=teardown)) as sup:
        quick, _ = await sup.open_handle_session(principal="a")
        slow, _ = await sup.open_handle_session(principal="b")
        idle, _ = await sup.open_handle_session(principal="c")

        async def work(name: str, session: Session, seconds: float) -> None:
            try:
                async with sup.request(session):
                    await trio.sleep(seconds)
                outcomes[name] = "done"
            except Exception as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, "quick", quick, 3)
            nursery.start_soon(work, "slow", slow, 60)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            nursery.start_soon(sup.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ShuttingDown):
                await sup.open_handle_session(principal="d")
            with pytest.raises(ShuttingDown):
                async with sup.request(idle):
                    pass  # pragma: no cover
        assert trio.current_time() - start == pytest.approx(10)
    assert outcomes["quick"] == "done"
    assert isinstance(outcomes["slow"], SessionClosed)
    assert outcomes["slow"].reason is R.SHUTDOWN
    assert torn_down == [R.SHUTDOWN] * 3
    assert {s.reason for s in (quick, slow, idle)} == {R.SHUTDOWN}
    stats = sup.statistics()
    assert stats.live == 0
    assert stats.terminated_total == stats.created_total == 3


async def test_shutdown_returns_at_once_when_nothing_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor(Settings(shutdown_grace=30)) as sup:
        await sup.open_handle_session(principal="a")
        start = trio.current_time()
    assert trio.current_time() == start


async def test_cancelling_the_supervisor_still_tears_down_every_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    torn_down: list[str] = []

    async def teardown(session: Session, reason: R) -> None:
        await trio.sleep(1)
        torn_down.append(f"{session.id}:{reason.value}")

    sup = Supervisor(hooks=Hooks(teardown=teardown))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ids = [(await sup.open_handle_session(principal="a"))[0].id for _ in range(3)]
        nursery.cancel_scope.cancel()
    assert sorted(torn_down) == sorted(f"{i}:shutdown" for i in ids)
    assert sup.live_count == 0


# -- metrics -----------------------------------------------------------------------


async def test_metrics_add_up_and_render_as_prometheus(
    autojump_clock: trio.testing.MockClock, sup: Supervisor
) -> None:
    a, _ = await sup.open_handle_session(principal="a")
    b, _ = await sup.open_handle_session(principal="b")
    c = await sup.create_session(kind=SessionKind.CONNECTION, principal="c", ready=False)
    async with sup.request(a):
        pass
    await sup.close(b)
    await trio.sleep(70)  # a idles out; c (INITIALIZING) does not
    stats = sup.statistics()
    assert stats.created == {"handle": 2, "connection": 1}
    assert stats.terminated == {("handle", "closed"): 1, ("handle", "idle_timeout"): 1}
    assert stats.created_total == stats.live + stats.terminated_total
    assert stats.live_by_state[S.INITIALIZING] == 1 == stats.live
    assert stats.cleanup_runs >= 69  # one tick a second
    text = sup.render_prometheus()
    for line in [
        'mcp_sessions_live{state="initializing"} 1.0',
        'mcp_sessions_created_total{kind="handle"} 2.0',
        'mcp_sessions_terminated_total{kind="handle",reason="idle_timeout"} 1.0',
        "mcp_session_requests_total 1.0",
        "mcp_session_request_duration_seconds_count 1.0",
        'mcp_session_request_duration_seconds_bucket{le="+Inf"} 1.0',
        "mcp_cleanup_runs_total",
        "mcp_cleanup_errors_total 0.0",
        "mcp_hook_errors_total",
    ]:
        assert line in text
    assert c.state is S.INITIALIZING
    with pytest.raises(AttributeError):
        stats.requests = 5  # type: ignore[misc]


# -- float edges of the tick grid (found in review) ------------------------------------


async def test_deadline_a_rounding_error_past_a_tick_does_not_hang_the_scan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(cleanup_interval=0.1, idle_timeout=0.3)
    async with open_supervisor(settings) as sup:
        session = await sup.create_session(principal="a")
        async with sup.request(session):
            await trio.sleep_until(6 * 0.1)  # 0.6000000000000001: idle deadline 1 ulp past 0.9
        with trio.fail_after(5):
            await trio.sleep(1)
        assert session.reason is R.IDLE_TIMEOUT


async def test_scanner_ticks_move_forward_on_an_awkward_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor(Settings(cleanup_interval=0.7)) as sup:
        await trio.sleep(5)  # fl(3 * 0.7) == 2.0999999999999996 once made the next tick "now"
        assert 6 <= sup.statistics().cleanup_runs <= 8


async def test_session_ended_during_setup_is_reported_not_a_runtime_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started: list[Session] = []

    async def setup(session: Session) -> None:
        started.append(session)
        await trio.sleep(5)

    async with open_supervisor(hooks=Hooks(setup=setup)) as sup:

        async def close_it_soon() -> None:
            await trio.sleep(1)
            sup.terminate(started[0], R.CLOSED)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_it_soon)
            with pytest.raises(SessionClosed):
                await sup.create_session(principal="a")
        assert sup.live_count == 0


# -- regressions of runtime v2 -----------------------------------------------------------


async def test_many_tasks_may_wait_for_one_session_to_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def teardown(session: Session, reason: TerminationReason) -> None:
        await trio.sleep(1)

    async with open_supervisor(hooks=Hooks(teardown=teardown)) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        done: list[int] = []

        async def close(i: int) -> None:
            await sup.close(session)
            done.append(i)

        async def wait(i: int) -> None:
            await sup.wait_terminated(session)
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(close, i)
                nursery.start_soon(wait, 10 + i)
        assert sorted(done) == [0, 1, 2, 10, 11, 12]
        assert session.state is SessionState.TERMINATED


async def test_many_tasks_may_wait_for_one_session_to_be_ready(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor() as sup:
        session = await sup.create_session(
            kind=SessionKind.CONNECTION, principal="alice", ready=False
        )
        entered: list[int] = []

        async def use(i: int) -> None:
            async with sup.request(session):
                entered.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(use, i)
            await trio.sleep(1)
            sup.mark_ready(session)
        assert sorted(entered) == [0, 1, 2]


async def test_a_closed_session_is_released_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nothing in the runtime keeps an ended session (or its document) alive."""
    settings = Settings(idle_timeout=3e7, max_lifetime=3e7)
    async with open_supervisor(settings) as sup:
        refs = []
        for _ in range(20):
            session, _ = await sup.open_handle_session(principal="alice")
            await session.patch_state({"blob": "x" * 100_000})
            await sup.close(session)
            refs.append(weakref.ref(session))
            del session
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        sup.check_invariants()


async def test_stale_deadline_entries_stay_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(idle_timeout=5, max_sessions=10_000, max_sessions_per_principal=10_000)
    async with open_supervisor(settings) as sup:
        for _ in range(3000):
            session, _ = await sup.open_handle_session(principal="alice")
            await sup.close(session)
        assert sup.live_count == 0
        assert sup.scheduled_deadlines <= 1024


async def test_background_work_asked_for_just_before_the_end_never_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[str] = []

    async def job() -> None:
        ran.append("job")

    async with open_supervisor() as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        session.start_soon(job)
        assert session.snapshot().background_tasks == 1
        sup.terminate(session, TerminationReason.CLOSED)  # same tick: the job never started
        await sup.wait_terminated(session)
        assert ran == []
        assert session.snapshot().background_tasks == 0
        sup.check_invariants()


async def test_setup_may_start_background_work_and_wait_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def setup(session: Session) -> None:
        ready = trio.Event()

        async def connect() -> None:
            await trio.sleep(1)
            ready.set()
            await trio.sleep_forever()

        session.start_soon(connect)
        await ready.wait()  # the job runs while setup waits on it

    async with open_supervisor(hooks=Hooks(setup=setup)) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        assert session.state is SessionState.IDLE
        assert session.snapshot().background_tasks == 1
        await sup.close(session)
        assert session.snapshot().background_tasks == 0


async def test_background_work_started_later_runs_and_is_cancelled_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[str] = []

    async def job(tag: str) -> None:
        try:
            events.append(f"start {tag}")
            await trio.sleep_forever()
        finally:
            events.append(f"stop {tag}")

    async with open_supervisor() as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        await trio.sleep(5)
        async with sup.request(session):
            session.start_soon(job, "a")
            session.start_soon(job, "b")
        await trio.sleep(1)
        session.start_soon(job, "c")  # the nursery is open now
        await trio.sleep(1)
        assert sorted(events) == ["start a", "start b", "start c"]
        await sup.close(session)
        assert sorted(events[3:]) == ["stop a", "stop b", "stop c"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_lifetime", float("inf")),
        ("max_lifetime", 1e308),
        ("idle_timeout", float("nan")),
        ("idle_timeout", 0),
        ("cleanup_interval", 7200),
        ("max_sessions", 0),
        ("max_state_bytes", 2**40),
    ],
)
def test_settings_have_finite_ranges(key: str, value: float) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_mapping({key: value})
    assert key in str(info.value)
    assert "must be in" in str(info.value)
