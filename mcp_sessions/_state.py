"""The session state machine, as data.

Theory of operation
===================

A session moves through five states::

    INITIALIZING -> IDLE <-> ACTIVE -> TERMINATING -> TERMINATED

Everything that decides *whether* a move is allowed lives in this module, and
as much of it as possible lives in one table, :data:`TRANSITIONS`, keyed by
``(state, event)``. :func:`apply` is the only function that computes a new
state; a pair missing from the table raises :class:`InvalidTransition` and the
caller's state is left exactly as it was (we return a new value rather than
mutating anything, so "unchanged" is structural, not a promise).

The runtime (``mcp_sessions._runtime``) owns the *when*: it feeds events here
and stores the result. It applies ``REQUEST_STARTED`` only on the first
in-flight request and ``LAST_REQUEST_FINISHED`` only when the count drops back
to zero, so outside INITIALIZING and the terminal pair, ``state is ACTIVE``
exactly when requests are in flight.

Two facts do not fit a plain ``(state, event)`` table and are encoded as
distinct events instead of conditions:

* leaving INITIALIZING depends on whether a request is already in flight (a
  handshake-era ``initialize`` may still be running when
  ``notifications/initialized`` arrives): ``READY`` goes to IDLE and
  ``READY_BUSY`` to ACTIVE; :func:`ready_event` picks one.
* every termination reason is its own event, so the table says which reasons
  are possible in which state (an INITIALIZING session cannot idle out: its
  idle clock only starts on entering IDLE).

This module imports no trio and has no I/O: it is safe to use anywhere,
including the property tests and the script that renders the README diagram.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "TERMINATION_EVENTS",
    "TRANSITIONS",
    "Event",
    "InvalidTransition",
    "SessionState",
    "TerminationReason",
    "apply",
    "ready_event",
    "reason_for",
    "render_mermaid",
    "termination_event",
]


class SessionState(enum.Enum):
    """Where a session is in its life."""

    # Members are singletons compared by identity, so identity hashing is
    # correct, and it is a C slot: these are hashed on every transition.
    __hash__ = object.__hash__

    INITIALIZING = "initializing"
    ACTIVE = "active"
    IDLE = "idle"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


class TerminationReason(enum.Enum):
    """Why a session ended. Recorded once, on entering TERMINATING."""

    # Members are singletons compared by identity, so identity hashing is
    # correct, and it is a C slot: these are hashed on every transition.
    __hash__ = object.__hash__

    CLOSED = "closed"
    IDLE_TIMEOUT = "idle_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    DISCONNECTED = "disconnected"
    EVICTED = "evicted"
    ERROR = "error"
    SHUTDOWN = "shutdown"


class Event(enum.Enum):
    """Everything that can happen to a session."""

    # Members are singletons compared by identity, so identity hashing is
    # correct, and it is a C slot: these are hashed on every transition.
    __hash__ = object.__hash__

    READY = "ready"
    READY_BUSY = "ready_busy"
    REQUEST_STARTED = "request_started"
    LAST_REQUEST_FINISHED = "last_request_finished"
    CLOSE = "close"
    IDLE_TIMEOUT = "idle_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    DISCONNECT = "disconnect"
    EVICT = "evict"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    TEARDOWN_DONE = "teardown_done"


#: The event that ends a session for each reason.
TERMINATION_EVENTS: Mapping[TerminationReason, Event] = MappingProxyType(
    {
        TerminationReason.CLOSED: Event.CLOSE,
        TerminationReason.IDLE_TIMEOUT: Event.IDLE_TIMEOUT,
        TerminationReason.LIFETIME_EXCEEDED: Event.LIFETIME_EXCEEDED,
        TerminationReason.DISCONNECTED: Event.DISCONNECT,
        TerminationReason.EVICTED: Event.EVICT,
        TerminationReason.ERROR: Event.ERROR,
        TerminationReason.SHUTDOWN: Event.SHUTDOWN,
    }
)
_REASONS_BY_EVENT = {event: reason for reason, event in TERMINATION_EVENTS.items()}
_TERMINATION_EVENTS = dict(TERMINATION_EVENTS)


def termination_event(reason: TerminationReason) -> Event:
    """The event that ends a session for ``reason``."""
    return _TERMINATION_EVENTS[reason]


_S = SessionState
_E = Event

# Reasons a session that is up and running (ACTIVE or IDLE) may end for.
_RUNNING_ENDS = dict.fromkeys(TERMINATION_EVENTS.values(), _S.TERMINATING)

#: The whole transition table: ``(state, event) -> new state``. Anything not
#: here is invalid. TERMINATED has no row: it is absorbing.
TRANSITIONS: Mapping[SessionState, Mapping[Event, SessionState]] = MappingProxyType(
    {
        _S.INITIALIZING: MappingProxyType(
            {
                _E.READY: _S.IDLE,
                _E.READY_BUSY: _S.ACTIVE,
                _E.ERROR: _S.TERMINATING,
                _E.CLOSE: _S.TERMINATING,
                _E.SHUTDOWN: _S.TERMINATING,
                _E.DISCONNECT: _S.TERMINATING,
                _E.LIFETIME_EXCEEDED: _S.TERMINATING,
            }
        ),
        _S.IDLE: MappingProxyType({_E.REQUEST_STARTED: _S.ACTIVE, **_RUNNING_ENDS}),
        _S.ACTIVE: MappingProxyType({_E.LAST_REQUEST_FINISHED: _S.IDLE, **_RUNNING_ENDS}),
        _S.TERMINATING: MappingProxyType({_E.TEARDOWN_DONE: _S.TERMINATED}),
        _S.TERMINATED: MappingProxyType({}),
    }
)

# The same table as plain dicts, for the hot path (a read-only proxy costs a
# little on every lookup).
_TABLE = {state: dict(row) for state, row in TRANSITIONS.items()}


class InvalidTransition(Exception):
    """An event arrived in a state that does not accept it.

    The state it was applied to is unchanged.
    """

    def __init__(self, state: SessionState, event: Event) -> None:
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "nothing (terminal state)"
        super().__init__(
            f"cannot apply {event.value!r} to a session in state {state.value!r}; "
            f"that state accepts: {allowed}"
        )
        self.state = state
        self.event = event


def apply(state: SessionState, event: Event) -> SessionState:
    """Return the state that ``event`` moves ``state`` to.

    Raises :class:`InvalidTransition` when the table has no such move.
    """
    try:
        return _TABLE[state][event]
    except KeyError:
        raise InvalidTransition(state, event) from None


def ready_event(in_flight: int) -> Event:
    """The event that leaves INITIALIZING, given the number of requests in flight."""
    return _E.READY_BUSY if in_flight else _E.READY


def reason_for(event: Event) -> TerminationReason | None:
    """The termination reason an event stands for, or ``None`` if it ends nothing."""
    return _REASONS_BY_EVENT.get(event)


def render_mermaid() -> str:
    """The state diagram as a Mermaid ``stateDiagram-v2``, generated from :data:`TRANSITIONS`.

    Edges that share a source and target are merged into one labelled edge, in
    table order, so the output is stable.
    """
    lines = ["stateDiagram-v2", f"    [*] --> {_S.INITIALIZING.name}"]
    for source, row in TRANSITIONS.items():
        merged: dict[SessionState, list[str]] = {}
        for event, target in row.items():
            merged.setdefault(target, []).append(event.value)
        for target, events in merged.items():
            lines.append(f"    {source.name} --> {target.name}: {', '.join(events)}")
    lines.append(f"    {_S.TERMINATED.name} --> [*]")
    return "\n".join(lines) + "\n"
