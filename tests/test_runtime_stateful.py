"""A Hypothesis state machine driving the real supervisor, checking DESIGN.md's invariants.

One ``trio.run`` lives in a thread for the machine's life (see shared/STYLE.md):
each rule runs ``trio.from_thread.run(step)``, where ``step`` awaits the action
and then ``wait_all_tasks_blocked()``. Time moves only in the ``advance`` rule,
which jumps the ``MockClock``.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mcp_sessions import (
    Hooks,
    InvalidTransition,
    LimitExceeded,
    LimitPolicy,
    Session,
    SessionError,
    SessionKind,
    SessionSetupFailed,
    SessionState,
    Settings,
    ShuttingDown,
    Supervisor,
    TerminationReason,
)
from mcp_sessions._store import MemoryStore

from .strategies import principals

S = SessionState
R = TerminationReason

SETTINGS = {
    "idle_timeout": 10.0,
    "max_lifetime": 45.0,
    "max_sessions": 5,
    "max_sessions_per_principal": 3,
    "cleanup_interval": 1.0,
    "setup_timeout": 2.0,
    "teardown_timeout": 2.0,
    "shutdown_grace": 5.0,
    "tombstone_retention": 20.0,
}


def in_trio(check: Callable[[SupervisorMachine], None]) -> Callable[[SupervisorMachine], None]:
    """Run an invariant inside the trio thread, where the runtime's state lives."""

    @functools.wraps(check)
    def wrapper(self: SupervisorMachine) -> None:
        trio.from_thread.run_sync(check, self, trio_token=self.token)

    return wrapper


class Request:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.release = trio.Event()
        self.entered = False
        self.done = False
        self.outcome: str = "pending"


class SupervisorMachine(RuleBasedStateMachine):
    policy = LimitPolicy.REJECT

    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()
        self.settings = Settings(limit_policy=self.policy, **SETTINGS)  # type: ignore[arg-type]
        self.teardowns: Counter[str] = Counter()
        self.sessions: list[Session] = []
        self.requests: list[Request] = []
        self.shutdown_started = False
        self.store = self.make_store()
        self.supervisor = Supervisor(
            self.settings,
            hooks=Hooks(setup=self._setup, teardown=self._teardown),
            store=self.store,
            wall_clock=lambda: 1_700_000_000.0 + self.clock.current_time(),
        )
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._host, daemon=True)
        self._thread.start()
        self._ready.wait()

    def make_store(self) -> MemoryStore | None:
        return None

    # -- hosting trio ----------------------------------------------------------

    def _host(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.supervisor.run)
            self._ready.set()
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, action: Callable[[], Awaitable[Any]]) -> Any:
        async def step() -> Any:
            result = await action()
            await trio.testing.wait_all_tasks_blocked()
            return result

        return trio.from_thread.run(step, trio_token=self.token)

    def teardown(self) -> None:
        if self._error is None:
            trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self._thread.join(timeout=30)
        if self._error is not None:
            raise self._error

    # -- hooks -------------------------------------------------------------------

    async def _setup(self, session: Session) -> None:
        if session.principal == "carol" and session.kind is SessionKind.CONNECTION:
            raise RuntimeError("setup fails for carol's connections")

    async def _teardown(self, session: Session, reason: R) -> None:
        self.teardowns[session.id] += 1

    # -- rules ---------------------------------------------------------------------

    @rule(principal=principals, kind=st.sampled_from(SessionKind), ready=st.booleans())
    def create(self, principal: str, kind: SessionKind, ready: bool) -> None:
        async def action() -> None:
            try:
                session = await self.supervisor.create_session(
                    kind=kind, principal=principal, ready=ready or kind is SessionKind.HANDLE
                )
            except (LimitExceeded, ShuttingDown):
                return
            except SessionSetupFailed:
                assert principal == "carol"
                return
            self.sessions.append(session)

        self.run(action)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def mark_ready(self, data: st.DataObject) -> None:
        session = data.draw(st.sampled_from(self.sessions))

        async def action() -> None:
            if session.state is S.INITIALIZING:
                self.supervisor.mark_ready(session)

        self.run(action)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def start_request(self, data: st.DataObject) -> None:
        session = data.draw(st.sampled_from(self.sessions))
        request = Request(session)

        async def hold() -> None:
            try:
                async with self.supervisor.request(session):
                    request.entered = True
                    await request.release.wait()
                request.outcome = "ok"
            except SessionError as exc:
                request.outcome = exc.code
            finally:
                request.done = True

        async def action() -> None:
            self.nursery.start_soon(hold)

        self.run(action)
        self.requests.append(request)

    @precondition(lambda self: any(not r.done for r in self.requests))
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from([r for r in self.requests if not r.done]))

        async def action() -> None:
            request.release.set()

        self.run(action)
        assert request.done

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), crash=st.booleans())
    def background_task(self, data: st.DataObject, crash: bool) -> None:
        session = data.draw(st.sampled_from(self.sessions))

        async def job() -> None:
            if crash:
                raise RuntimeError("background crash")
            await trio.sleep_forever()

        async def action() -> None:
            if session.live:
                session.start_soon(job)

        self.run(action)
        if crash and session.reason is not None and session.kind is SessionKind.HANDLE:
            assert session.state is S.TERMINATED

    @precondition(lambda self: self.sessions)
    @rule(
        data=st.data(),
        reason=st.sampled_from([R.CLOSED, R.DISCONNECTED, R.EVICTED, R.ERROR]),
    )
    def close(self, data: st.DataObject, reason: R) -> None:
        session = data.draw(st.sampled_from(self.sessions))

        async def action() -> None:
            if session.state is S.INITIALIZING and reason is R.EVICTED:
                # Not in the table: refused, state unchanged.
                with pytest.raises(InvalidTransition):
                    self.supervisor.terminate(session, reason)
                assert session.state is S.INITIALIZING
                assert session.reason is None
                return
            await self.supervisor.close(session, reason)

        self.run(action)
        assert session.state in (S.TERMINATED, S.INITIALIZING)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 9.5, 10.0, 11.0, 25.0]))
    def advance(self, seconds: float) -> None:
        async def action() -> None:
            self.clock.jump(seconds)

        self.run(action)

    @precondition(lambda self: not self.shutdown_started)
    @rule()
    def shutdown(self) -> None:
        async def action() -> None:
            self.nursery.start_soon(self.supervisor.shutdown)

        self.run(action)
        self.shutdown_started = True

    # -- invariants -------------------------------------------------------------------

    @invariant()
    @in_trio
    def terminated_sessions_are_gone_and_torn_down_once(self) -> None:
        registered = {s.id for s in self.supervisor.sessions()}
        for session in self.sessions:
            if session.state is S.TERMINATED:
                assert session.id not in registered
                assert session.reason is not None
                assert self.teardowns[session.id] == 1
                assert session.snapshot().background_tasks == 0
                assert session.task_done
            else:
                assert session.id in registered
                assert self.teardowns[session.id] == 0

    @invariant()
    @in_trio
    def the_runtime_holds_its_own_invariants(self) -> None:
        self.supervisor.check_invariants()

    @invariant()
    @in_trio
    def active_exactly_when_requests_in_flight(self) -> None:
        in_flight = Counter(r.session.id for r in self.requests if r.entered and not r.done)
        for session in self.sessions:
            if session.state in (S.ACTIVE, S.IDLE):
                assert (session.state is S.ACTIVE) == (in_flight[session.id] > 0)
                assert session.in_flight == in_flight[session.id]

    @invariant()
    @in_trio
    def nothing_outlives_its_deadlines_by_a_scan_interval(self) -> None:
        if self.supervisor.stopped:
            return
        now = self.clock.current_time()
        interval = self.settings.cleanup_interval
        grace = self.supervisor.idle_grace  # a store's allowance for unwritten use
        for session in self.sessions:
            if session.idle_since is not None:
                assert session.idle_since + session.idle_timeout + grace > now - interval
            if session.live:
                assert session.lifetime_end > now - interval

    @invariant()
    @in_trio
    def limits_hold(self) -> None:
        live = self.supervisor.sessions()
        assert len(live) <= self.settings.max_sessions
        per = Counter(s.principal for s in live)
        assert max(per.values(), default=0) <= self.settings.max_sessions_per_principal

    @invariant()
    @in_trio
    def metrics_add_up(self) -> None:
        stats = self.supervisor.statistics()
        assert stats.created_total == stats.live + stats.terminated_total
        assert stats.live == self.supervisor.live_count
        actual = Counter(s.state for s in self.supervisor.sessions())
        for state in S:
            assert stats.live_by_state[state] == actual[state]
        assert stats.live_by_state[S.TERMINATED] == 0

    @invariant()
    @in_trio
    def closed_requests_got_an_answer(self) -> None:
        for request in self.requests:
            if request.done:
                assert request.outcome in {"ok", "session_closed", "session_expired",
                                           "shutting_down"}  # fmt: skip

    @invariant()
    @in_trio
    def after_shutdown_nothing_is_live(self) -> None:
        if self.supervisor.stopped:
            assert self.supervisor.live_count == 0
            assert all(s.reason is not None for s in self.sessions)
            assert not math.isnan(self.clock.current_time())


class EvictingSupervisorMachine(SupervisorMachine):
    policy = LimitPolicy.EVICT_IDLE


class StoredSupervisorMachine(SupervisorMachine):
    """The same rules and invariants with a durable store under the runtime, plus its own."""

    def make_store(self) -> MemoryStore | None:
        store = MemoryStore()
        store.durable = True  # type: ignore[misc]
        return store

    @invariant()
    def the_store_agrees(self) -> None:
        store = self.store
        assert store is not None

        async def check() -> None:
            for session in self.sessions:
                record = await store.load(session.id)
                if record is None:  # purged after tombstone_retention
                    assert session.state is S.TERMINATED
                    continue
                if session.live:
                    assert record.live
                    assert record.version == session.version
                elif session.state is S.TERMINATED and session.reason is not R.SHUTDOWN:
                    assert not record.live
                    assert record.reason == session.reason.value  # type: ignore[union-attr]
                elif (
                    session.state is S.TERMINATED
                    and session.kind is SessionKind.HANDLE
                    and not record.live
                ):
                    # Kept across a shutdown, to resume; unless a sweep (the runtime's
                    # own, while it shut down) found a deadline passed since.
                    assert record.terminated_at is not None
                    kept = attrs.evolve(record, state="idle", reason=None)
                    assert kept.due(record.terminated_at, grace=self.supervisor.idle_grace)

        trio.from_thread.run(check, trio_token=self.token)


_settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSupervisorStateMachine = SupervisorMachine.TestCase
TestSupervisorStateMachine.settings = _settings
TestEvictingSupervisorStateMachine = EvictingSupervisorMachine.TestCase
TestEvictingSupervisorStateMachine.settings = _settings
TestStoredSupervisorStateMachine = StoredSupervisorMachine.TestCase
TestStoredSupervisorStateMachine.settings = _settings
