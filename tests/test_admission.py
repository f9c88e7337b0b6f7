"""Admission and the registry it reads: decisions are values; nothing is done while deciding."""

from __future__ import annotations

import trio
import trio.testing

from mcp_sessions import LimitExceeded, LimitPolicy, Settings, ShuttingDown, open_supervisor
from mcp_sessions._admission import Admit, Evict, Reject, decide
from mcp_sessions._registry import Registry


async def test_decisions_at_and_below_the_limits(autojump_clock: trio.testing.MockClock) -> None:
    settings = Settings(max_sessions=3, max_sessions_per_principal=2)
    async with open_supervisor(settings) as sup:
        a1, _ = await sup.open_handle_session(principal="a")
        registry = Registry(track_idle=False, retention=0)
        registry.add(a1)
        assert decide(registry, settings, "a", admitting=True) == Admit()
        a2, _ = await sup.open_handle_session(principal="a")
        registry.add(a2)
        refused = decide(registry, settings, "a", admitting=True)
        assert isinstance(refused, Reject)
        assert isinstance(refused.error, LimitExceeded)
        assert "principal 'a'" in str(refused.error)
        assert decide(registry, settings, "b", admitting=True) == Admit()
        stopping = decide(registry, settings, "b", admitting=False)
        assert isinstance(stopping, Reject)
        assert isinstance(stopping.error, ShuttingDown)


async def test_eviction_names_the_longest_idle_in_the_full_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = Settings(
        max_sessions=10, max_sessions_per_principal=2, limit_policy=LimitPolicy.EVICT_IDLE
    )
    async with open_supervisor(settings) as sup:
        registry = Registry(track_idle=True, retention=0)
        first, _ = await sup.open_handle_session(principal="a")
        await trio.sleep(1)
        second, _ = await sup.open_handle_session(principal="a")
        other, _ = await sup.open_handle_session(principal="b")
        for s in (first, second, other):
            registry.add(s)
            registry.idle_entered(s)
        assert decide(registry, settings, "a", admitting=True) == Evict(first)
        registry.idle_left(first)  # say it got busy
        assert decide(registry, settings, "a", admitting=True) == Evict(second)
        registry.idle_left(second)
        refused = decide(registry, settings, "a", admitting=True)
        assert isinstance(refused, Reject)
        assert "no session in that scope is idle" in str(refused.error)
        registry.check()


async def test_tombstones_are_kept_for_their_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_supervisor() as sup:
        session, _ = await sup.open_handle_session(principal="a")
        registry = Registry(track_idle=False, retention=10)
        registry.add(session)
        registry.remove(session, terminated_at=1.0, now=0.0)
        assert len(registry) == 0
        assert registry.count_for("a") == 0
        tomb = registry.tombstone(session.id)
        assert tomb is not None
        assert tomb.principal == "a"
        assert session.handle_hash is not None
        assert registry.tombstone_by_hash(session.handle_hash) is tomb
        registry.purge_tombstones(9.9)
        assert registry.tombstone(session.id) is tomb
        registry.purge_tombstones(10)
        assert registry.tombstone(session.id) is None
        assert registry.tombstone_by_hash(session.handle_hash) is None
