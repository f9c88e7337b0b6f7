"""The runtime's two clocks: trio's (local timers) and the wall clock (people and stores).

Local deadlines run on ``trio.current_time()``, so ``MockClock`` drives them.
Times shown to people or written to a store are wall-clock seconds since the
epoch from one injectable ``wall_clock``. :class:`RuntimeClock` maps between
the two from one reading of both, taken when the runtime starts.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = ["RuntimeClock"]


class RuntimeClock:
    """Trio time <-> wall time, anchored at :meth:`start`."""

    __slots__ = ("_trio0", "_wall0", "wall")

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        #: The injectable wall clock (seconds since the epoch).
        self.wall = wall_clock
        self._trio0 = 0.0
        self._wall0 = 0.0

    def start(self) -> None:
        self._trio0 = trio.current_time()
        self._wall0 = self.wall()

    @property
    def started_at(self) -> float:
        """Trio time of :meth:`start`."""
        return self._trio0

    def wall_at(self, t: float) -> float:
        """Wall-clock time for a trio-clock instant."""
        return self._wall0 + (t - self._trio0)

    def trio_at(self, wall: float) -> float:
        """Trio-clock instant for a wall-clock time."""
        return self._trio0 + (wall - self._wall0)
