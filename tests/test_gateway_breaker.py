"""The circuit breaker and the restart backoff, as pure logic (time passed in)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mcp_sessions._breaker import Backoff, Breaker, BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def test_failures_within_the_window_open_it_and_older_ones_are_forgotten() -> None:
    b = Breaker(failures=3, window=10, cooldown=5)
    b.record_failure(0)
    b.record_failure(5)
    b.record_failure(10.5)  # the one at 0 has left the window
    assert b.state(10.5) is CLOSED
    assert b.allow(10.5)
    b.record_failure(11)
    assert b.state(11) is OPEN
    assert b.opened == 1


def test_open_fails_fast_then_admits_exactly_one_probe() -> None:
    b = Breaker(failures=1, window=10, cooldown=5)
    b.record_failure(0)
    assert not b.allow(1)
    assert b.retry_in(1) == 4
    assert b.state(5) is HALF_OPEN
    assert b.retry_in(5) == 0
    assert b.allow(5)
    assert not b.allow(5.1)
    assert b.state(5.1) is HALF_OPEN


def test_a_successful_probe_closes_it() -> None:
    b = Breaker(failures=2, window=10, cooldown=5)
    b.record_failure(0)
    b.record_failure(0)
    assert b.allow(6)
    b.record_success(6)
    assert b.state(6) is CLOSED
    b.record_failure(7)  # the history was cleared: one failure is not enough
    assert b.state(7) is CLOSED


def test_a_failed_probe_reopens_it_for_a_fresh_cooldown() -> None:
    b = Breaker(failures=1, window=10, cooldown=5)
    b.record_failure(0)
    assert b.allow(5)
    b.record_failure(6)
    assert b.state(6) is OPEN
    assert not b.allow(10)
    assert b.state(11) is HALF_OPEN
    assert b.opened == 2


def test_a_probe_without_an_outcome_lets_the_next_call_probe() -> None:
    b = Breaker(failures=1, window=10, cooldown=5)
    b.record_failure(0)
    assert b.allow(5)
    b.release_probe(5)
    assert b.allow(5)


def test_success_while_closed_changes_nothing() -> None:
    b = Breaker(failures=2, window=10, cooldown=5)
    b.record_failure(0)
    b.record_success(1)
    b.record_failure(2)
    assert b.state(2) is OPEN


@given(st.lists(st.tuples(st.sampled_from(["allow", "ok", "fail", "release"]),
                          st.floats(0, 5)), max_size=60))  # fmt: skip
def test_never_more_than_one_probe_at_a_time(steps: list[tuple[str, float]]) -> None:
    b = Breaker(failures=2, window=10, cooldown=3)
    now = 0.0
    probes = 0
    for action, dt in steps:
        now += dt
        was_half_open = b.state(now) is HALF_OPEN
        if action == "allow":
            if b.allow(now) and was_half_open:
                probes += 1
            assert probes <= 1
        elif action == "ok":
            b.record_success(now)
            probes = 0
        elif action == "fail":
            b.record_failure(now)
            probes = 0
        else:
            b.release_probe(now)
            probes = 0
        assert b.retry_in(now) >= 0


def test_backoff_grows_exponentially_and_is_capped() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(base=0.5, cap=4, rng=Top())
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff.attempts == 6
    backoff.reset()
    assert backoff.next_delay() == 0.5


@given(st.integers(0, 10_000), st.integers(0, 200))
def test_backoff_delays_stay_within_zero_and_the_cap(seed: int, draws: int) -> None:
    backoff = Backoff(base=0.1, cap=30, rng=random.Random(seed))
    for attempt in range(draws):
        delay = backoff.next_delay()
        assert 0 <= delay <= min(30, 0.1 * 2**attempt)
