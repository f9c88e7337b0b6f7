"""The runtime on a store: two supervisors sharing one store stand for two processes.

MemoryStore is the contract's reference backend; ``DurableMemoryStore`` only
claims to survive restarts, which is what the runtime checks before keeping
handle sessions at shutdown. The real backends run the same contract in
``test_store_contract.py`` and these behaviours end to end in
``test_persistence_e2e.py``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from mcp_sessions import (
    Hooks,
    Session,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
    SessionState,
    Settings,
    Supervisor,
    TerminationReason,
    VersionConflict,
    open_supervisor,
)
from mcp_sessions._store import MemoryStore, SessionRecord, StoreUnavailable, Touch

S = SessionState
R = TerminationReason
EPOCH = 1_700_000_000.0


class DurableMemoryStore(MemoryStore):
    """A MemoryStore that counts its writes and can be switched off."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.writes: dict[str, int] = {}
        self.down = False

    def _check(self, op: str, write: bool = True) -> None:
        if self.down:
            raise StoreUnavailable(f"store is down ({op})")
        if write:
            self.writes[op] = self.writes.get(op, 0) + 1

    async def create(self, record: Any, **kwargs: Any) -> list[str]:
        self._check("create")
        return await super().create(record, **kwargs)

    async def load_by_hash(self, handle_hash: str, **kwargs: Any) -> Any:
        self._check("load_by_hash", write=False)
        return await super().load_by_hash(handle_hash, **kwargs)

    async def terminate(self, *args: Any, **kwargs: Any) -> Any:
        self._check("terminate")
        return await super().terminate(*args, **kwargs)

    async def patch_state(self, *args: Any, **kwargs: Any) -> Any:
        self._check("patch_state")
        return await super().patch_state(*args, **kwargs)

    async def touch(self, touches: Sequence[Touch]) -> None:
        self._check("touch")
        await super().touch(touches)

    async def expire(self, *args: Any, **kwargs: Any) -> Any:
        self._check("expire")
        return await super().expire(*args, **kwargs)


async def stored(store: MemoryStore, session_id: str) -> SessionRecord:
    """The store's record of a session, which must exist."""
    record = await store.load(session_id)
    assert record is not None, f"no record of {session_id}"
    return record


def wall() -> float:
    """A wall clock that follows trio's (mock) clock."""
    return EPOCH + trio.current_time()


SETTINGS = Settings(
    idle_timeout=60, cleanup_interval=1, touch_interval=5, sweep_interval=30, max_lifetime=3600
)


@asynccontextmanager
async def process(
    store: MemoryStore, settings: Settings = SETTINGS, hooks: Hooks | None = None
) -> AsyncIterator[Supervisor]:
    async with open_supervisor(settings, hooks=hooks, store=store, wall_clock=wall) as sup:
        yield sup


async def test_open_close_are_committed_before_they_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice", metadata={"k": 1})
        record = await stored(store, session.id)
        assert (record.state, record.kind, record.principal) == ("idle", "handle", "alice")
        assert handle not in repr(record)
        assert record.metadata == {"k": 1}
        await sup.close(session)
        record = await stored(store, session.id)
        assert (record.state, record.reason) == ("terminated", "closed")


async def test_handle_opened_in_one_process_works_in_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        session_a, handle = await a.open_handle_session(principal="alice")
        await session_a.patch_state({"cart": ["apple"]})
        session_b = await b.resolve_handle(handle, "alice")
        assert session_b.id == session_a.id
        assert session_b.state_document() == {"cart": ["apple"]}
        assert session_b.version == 1
        with pytest.raises(SessionNotFound):
            await b.resolve_handle(handle, "mallory")


async def test_patches_from_two_processes_lose_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        session_a, handle = await a.open_handle_session(principal="alice")
        session_b = await b.resolve_handle(handle, "alice")
        async with trio.open_nursery() as nursery:
            for i in range(20):
                target = session_a if i % 2 else session_b
                nursery.start_soon(target.patch_state, {f"k{i}": i})
        record = await stored(store, session_a.id)
        assert record.version == 20
        assert record.doc == {f"k{i}": i for i in range(20)}
        # if_version is checked against the store, not a stale local copy
        with pytest.raises(VersionConflict) as info:
            await session_a.patch_state({"x": 1}, if_version=session_a.version - 1)
        assert info.value.current == 20


async def test_closed_in_one_process_is_closed_in_the_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        session_a, handle = await a.open_handle_session(principal="alice")
        session_b = await b.resolve_handle(handle, "alice")
        await b.close(session_b)
        with pytest.raises(SessionClosed):
            await a.resolve_handle(handle, "alice")
        await a.wait_terminated(session_a)
        assert (session_a.state, session_a.reason) == (S.TERMINATED, R.CLOSED)
        assert store.writes["terminate"] == 1  # ended once, by b


async def test_use_elsewhere_keeps_a_session_from_idling_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        session_a, handle = await a.open_handle_session(principal="alice")
        session_b = await b.resolve_handle(handle, "alice")
        for _ in range(10):  # 200 s of use in b; a sees none of it locally
            await trio.sleep(20)
            async with b.request(session_b):
                pass
        assert session_a.state is S.IDLE
        await trio.sleep(100)  # now nobody uses it
        assert session_a.state is S.TERMINATED
        assert session_a.reason is R.IDLE_TIMEOUT
        assert session_b.state is S.TERMINATED
        record = await stored(store, session_a.id)
        assert record.reason == "idle_timeout"
        assert store.writes["expire"] >= 1


async def test_touches_are_coalesced_not_one_per_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        for _ in range(1000):
            async with sup.request(session):
                await trio.sleep(0.01)  # 1000 requests over 10 s
        await trio.sleep(6)
        record = await stored(store, session.id)
        assert record.requests == 1000
        assert store.writes.get("touch", 0) <= 3  # one per touch interval at most
        assert record.last_active == pytest.approx(wall() - 6, abs=0.1)


async def test_a_long_request_keeps_its_session_fresh_in_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        session, handle = await a.open_handle_session(principal="alice")
        async with a.request(session):
            await trio.sleep(200)  # longer than the idle timeout
            await b.resolve_handle(handle, "alice")  # b's sweep and checks see it live


async def test_restart_resumes_handle_sessions_with_their_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    resumed: list[str] = []

    async def resume(session: Session) -> None:
        resumed.append(session.id)

    async with process(store) as first:
        session, handle = await first.open_handle_session(principal="alice")
        await session.patch_state({"notes": ["a"]})
        async with first.request(session):
            pass
    assert session.reason is R.SHUTDOWN
    record = await stored(store, session.id)
    assert record.state == "idle"  # kept, not ended, by the shutdown
    await trio.sleep(30)
    async with process(store, hooks=Hooks(resume=resume)) as second:
        again = await second.resolve_handle(handle, "alice")
        assert again.id == session.id
        assert again.state_document() == {"notes": ["a"]}
        assert again.snapshot().requests == 1
        assert resumed == [session.id]
        # its idle clock counts from the last activity before the restart (plus
        # the touch interval of grace a shared store gives idle expiry)
        await trio.sleep(31 + SETTINGS.touch_interval)
        assert again.reason is R.IDLE_TIMEOUT


async def test_deadline_passed_during_downtime_is_expired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as first:
        _, handle = await first.open_handle_session(principal="alice")
    await trio.sleep(120)
    async with process(store) as second:
        with pytest.raises(SessionExpired):
            await second.resolve_handle(handle, "alice")
        assert second.live_count == 0


async def test_sweep_ends_sessions_nobody_has_loaded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as first:
        session, _ = await first.open_handle_session(principal="alice")
    async with process(store) as second:
        await trio.sleep(SETTINGS.idle_timeout + SETTINGS.sweep_interval + 1)
        record = await stored(store, session.id)
        assert (record.state, record.reason) == ("terminated", "idle_timeout")
        assert second.statistics().cleanup_errors == 0


async def test_store_outage_is_a_clear_error_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        store.down = True
        with pytest.raises(StoreUnavailable):
            await sup.open_handle_session(principal="alice")
        with pytest.raises(StoreUnavailable):
            await session.patch_state({"a": 1})
        with pytest.raises(StoreUnavailable):
            await sup.close(session)
        with pytest.raises(StoreUnavailable):
            await sup.resolve_handle(handle, "alice")
        assert session.state is S.IDLE  # nothing the client was told succeeded
        assert sup.store_error is not None
        assert sup.live_count == 1  # the failed open left nothing behind
        async with sup.request(session):  # local work still runs
            pass
        store.down = False
        assert await sup.resolve_handle(handle, "alice") is session
        assert sup.store_error is None
        assert await session.patch_state({"a": 1}) == 1
        await sup.close(session)


async def test_connection_sessions_end_in_the_store_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from mcp_sessions import SessionKind

    store = DurableMemoryStore()
    async with process(store) as sup:
        conn = await sup.create_session(kind=SessionKind.CONNECTION, principal="a", ready=False)
        record = await stored(store, conn.id)
        assert record.state == "initializing"
        sup.mark_ready(conn)
        await trio.testing.wait_all_tasks_blocked()
        record = await stored(store, conn.id)
        assert record.state == "idle"
    record = await stored(store, conn.id)
    assert (record.state, record.reason) == ("terminated", "shutdown")


async def test_list_records_shows_every_process_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as a, process(store) as b:
        one, _ = await a.open_handle_session(principal="alice")
        await trio.sleep(1)  # oldest first
        two, _ = await b.open_handle_session(principal="alice")
        await b.open_handle_session(principal="bob")
        assert [r.id for r in await a.list_records("alice")] == [one.id, two.id]


# -- races and lags around the store (found in review) --------------------------------


class SlowStore(DurableMemoryStore):
    """Store round trips that take time, to open the windows between an await and its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.delay: dict[str, float] = {}

    async def _slow(self, op: str) -> None:
        if op in self.delay:
            await trio.sleep(self.delay[op])

    async def touch(self, touches: Sequence[Touch]) -> None:
        await self._slow("touch")
        await super().touch(touches)

    async def terminate(self, *args: Any, **kwargs: Any) -> Any:
        await self._slow("terminate")
        return await super().terminate(*args, **kwargs)

    async def load_by_hash(self, handle_hash: str, **kwargs: Any) -> Any:
        result = await super().load_by_hash(handle_hash, **kwargs)
        await self._slow("load_by_hash")  # the answer arrives late
        return result

    async def expire(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            await trio.sleep(2)  # failing takes a while (a lock or connection timeout)
        await self._slow("expire")
        return await super().expire(*args, **kwargs)

    async def create(self, record: Any, **kwargs: Any) -> list[str]:
        await self._slow("create")
        return await super().create(record, **kwargs)


async def test_own_unwritten_use_keeps_a_session_from_expiring_at_resolve(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    store.delay["touch"] = 10.0  # the touch that writes the use lands at t=75
    async with process(store) as sup:
        await trio.sleep(2)
        session, handle = await sup.open_handle_session(principal="alice")
        await trio.sleep(59)
        async with sup.request(session):  # used at t=61; the next touch starts at t=65
            pass
        await trio.sleep(7)
        # t=68: the stored record still says idle since t=2, due at 2 + 60 + 5 (grace) = 67;
        # only this process's own unwritten use at t=61 keeps it alive.
        assert (await stored(store, session.id)).last_active == pytest.approx(EPOCH + 2, abs=0.01)
        assert await sup.resolve_handle(handle, "alice") is session
        assert session.state is S.IDLE


async def test_sweep_does_not_end_a_session_just_used_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(idle_timeout=60, touch_interval=5, sweep_interval=7, max_lifetime=3600)
    async with process(SlowStore(), settings) as sup:
        await trio.sleep(31)
        session, _ = await sup.open_handle_session(principal="alice")
        await trio.sleep(59.5)
        async with sup.request(session):  # at t=90.5; a sweep runs at t=91
            pass
        await trio.sleep(1)
        assert session.state is S.IDLE


async def test_a_close_during_a_touch_counts_each_request_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    store.delay.update(touch=1.0, terminate=1.0)
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        for _ in range(10):
            async with sup.request(session):
                pass
        await trio.sleep(5.5)  # the flusher's touch is in flight until t=6
        await sup.close(session)
        record = await stored(store, session.id)
        assert record.requests == 10


async def test_resolving_a_session_that_is_ending_does_not_bring_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    store.delay["terminate"] = 1.0

    async def boom() -> None:
        raise RuntimeError("background failure")

    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        session.start_soon(boom)
        await trio.sleep(0.5)  # ending; the store does not know yet
        assert session.state is S.TERMINATING
        with pytest.raises(SessionClosed):
            await sup.resolve_handle(handle, "alice")
        await trio.sleep(2)
        assert session.state is S.TERMINATED
        assert sup.live_count == 0
        record = await stored(store, session.id)
        assert record.reason == "error"


async def test_a_late_read_never_rolls_back_a_committed_patch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        store.delay["load_by_hash"] = 1.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.resolve_handle, handle, "alice")
            await trio.sleep(0.1)
            assert await session.patch_state({"x": 1}) == 1
        assert (session.version, session.state_document()) == (1, {"x": 1})


async def test_resolve_while_resuming_past_the_deadline_is_expired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from mcp_sessions import SessionError

    store = SlowStore()
    async with process(store) as first:
        _, handle = await first.open_handle_session(principal="alice")
    await trio.sleep(58)  # idle deadline (with the store's grace): t=65

    async def resume(session: Session) -> None:
        await trio.sleep(9)  # still resuming when the deadline passes

    outcomes: list[str] = []

    async def first_use(sup: Supervisor) -> None:
        try:
            await sup.resolve_handle(handle, "alice")
            outcomes.append("ok")
        except SessionError as exc:
            outcomes.append(exc.code)

    async with process(store, hooks=Hooks(resume=resume)) as second, trio.open_nursery() as n:
        n.start_soon(first_use, second)
        await trio.sleep(7.5)
        with pytest.raises(SessionExpired):
            await second.resolve_handle(handle, "alice")
    assert outcomes in (["session_closed"], ["session_expired"])


async def test_store_outage_while_expiring_spares_a_session_now_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        await trio.sleep(SETTINGS.idle_timeout + SETTINGS.touch_interval - 0.1)
        store.down = True
        await trio.sleep(0.2)  # due: the reconciler is waiting on the failing store
        async with sup.request(session):  # admitted meanwhile
            await trio.sleep(5)
        assert session.live


async def test_session_created_during_shutdown_is_refused_and_not_left_live(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from mcp_sessions import SessionKind, ShuttingDown

    store = SlowStore()

    class SlowCreate(SlowStore):
        async def create(self, record: Any, **kwargs: Any) -> list[str]:
            await trio.sleep(1)
            return await super().create(record, **kwargs)

    store = SlowCreate()
    outcome: dict[str, Any] = {}
    async with process(store) as sup:

        async def make() -> None:
            try:
                await sup.create_session(kind=SessionKind.CONNECTION, principal="a", ready=False)
            except ShuttingDown as exc:
                outcome["error"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(make)
            await trio.sleep(0.5)
            await sup.shutdown(grace=0)
    assert isinstance(outcome.get("error"), ShuttingDown)
    assert not await store.list_by_principal("a")


# -- the handle path (runtime v2) ------------------------------------------------------


async def test_handle_calls_write_coalesced_not_once_per_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1000 calls naming a handle, as the server makes them: resolve, then a request."""
    store = DurableMemoryStore()
    async with process(store) as sup:
        _, handle = await sup.open_handle_session(principal="alice")
        before = sum(store.writes.values())
        for _ in range(1000):
            session = await sup.resolve_handle(handle, "alice")
            async with sup.request(session):
                await trio.sleep(0.01)  # 1000 calls over 10 s
        await trio.sleep(SETTINGS.touch_interval + 1)
        writes = sum(store.writes.values()) - before
        record = await stored(store, session.id)
    assert writes <= 10, store.writes  # one touch per touch_interval, not one per call
    assert record.requests == 1000


async def test_concurrent_resolves_of_a_handle_opened_elsewhere_share_one_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()

    async def resume(session: Session) -> None:
        await trio.sleep(1)  # every resolver arrives while the first brings it in

    async with process(store) as a, process(store, hooks=Hooks(resume=resume)) as b:
        _, handle = await a.open_handle_session(principal="alice")
        got: list[Session] = []

        async def use() -> None:
            got.append(await b.resolve_handle(handle, "alice"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(use)
        assert len(got) == 5
        assert len({id(s) for s in got}) == 1
        assert got[0].state is S.IDLE
        assert b.live_count == 1


async def test_concurrent_closes_of_one_session_all_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def teardown(session: Session, reason: R) -> None:
        await trio.sleep(1)  # the closers wait together

    store = DurableMemoryStore()
    async with process(store, hooks=Hooks(teardown=teardown)) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(sup.close, session)
        assert session.state is S.TERMINATED
        assert (await stored(store, session.id)).reason == "closed"
        assert store.writes["terminate"] == 1


async def test_a_handle_call_reads_the_store_once_and_skips_the_document_it_has(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without change detection (MemoryStore), one read per call, without the document."""
    calls: list[dict[str, Any]] = []

    class Counting(DurableMemoryStore):
        async def load_by_hash(self, handle_hash: str, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return await super().load_by_hash(handle_hash, **kwargs)

    store = Counting()
    async with process(store) as a, process(store) as b:
        session, handle = await a.open_handle_session(principal="alice")
        await session.patch_state({"big": "x" * 1000})
        calls.clear()
        for _ in range(3):
            await a.resolve_handle(handle, "alice")
        assert len(calls) == 3
        assert all(c.get("known_version") == 1 for c in calls)
        other = await b.resolve_handle(handle, "alice")
        await other.patch_state({"n": 2})
        again = await a.resolve_handle(handle, "alice")  # b's patch is seen
        assert again.state_document() == {"big": "x" * 1000, "n": 2}
        assert again.version == 2


# -- review findings (runtime v2) ---------------------------------------------------------


async def test_a_caller_giving_up_does_not_end_a_session_others_wait_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def resume(session: Session) -> None:
        await trio.sleep(1)

    store = DurableMemoryStore()
    async with process(store) as a, process(store, hooks=Hooks(resume=resume)) as b:
        opened, handle = await a.open_handle_session(principal="alice")
        outcomes: dict[str, str] = {}

        async def first() -> None:
            with trio.move_on_after(0.5):  # the client cancels its call
                await b.resolve_handle(handle, "alice")
            outcomes["first"] = "gave up"

        async def second() -> None:
            await trio.sleep(0.1)
            outcomes["second"] = (await b.resolve_handle(handle, "alice")).state.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
        assert outcomes == {"first": "gave up", "second": "idle"}
        assert b.tombstones() == []
        assert (await stored(store, opened.id)).live


async def test_a_patch_while_the_record_is_inserted_is_committed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    store.delay["create"] = 1.0
    acked: list[int] = []

    async def patch_soon(session: Session) -> None:
        await trio.sleep(0.5)  # lands while the insert is in flight
        acked.append(await session.patch_state({"x": 1}))

    async def setup(session: Session) -> None:
        session.start_soon(patch_soon, session)

    async with process(store, hooks=Hooks(setup=setup)) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        await trio.sleep(1)
        assert acked == [1]
        record = await stored(store, session.id)
        assert (record.version, dict(record.doc)) == (1, {"x": 1})
        assert session.state_document() == {"x": 1}


class QuietStore(SlowStore):
    """One process alone: nobody else writes, so an unchanged epoch is a promise."""

    def change_epoch(self) -> int | None:
        return 0


@pytest.mark.parametrize("store_type", [SlowStore, QuietStore])
async def test_a_session_due_here_is_refused_at_resolve_not_cancelled_mid_call(
    autojump_clock: trio.testing.MockClock, store_type: type[SlowStore]
) -> None:
    store = store_type()
    store.delay["expire"] = 0.5
    async with process(store) as sup:
        _, handle = await sup.open_handle_session(principal="alice")
        await trio.sleep(SETTINGS.idle_timeout + SETTINGS.touch_interval + 0.1)  # found due
        with pytest.raises(SessionExpired):
            await sup.resolve_handle(handle, "alice")


async def test_a_session_that_closes_itself_is_released_and_its_last_request_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = DurableMemoryStore()
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        await session.patch_state({"blob": "x" * 100_000})
        async with sup.request(session):
            pass
        async with sup.request(session):  # the session_close tool's own request
            await sup.close(session)
        record = await stored(store, session.id)
        assert record.requests == session.requests == 2
        ref = weakref.ref(session)
        del session
        gc.collect()
        assert ref() is None


async def test_a_session_closed_elsewhere_and_purged_is_not_served_from_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(
        idle_timeout=3600,
        cleanup_interval=1,
        touch_interval=5,
        sweep_interval=30,
        max_lifetime=24 * 3600,
        tombstone_retention=60,
    )
    store = DurableMemoryStore()
    async with process(store, settings) as a, process(store, settings) as b:
        opened, handle = await a.open_handle_session(principal="alice")
        await b.close(await b.resolve_handle(handle, "alice"))
        await trio.sleep(120)  # b's sweeper purges the ended record
        assert await store.load(opened.id) is None
        with pytest.raises(SessionClosed):
            await a.resolve_handle(handle, "alice")
        assert not opened.live


async def test_invariants_hold_while_the_store_confirms_an_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStore()
    store.delay["expire"] = 0.5
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        await trio.sleep(SETTINGS.idle_timeout + SETTINGS.touch_interval + 0.1)
        assert session.live  # the reconciler waits on the store
        sup.check_invariants()
        await trio.sleep(1)
        assert session.reason is R.IDLE_TIMEOUT


class LateAnswers(QuietStore):
    """Writes that commit, then answer late: a caller may give up on a committed write."""

    async def patch_state(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().patch_state(*args, **kwargs)
        await self._slow("answer")
        return result

    async def terminate(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().terminate(*args, **kwargs)
        await self._slow("answer")
        return result


async def test_a_patch_given_up_on_but_committed_is_seen_on_the_next_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateAnswers()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        store.delay["answer"] = 1
        with trio.move_on_after(0.5):  # the client cancels; the write has committed
            await session.patch_state({"n": 1})
        store.delay.clear()
        again = await sup.resolve_handle(handle, "alice")
        assert (again.version, again.state_document()) == (1, {"n": 1})
        assert await again.patch_state({"n": 2}, if_version=1) == 2  # a retry loop succeeds


async def test_a_conflicting_patch_refreshes_the_copy_it_conflicted_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateAnswers()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        await store.patch_state(session.id, {"elsewhere": True}, if_version=None, at=wall())
        with pytest.raises(VersionConflict):
            await session.patch_state({"n": 1}, if_version=0)
        again = await sup.resolve_handle(handle, "alice")
        assert (again.version, again.state_document()) == (1, {"elsewhere": True})


async def test_a_close_given_up_on_but_committed_is_seen_on_the_next_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateAnswers()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        store.delay["answer"] = 1
        with trio.move_on_after(0.5):
            await sup.close(session)
        store.delay.clear()
        with pytest.raises(SessionClosed):
            await sup.resolve_handle(handle, "alice")
        assert not session.live


async def _make_our_copy_doubtful(session: Session, store: MemoryStore) -> None:
    """A patch that conflicts: our copy is known stale, the next use must read."""
    await store.patch_state(session.id, {"elsewhere": True}, if_version=None, at=wall())
    with pytest.raises(VersionConflict):
        await session.patch_state({"n": 0}, if_version=0)


async def test_a_read_in_flight_does_not_vouch_for_a_copy_a_close_made_doubtful(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateAnswers()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        await _make_our_copy_doubtful(session, store)
        store.delay["load_by_hash"] = 1.0  # a pipelined call's read answers late
        store.delay["answer"] = 1.0  # the close commits at once, answers late
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.resolve_handle, handle, "alice")  # read before the close
            await trio.sleep(0.1)
            with trio.move_on_after(0.3):  # the client gives up on its close
                await sup.close(session)
        store.delay.clear()
        with pytest.raises(SessionClosed):
            await sup.resolve_handle(handle, "alice")


async def test_a_read_in_flight_does_not_vouch_for_a_copy_a_patch_made_doubtful(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateAnswers()
    async with process(store) as sup:
        session, handle = await sup.open_handle_session(principal="alice")
        await _make_our_copy_doubtful(session, store)
        store.delay["load_by_hash"] = 1.0
        store.delay["answer"] = 1.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.resolve_handle, handle, "alice")
            await trio.sleep(0.1)
            with trio.move_on_after(0.3):
                await session.patch_state({"n": 4})  # committed, given up on
        store.delay.clear()
        record = await stored(store, session.id)
        again = await sup.resolve_handle(handle, "alice")
        assert (again.version, again.state_document()) == (record.version, dict(record.doc))


class RecordingTouches(SlowStore):
    def __init__(self) -> None:
        super().__init__()
        self.touches: list[Touch] = []

    async def touch(self, touches: Sequence[Touch]) -> None:
        self.touches.extend(touches)
        await super().touch(touches)


async def test_a_touch_during_a_slow_close_never_writes_a_negative_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RecordingTouches()
    async with process(store) as sup:
        session, _ = await sup.open_handle_session(principal="alice")
        for _ in range(5):
            async with sup.request(session):
                pass
        await trio.sleep(5.5)  # the flusher wrote 5
        store.delay["terminate"] = 5.0  # the close's write is in flight across a flush

        async def pipelined() -> None:
            with contextlib.suppress(SessionClosed):
                async with sup.request(session):
                    await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            await trio.sleep(0.5)
            async with sup.request(session):  # the session_close tool's own request
                nursery.start_soon(pipelined)
                await sup.close(session)
        record = await stored(store, session.id)
        assert all(t.requests >= 0 for t in store.touches)
        assert record.requests >= 6


async def test_cancelling_the_supervisor_is_not_held_off_by_a_hung_setup_hook(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def setup(session: Session) -> None:
        await trio.sleep_forever()  # bounded only by setup_timeout

    sup = Supervisor(Settings(setup_timeout=10), hooks=Hooks(setup=setup))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.start_soon(functools.partial(sup.open_handle_session, principal="alice"))
        await trio.sleep(1)
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 0.1
    assert sup.statistics().hook_errors == {}
