"""The transition table: structure, invariants, and the README diagram."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_sessions import _diagram
from mcp_sessions._state import (
    TERMINATION_EVENTS,
    TRANSITIONS,
    Event,
    InvalidTransition,
    SessionState,
    TerminationReason,
    apply,
    ready_event,
    reason_for,
    render_mermaid,
)

from .strategies import events, states

S, E = SessionState, Event
README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(SessionState)


def test_terminated_is_absorbing() -> None:
    assert TRANSITIONS[S.TERMINATED] == {}
    for event in Event:
        with pytest.raises(InvalidTransition):
            apply(S.TERMINATED, event)


def test_only_terminating_reaches_terminated() -> None:
    sources = {
        source
        for source, row in TRANSITIONS.items()
        for target in row.values()
        if target is S.TERMINATED
    }
    assert sources == {S.TERMINATING}


def test_terminating_only_finishes_teardown() -> None:
    assert dict(TRANSITIONS[S.TERMINATING]) == {E.TEARDOWN_DONE: S.TERMINATED}


@pytest.mark.parametrize("reason", list(TerminationReason))
@pytest.mark.parametrize("state", [S.ACTIVE, S.IDLE])
def test_running_session_ends_for_every_reason(
    state: SessionState, reason: TerminationReason
) -> None:
    assert apply(state, TERMINATION_EVENTS[reason]) is S.TERMINATING
    assert reason_for(TERMINATION_EVENTS[reason]) is reason


def test_initializing_session_cannot_idle_out_or_be_evicted() -> None:
    for event in (E.IDLE_TIMEOUT, E.EVICT, E.REQUEST_STARTED, E.LAST_REQUEST_FINISHED):
        with pytest.raises(InvalidTransition):
            apply(S.INITIALIZING, event)
    for event in (E.ERROR, E.CLOSE, E.SHUTDOWN, E.DISCONNECT):
        assert apply(S.INITIALIZING, event) is S.TERMINATING


def test_ready_depends_on_requests_in_flight() -> None:
    assert apply(S.INITIALIZING, ready_event(0)) is S.IDLE
    assert apply(S.INITIALIZING, ready_event(1)) is S.ACTIVE


def test_request_events_move_between_idle_and_active() -> None:
    assert apply(S.IDLE, E.REQUEST_STARTED) is S.ACTIVE
    assert apply(S.ACTIVE, E.LAST_REQUEST_FINISHED) is S.IDLE
    with pytest.raises(InvalidTransition):
        apply(S.ACTIVE, E.REQUEST_STARTED)
    with pytest.raises(InvalidTransition):
        apply(S.IDLE, E.LAST_REQUEST_FINISHED)


def test_every_reason_has_exactly_one_event() -> None:
    assert set(TERMINATION_EVENTS) == set(TerminationReason)
    assert len(set(TERMINATION_EVENTS.values())) == len(TerminationReason)
    assert reason_for(E.READY) is None


@given(state=states, event=events)
def test_apply_follows_the_table_or_raises_with_state_unchanged(
    state: SessionState, event: Event
) -> None:
    before = state
    if event in TRANSITIONS[state]:
        assert apply(state, event) is TRANSITIONS[state][event]
    else:
        with pytest.raises(InvalidTransition) as info:
            apply(state, event)
        assert info.value.state is state
        assert info.value.event is event
        assert state.value in str(info.value)
        assert event.value in str(info.value)
    assert state is before


@given(st.lists(events, max_size=40))
def test_any_event_sequence_keeps_terminated_absorbing(sequence: list[Event]) -> None:
    state = S.INITIALIZING
    history = [state]
    for event in sequence:
        try:
            state = apply(state, event)
        except InvalidTransition:
            continue
        history.append(state)
    if S.TERMINATED in history:
        first = history.index(S.TERMINATED)
        assert set(history[first:]) == {S.TERMINATED}
        assert history[first - 1] is S.TERMINATING


def test_readme_diagram_matches_the_table() -> None:
    text = README.read_text(encoding="utf-8")
    assert _diagram.current_block(text) == _diagram.render_block(), (
        "README state diagram is stale: run python -m mcp_sessions._diagram"
    )


def test_diagram_has_an_edge_for_every_table_entry() -> None:
    diagram = render_mermaid()
    for source, row in TRANSITIONS.items():
        for event, target in row.items():
            edge = next(
                line
                for line in diagram.splitlines()
                if line.strip().startswith(f"{source.name} --> {target.name}:")
            )
            labels = [part.strip() for part in edge.split(":", 1)[1].split(",")]
            assert event.value in labels


def test_diagram_check_mode_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{_diagram.START}\n```mermaid\nold\n```\n{_diagram.END}\n", "utf-8")
    assert _diagram.main([str(stale), "--check"]) == 1
    assert _diagram.main([str(stale)]) == 0
    assert _diagram.main([str(stale), "--check"]) == 0
    assert render_mermaid() in stale.read_text("utf-8")
