"""The deadline schedule on its own: a container of keys, popped when due, in O(due)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_sessions._deadlines import DeadlineSchedule


def test_keys_come_due_at_their_deadline_not_before() -> None:
    schedule: DeadlineSchedule[str] = DeadlineSchedule(1.0)
    schedule.set("a", 2.5)
    schedule.set("b", 4.0)
    assert schedule.pop_due(2.4) == []
    assert schedule.pop_due(2.5) == ["a"]
    assert "a" not in schedule
    assert schedule.pop_due(3.9) == []
    assert schedule.pop_due(10) == ["b"]
    assert len(schedule) == 0


def test_ensure_by_keeps_an_earlier_entry_and_replaces_a_later_one() -> None:
    schedule: DeadlineSchedule[str] = DeadlineSchedule(1.0)
    schedule.ensure_by("a", 5)
    schedule.ensure_by("a", 9)  # a busy session: no new entry
    assert schedule.deadline("a") == 5
    assert schedule.entries == 1
    schedule.ensure_by("a", 3)
    assert schedule.deadline("a") == 3
    assert schedule.pop_due(4) == ["a"]
    assert schedule.pop_due(100) == []  # the superseded entry is stale, not due


def test_a_cancelled_key_never_comes_due() -> None:
    schedule: DeadlineSchedule[str] = DeadlineSchedule(1.0)
    schedule.set("a", 1)
    schedule.cancel("a")
    schedule.cancel("never-scheduled")
    assert schedule.pop_due(10) == []


def test_stale_entries_are_pruned_so_size_follows_live_keys() -> None:
    schedule: DeadlineSchedule[int] = DeadlineSchedule(1.0)
    for i in range(10_000):
        schedule.set(i, 1000 + i)
        schedule.cancel(i)
    assert len(schedule) == 0
    assert schedule.entries <= 1024
    for i in range(5000):
        schedule.set(i, 50)
        schedule.set(i, 40)  # one stale entry each
    assert schedule.entries <= 2 * len(schedule) + 1024
    assert sorted(schedule.pop_due(45)) == list(range(5000))


def test_a_pop_inside_a_bucket_keeps_what_is_not_due_yet() -> None:
    schedule: DeadlineSchedule[str] = DeadlineSchedule(10.0)
    schedule.set("early", 11)
    schedule.set("late", 19)  # same bucket (10, 20]
    assert schedule.pop_due(15) == ["early"]
    assert schedule.pop_due(18.9) == []
    assert schedule.pop_due(19) == ["late"]


def test_infinite_and_bad_widths() -> None:
    schedule: DeadlineSchedule[str] = DeadlineSchedule(1.0)
    schedule.set("never", math.inf)
    assert schedule.pop_due(1e300) == []
    for width in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="width"):
            DeadlineSchedule(width)


@given(
    width=st.sampled_from([0.1, 1.0, 3.0]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "ensure", "cancel", "pop"]),
            st.integers(0, 20),
            st.floats(0, 100, allow_nan=False),
        ),
        max_size=200,
    ),
)
def test_pops_match_a_plain_dict_model(width: float, ops: list[tuple[str, int, float]]) -> None:
    schedule: DeadlineSchedule[int] = DeadlineSchedule(width)
    model: dict[int, float] = {}
    clock = 0.0
    for op, key, t in ops:
        if op == "set":
            schedule.set(key, t)
            model[key] = t
        elif op == "ensure":
            schedule.ensure_by(key, t)
            model[key] = min(model.get(key, math.inf), t)
        elif op == "cancel":
            schedule.cancel(key)
            model.pop(key, None)
        else:
            clock = max(clock, t)
            due = sorted(schedule.pop_due(clock))
            expected = sorted(k for k, d in model.items() if d <= clock)
            assert due == expected
            for k in expected:
                del model[k]
        assert len(schedule) == len(model)
        for k, d in model.items():
            assert schedule.deadline(k) == d
