"""Many processes on one store, in process: limits, leases, one clock, idle precision, caps.

Two supervisors sharing one store stand for two processes (as in
``test_runtime_store.py``); trio's ``MockClock`` drives time and an injected
wall clock follows it, or steps when a test says so. The same behaviours with
real processes are in ``test_many_processes.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from mcp_sessions import (
    Hooks,
    InstanceRecord,
    LimitExceeded,
    LimitPolicy,
    MetadataTooLarge,
    Session,
    SessionClosed,
    SessionKind,
    SessionState,
    Settings,
    ShuttingDown,
    StateTooLarge,
    Supervisor,
    TerminationReason,
    open_supervisor,
)
from mcp_sessions._store import MemoryStore, SessionRecord, StoreUnavailable

from .test_runtime_store import DurableMemoryStore, stored

S = SessionState
R = TerminationReason
EPOCH = 1_700_000_000.0

SETTINGS = Settings(
    idle_timeout=60,
    cleanup_interval=1,
    touch_interval=5,
    sweep_interval=30,
    max_lifetime=36_000,
    instance_lease=16,
)


class SteppingWall:
    """A wall clock that follows trio's clock until a test steps it."""

    def __init__(self) -> None:
        self.offset = EPOCH

    def __call__(self) -> float:
        return self.offset + trio.current_time()

    def step(self, seconds: float) -> None:
        self.offset += seconds


@asynccontextmanager
async def process(
    store: MemoryStore,
    settings: Settings = SETTINGS,
    wall: SteppingWall | None = None,
) -> AsyncIterator[Supervisor]:
    async with open_supervisor(settings, store=store, wall_clock=wall or SteppingWall()) as sup:
        yield sup


# -- limits -------------------------------------------------------------------------


async def test_per_principal_limit_holds_across_processes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_sessions_per_principal": 3})
    async with process(store, settings) as a, process(store, settings) as b:
        await a.open_handle_session(principal="alice")
        await b.open_handle_session(principal="alice")
        await a.open_handle_session(principal="alice")
        for sup in (a, b):  # each holds fewer than 3 here; the store counts 3
            with pytest.raises(LimitExceeded) as info:
                await sup.open_handle_session(principal="alice")
            assert (info.value.limit, info.value.scope) == (3, "principal 'alice'")
        assert len(await store.list_by_principal("alice")) == 3
        await b.open_handle_session(principal="bob")  # another principal has room


async def test_global_limit_holds_across_processes(autojump_clock: trio.testing.MockClock) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_sessions": 2})
    async with process(store, settings) as a, process(store, settings) as b:
        await a.open_handle_session(principal="alice")
        await b.open_handle_session(principal="bob")
        with pytest.raises(LimitExceeded) as info:
            await a.open_handle_session(principal="carol")
        assert info.value.scope == "global"


async def test_a_refused_open_leaves_no_live_record(autojump_clock: trio.testing.MockClock) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_sessions_per_principal": 1})
    async with process(store, settings) as a, process(store, settings) as b:
        await a.open_handle_session(principal="alice")
        with pytest.raises(LimitExceeded):
            await b.open_handle_session(principal="alice")
        assert b.live_count == 0
        assert b.statistics().terminated.get(("handle", "error"), 0) == 0


async def test_bringing_in_an_open_session_is_never_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping(
        {**SETTINGS.to_mapping(), "max_sessions_per_principal": 2, "max_sessions": 2}
    )
    async with process(store, settings) as a, process(store, settings) as b:
        _, first = await a.open_handle_session(principal="alice")
        _, second = await b.open_handle_session(principal="alice")
        # b holds one of alice's two; bringing in the other is using it, not opening one.
        session = await b.resolve_handle(first, "alice")
        assert session.live
        assert b.live_count == 2
        assert (await a.resolve_handle(second, "alice")).live


async def test_evict_idle_takes_the_longest_idle_session_of_any_process(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping(
        {
            **SETTINGS.to_mapping(),
            "max_sessions_per_principal": 2,
            "limit_policy": LimitPolicy.EVICT_IDLE.value,
        }
    )
    async with process(store, settings) as a, process(store, settings) as b:
        oldest, oldest_handle = await a.open_handle_session(principal="alice")
        await trio.sleep(20)
        await b.open_handle_session(principal="alice")
        await trio.sleep(20)
        newest = await b.open_handle_session(principal="alice")  # evicts a's, in the store
        assert newest[0].live
        record = await stored(store, oldest.id)
        assert (record.state, record.reason) == ("terminated", "evicted")
        with pytest.raises(SessionClosed):  # a hears of it on the next use
            await a.resolve_handle(oldest_handle, "alice")
        assert (oldest.state, oldest.reason) in {
            (S.TERMINATED, R.EVICTED),
            (S.TERMINATING, R.EVICTED),
        }


# -- instances ------------------------------------------------------------------------


async def test_each_process_registers_an_instance_and_removes_it_on_a_clean_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a:
        async with process(store):
            assert len(await store.list_instances()) == 2
            await trio.sleep(SETTINGS.instance_lease * 3)  # renewed all along
            assert len(await store.list_instances()) == 2
            conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
            record = await stored(store, conn.id)
            (mine,) = [i for i in await store.list_instances() if i.id == record.instance]
            assert mine.lease_until > EPOCH + trio.current_time()
            handle_session, _ = await a.open_handle_session(principal="p")
            assert (await stored(store, handle_session.id)).instance is None
        assert len(await store.list_instances()) == 1
    assert await store.list_instances() == []


async def test_connection_sessions_of_a_dead_instance_end_within_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    lease = SETTINGS.instance_lease
    async with process(store) as b:
        # A process that registered, renewed at t0, opened sessions, and was killed -9.
        t0 = EPOCH + trio.current_time()
        await store.register_instance(
            InstanceRecord(
                id="i_dead",
                host="h",
                pid=1,
                started_at=t0,
                heartbeat_at=t0,
                lease_until=t0 + lease * 5 / 8,
            )
        )
        await store.create(_record("s_conn", t0, kind="connection", instance="i_dead"))
        await store.create(_record("s_handle", t0, kind="handle", handle_hash="h1"))
        await trio.sleep(lease * 5 / 8 - 0.1)  # its lease has not lapsed yet
        assert (await stored(store, "s_conn")).live
        await trio.sleep(lease * 3 / 8 + 0.2)  # within the lease: ended
        record = await stored(store, "s_conn")
        assert (record.state, record.reason) == ("terminated", "disconnected")
        assert record.terminated_at is not None
        assert record.terminated_at <= t0 + lease
        assert [i.id for i in await store.list_instances()] == [b.instance_id]
        assert (await stored(store, "s_handle")).live  # handle sessions belong to nobody


async def test_processes_waking_together_do_not_reap_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A laptop sleeps: every lease lapses at once, on the wall clock only.
    store = DurableMemoryStore()
    wall = SteppingWall()
    async with process(store, wall=wall) as a, process(store, wall=wall):
        conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
        a.mark_ready(conn)
        wall.step(3600)
        await trio.sleep(SETTINGS.instance_lease * 2)
        assert conn.live
        assert (await stored(store, conn.id)).live
        assert len(await store.list_instances()) == 2


async def test_a_reaped_process_registers_again_and_ends_what_was_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a:
        conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
        (mine,) = await store.list_instances()
        # Another process reaped us while we were paused.
        await store.reap_instances(mine.lease_until + 1, EPOCH + trio.current_time())
        assert await store.list_instances() == []
        await trio.sleep(SETTINGS.instance_lease / 8 + 0.1)
        assert [i.id for i in await store.list_instances()] == [mine.id]
        await a.wait_terminated(conn)
        assert conn.reason is R.DISCONNECTED


# -- one clock ------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_wall_clock_step_never_expires_a_session_in_use(
    autojump_clock: trio.testing.MockClock, step: float
) -> None:
    store = DurableMemoryStore()
    wall = SteppingWall()
    async with process(store, wall=wall) as a, process(store, wall=wall) as b:
        session, handle = await a.open_handle_session(principal="p")
        # Between the processes' timers (which all fire on whole seconds here): a step
        # landing between a sweep's reading of the clock and its query is a race this
        # cannot exclude (see the issue note).
        await trio.sleep(30.5)
        wall.step(step)
        for i in range(10):  # used every 30 s, by each in turn, both sweeping meanwhile
            await trio.sleep(30)
            sup = a if i % 2 else b
            async with sup.request(await sup.resolve_handle(handle, "p")):
                pass
        # Opened after the step: fine on first use (its times are in the new wall time).
        later, later_handle = await b.open_handle_session(principal="p")
        await trio.sleep(10)
        assert (await a.resolve_handle(later_handle, "p")).id == later.id
        assert (await a.resolve_handle(handle, "p")) is session
        assert session.live
        assert (await stored(store, session.id)).live


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_wall_clock_step_never_keeps_an_idle_session_past_its_bound(
    autojump_clock: trio.testing.MockClock, step: float
) -> None:
    store = DurableMemoryStore()
    wall = SteppingWall()
    async with process(store, wall=wall) as a:
        session, _ = await a.open_handle_session(principal="p")
        last_use = trio.current_time()
        await trio.sleep(10)
        wall.step(step)
        await a.wait_terminated(session)
        bound = 60 + min(5, 60 / 4) + SETTINGS.cleanup_interval
        assert session.reason is R.IDLE_TIMEOUT
        assert trio.current_time() - last_use <= bound + 1e-6
        assert (await stored(store, session.id)).reason == "idle_timeout"


async def test_a_step_without_a_store_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wall = SteppingWall()
    async with open_supervisor(SETTINGS, wall_clock=wall) as sup:
        session, handle = await sup.open_handle_session(principal="p")
        await trio.sleep(50)
        wall.step(7200)
        await trio.sleep(5)
        assert (await sup.resolve_handle(handle, "p")).live
        started = trio.current_time()
        wall.step(-7200)
        await sup.wait_terminated(session)
        assert trio.current_time() - started <= 60 + SETTINGS.cleanup_interval + 1e-6


# -- idle precision --------------------------------------------------------------------


async def test_short_idle_timeout_gets_a_quarter_of_it_as_allowance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "cleanup_interval": 0.1})
    async with process(store, settings) as a, process(store, settings) as b:
        session, handle = await a.open_handle_session(principal="p", idle_timeout=1)
        await trio.sleep(0.9)
        await b.resolve_handle(handle, "p")  # used elsewhere
        async with b.request(await b.resolve_handle(handle, "p")):
            pass
        last_use = trio.current_time()
        await a.wait_terminated(session)
        # Not the whole touch interval (5 s): a quarter of the idle timeout.
        assert trio.current_time() - last_use <= 1 + 0.25 + 0.1 + 1e-6
        assert session.reason is R.IDLE_TIMEOUT


async def test_use_elsewhere_within_the_timeout_keeps_a_short_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "cleanup_interval": 0.1})
    async with process(store, settings) as a, process(store, settings) as b:
        session, handle = await a.open_handle_session(principal="p", idle_timeout=2)
        other = await b.resolve_handle(handle, "p")
        for _ in range(10):  # b uses it every 1.5 s; a never does
            await trio.sleep(1.5)
            async with b.request(other):
                pass
        assert session.live
        assert other.live


# -- caps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False])
async def test_a_patch_past_the_state_cap_writes_nothing(
    autojump_clock: trio.testing.MockClock, durable: bool
) -> None:
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_state_bytes": 100})
    store = DurableMemoryStore() if durable else None
    async with open_supervisor(settings, store=store) as sup:
        session, _ = await sup.open_handle_session(principal="p")
        await session.patch_state({"a": "x" * 50})
        with pytest.raises(StateTooLarge) as info:
            await session.patch_state({"b": "y" * 50})
        assert (info.value.limit, info.value.code) == (100, "state_too_large")
        assert info.value.details()["limit_bytes"] == 100
        assert session.version == 1
        assert session.state_document() == {"a": "x" * 50}
        if store is not None:
            assert (await stored(store, session.id)).version == 1
        await session.patch_state({"a": None, "b": "y" * 50})  # replacing fits
        assert session.version == 2


async def test_metadata_past_its_cap_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_metadata_bytes": 64})
    store = DurableMemoryStore()
    async with open_supervisor(settings, store=store) as sup:
        with pytest.raises(MetadataTooLarge) as info:
            await sup.open_handle_session(principal="p", metadata={"k": "v" * 100})
        assert info.value.code == "metadata_too_large"
        assert sup.live_count == 0
        assert await store.list_by_principal("p") == []


def _record(
    session_id: str,
    t0: float,
    *,
    kind: str,
    instance: str | None = None,
    handle_hash: str | None = None,
) -> SessionRecord:
    return SessionRecord(
        id=session_id,
        handle_hash=handle_hash,
        kind=kind,
        principal="p",
        created_at=t0,
        last_active=t0,
        idle_timeout=3600,
        expires_at=t0 + 36_000,
        instance=instance,
    )


# -- review regressions -------------------------------------------------------------------


async def test_a_forward_step_noticed_by_a_sweeper_first_does_not_end_a_session_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    wall = SteppingWall()
    async with process(store, wall=wall) as b:
        session, handle = await b.open_handle_session(principal="p")
        await trio.sleep(0.5)  # a starts half a second later: its sweeps fall at x.5
        async with process(store, wall=wall):
            await trio.sleep(50)
            async with b.request(await b.resolve_handle(handle, "p")):
                pass  # used at ~50.5; idle timeout 60
            await trio.sleep(60.2 - trio.current_time())
            wall.step(3600)  # a's sweep at 60.5 comes before b's scanner tick at 61
            await trio.sleep(2)
            assert (await stored(store, session.id)).live


async def test_a_step_is_not_counted_twice_in_what_a_process_knows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    wall = SteppingWall()
    async with process(store, wall=wall) as a, process(store, wall=wall) as b:
        session, handle = await a.open_handle_session(principal="p")
        await b.resolve_handle(handle, "p")  # both hold it
        for _ in range(2):
            await trio.sleep(45)
            async with a.request(session):
                pass
        await trio.sleep(100.2 - trio.current_time())
        wall.step(3600)  # nobody has noticed yet (scanners tick on whole seconds)
        async with a.request(session):
            await session.patch_state({"x": 1})  # written in the new wall time
        for _ in range(6):  # b uses it every 20 s; a never again
            await trio.sleep(20)
            async with b.request(await b.resolve_handle(handle, "p")):
                pass
        assert session.live
        assert (await stored(store, session.id)).live


async def test_another_process_s_connection_session_is_never_evicted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    settings = Settings.from_mapping(
        {**SETTINGS.to_mapping(), "max_sessions": 1, "limit_policy": LimitPolicy.EVICT_IDLE.value}
    )
    async with process(store, settings) as a, process(store, settings) as b:
        conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
        a.mark_ready(conn)
        await trio.sleep(20)
        # Evicting it in the store would leave a serving a session the store calls ended.
        with pytest.raises(LimitExceeded):
            await b.open_handle_session(principal="q")
        assert conn.live
        assert (await stored(store, conn.id)).live


async def test_a_clean_stop_leaves_no_live_connection_session_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a:
        conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
        a.mark_ready(conn)
        await trio.sleep(1)
        store.down = True  # the end cannot be written while a stops...
    store.down = False
    # ...but removing its instance ends what it left live.
    record = await stored(store, conn.id)
    assert (record.state, record.reason) == ("terminated", "disconnected")
    assert await store.list_instances() == []


async def test_a_reaped_process_checks_its_connections_until_it_can(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class FlakyLoad(DurableMemoryStore):
        fail_loads = 0

        async def load(self, session_id: str, **kwargs: Any) -> Any:
            if self.fail_loads:
                self.fail_loads -= 1
                raise StoreUnavailable("blip")
            return await super().load(session_id, **kwargs)

    store = FlakyLoad()
    async with process(store) as a:
        conn = await a.create_session(kind=SessionKind.CONNECTION, principal="p", ready=False)
        a.mark_ready(conn)
        (mine,) = await store.list_instances()
        await store.reap_instances(mine.lease_until + 1, EPOCH + trio.current_time())
        store.fail_loads = 1  # the first check fails
        await trio.sleep(SETTINGS.instance_lease / 2)
        assert not conn.live
        assert conn.reason is R.DISCONNECTED


async def test_an_open_the_store_refuses_runs_no_setup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    async def setup(session: Session) -> None:
        calls.append("setup")  # a browser started, a sandbox allocated...

    store = DurableMemoryStore()
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_sessions_per_principal": 1})
    hooks = Hooks(setup=setup)
    async with (
        process(store, settings) as a,
        open_supervisor(settings, store=store, hooks=hooks, wall_clock=SteppingWall()) as b,
    ):
        await a.open_handle_session(principal="p")
        with pytest.raises(LimitExceeded):
            await b.open_handle_session(principal="p")
        assert calls == []
        assert sum(b.statistics().created.values()) == 0


async def test_a_forward_step_does_not_shorten_the_lifetime_of_a_held_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    wall = SteppingWall()
    settings = Settings.from_mapping(
        {**SETTINGS.to_mapping(), "max_lifetime": 7200, "idle_timeout": 600}
    )
    async with process(store, settings, wall=wall) as a:
        session, _ = await a.open_handle_session(principal="p")
        for _ in range(23):  # used every 5 minutes; the clock steps an hour and more at 30 min
            await trio.sleep(300)
            if trio.current_time() > 1800 and wall.offset == EPOCH:
                wall.step(6000)
            async with a.request(session):
                pass
        assert session.live
        assert (await stored(store, session.id)).live
        await a.wait_terminated(session)
        assert session.reason is R.LIFETIME_EXCEEDED
        assert trio.current_time() == pytest.approx(7200, abs=SETTINGS.cleanup_interval + 0.01)


@pytest.mark.parametrize("durable", [True, False])
async def test_a_suspend_counts_as_time_that_passed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    # A laptop sleeps an hour: trio's (monotonic) clock stops, the wall clock and the
    # boot clock do not. A session idle through it is idle; it is not a clock step.
    wall = SteppingWall()
    monkeypatch.setattr("mcp_sessions._clock.boot_clock", wall)
    store = DurableMemoryStore() if durable else None
    settings = Settings.from_mapping({**SETTINGS.to_mapping(), "max_lifetime": 7200})
    async with open_supervisor(settings, store=store, wall_clock=wall) as sup:
        idle, _ = await sup.open_handle_session(principal="p")
        busy, _ = await sup.open_handle_session(principal="p", idle_timeout=8000)
        await trio.sleep(10)
        wall.step(3600)
        await trio.sleep(2 * SETTINGS.cleanup_interval)  # noticed at the next scanner tick
        assert idle.state in {S.TERMINATING, S.TERMINATED}
        assert idle.reason is R.IDLE_TIMEOUT
        assert busy.live  # within its (long) idle timeout, counting the night
        await sup.wait_terminated(busy)  # and its lifetime counts the night too
        assert busy.reason is R.LIFETIME_EXCEEDED
        assert trio.current_time() <= 7200 - 3600 + 2 * SETTINGS.cleanup_interval + 1e-6


class SlowRoomCheck(DurableMemoryStore):
    async def check_room(self, principal: str, limits: Any) -> None:
        await trio.sleep(1)  # a round trip, a lock wait...
        await super().check_room(principal, limits)


async def test_an_open_racing_a_shutdown_is_refused_and_does_not_hold_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def teardown(session: Session, reason: Any) -> None:
        await trio.sleep(2)  # an existing session takes a while to tear down

    store = SlowRoomCheck()
    got: dict[str, Any] = {}
    sup = Supervisor(
        SETTINGS, store=store, hooks=Hooks(teardown=teardown), wall_clock=SteppingWall()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.open_handle_session(principal="p")

        async def opener() -> None:
            try:
                got["session"] = await sup.open_handle_session(principal="p")
            except ShuttingDown as exc:
                got["refused"] = exc

        nursery.start_soon(opener)
        await trio.sleep(0.1)
        started = trio.current_time()
        await sup.shutdown()
        assert trio.current_time() - started < 5
    assert "refused" in got
    assert sup.live_count == 0
