"""Bounding the waits on the store while the process stops.

Theory of operation
===================

Stopping writes to the store: the end of the connection session, the last
activity of the sessions kept, the instance's removal, the worker's queue. A
store that is locked (SQLite ``BEGIN IMMEDIATE`` elsewhere, a PostgreSQL row
lock) makes each of those wait out its own timeout, one after the other::

    begin stopping -> limit(now + budget): every wait registered here ends by then
    a second signal / a broken stdout -> abandon(): every wait ends at once

Each wait on the store during a stop runs in :meth:`StoreWaits.bounded`, a
cancel scope this object can move: ones already running (shielded or not) as
well as ones that start later. Acknowledged writes were durable before; an
abandoned write may or may not have happened, as with a crash.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["MIN_STORE_WAIT_S", "StoreWaits"]

#: However short the grace period, an answering store gets this long for a stop's writes.
MIN_STORE_WAIT_S = 1.0


class StoreWaits:
    """A movable deadline shared by every wait on the store while stopping."""

    def __init__(self) -> None:
        self._deadline = math.inf
        self._scopes: set[trio.CancelScope] = set()

    @property
    def abandoned(self) -> bool:
        return self._deadline == -math.inf

    @contextmanager
    def bounded(self, timeout: float = math.inf) -> Iterator[trio.CancelScope]:
        """A scope that ends after ``timeout`` or at the stop deadline, whichever is first."""
        with trio.move_on_after(timeout) as scope:
            scope.deadline = min(scope.deadline, self._deadline)
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def limit(self, deadline: float) -> None:
        """Waits end by ``deadline`` (trio time) from now on: running ones and later ones."""
        self._deadline = min(self._deadline, deadline)
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._deadline)

    def abandon(self) -> None:
        """End every wait now, and any later one at once."""
        self._deadline = -math.inf
        for scope in self._scopes:
            scope.cancel()
