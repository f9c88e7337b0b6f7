"""What the store knows of one session: the ``_sync`` record under a store.

Theory of operation
===================

A session kept in a store carries a :class:`_Stored` in ``Session._sync``
from the moment its record is inserted (or it is brought in from one). Only
the store synchronisation writes it: :class:`~mcp_sessions._sync_store.DurableSync`
and its activity writer, and the expiry jobs of
:mod:`mcp_sessions._sync_expiry`, which are handed sessions, never the sync. It
lives apart from both so that neither imports the other for it.
"""

from __future__ import annotations

import trio

from ._session import Session

__all__: list[str] = []


class _Stored:
    """What the store knows of one session (``Session._sync`` under :class:`DurableSync`)."""

    __slots__ = (
        "closing",
        "creating",
        "doubts",
        "end_written",
        "epoch",
        "flushed_errors",
        "flushed_requests",
        "known_active",
        "ready_written",
        "reframe",
    )

    def __init__(
        self, *, requests: int = 0, errors: int = 0, ready: bool = True, known_active: float = 0.0
    ) -> None:
        #: Set while one caller writes a close; the others wait for it.
        self.closing: trio.Event | None = None
        #: Set while the record is being inserted; patches wait for it.
        self.creating: trio.Event | None = None
        #: Writes of ours whose outcome is unknown (given up on, or conflicting):
        #: a resolve that read the store before one of them must not vouch for
        #: our copy.
        self.doubts = 0
        #: The store already has this session's end.
        self.end_written = False
        #: The store's change epoch when the session was last checked against it;
        #: ``None`` (read the store on next use) until checked, and whenever a
        #: write's outcome is unknown.
        self.epoch: int | None = None
        #: Counters as last written.
        self.flushed_requests = requests
        self.flushed_errors = errors
        #: Its record is past ``initializing``.
        self.ready_written = ready
        #: The latest ``last_active`` this process wrote or read for it: a later
        #: one in the store is someone else's use.
        self.known_active = known_active
        #: The wall clock stepped: the next touch writes its lifetime again too.
        self.reframe = False


def _stored(session: Session) -> _Stored | None:
    st = session._sync
    return st if isinstance(st, _Stored) else None
