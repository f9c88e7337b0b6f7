"""The runtime's one clock: wall time for people and stores, trio's clock for local timers.

Theory of operation
===================

Local deadlines run on ``trio.current_time()`` (monotonic; ``MockClock``
drives it in tests), so a session held here idles out after its idle timeout
of *elapsed* time whatever the wall clock does. Everything written to a store
or shown to people is wall-clock seconds since the epoch (UTC) from one
injectable ``wall_clock``.

The two meet only in :meth:`RuntimeClock.wall_at` and
:meth:`RuntimeClock.trio_at`, which convert *at the moment of the call*: "5 s
ago on trio's clock" is "5 s before the wall clock's now". Nothing is anchored
at start-up, so after the wall clock steps (a laptop resumes, NTP steps), a
session opened afterwards is written in the new wall time, not in a frame
that ended with the step.

Steps. :meth:`RuntimeClock.check_step` compares how far the two clocks moved
since the last check; when they disagree by more than ``tolerance`` the wall
clock stepped, and every ``on_step`` listener hears by how much (positive:
forward). The store synchronisation then rewrites the activity of the
sessions this process holds in the new wall time, so that a process sweeping
the store does not take their pre-step times for idleness.

Suspends. trio's clock stops while the machine sleeps (``CLOCK_MONOTONIC``),
so a laptop's resume also looks like a forward step, but there real time did
pass: a session idle all night is idle, not "used within its idle timeout".
Where the system has a clock that counts sleep (Linux ``CLOCK_BOOTTIME``),
the part of a jump that it saw too is a suspend: ``on_suspend`` listeners hear
how long it lasted, and the runtime moves its local deadlines that much
earlier. Only the rest, if any, is a step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

__all__ = ["RuntimeClock", "boot_clock"]

logger = logging.getLogger("mcp_sessions")


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


#: A clock that keeps counting while the machine sleeps, if the system has one.
boot_clock: Callable[[], float] | None = _boottime if hasattr(time, "CLOCK_BOOTTIME") else None


class RuntimeClock:
    """Wall time (injectable) and trio time, converted at the moment of use."""

    __slots__ = (
        "_boot",
        "_boot_offset",
        "_listeners",
        "_offset",
        "_sleepers",
        "_trio0",
        "tolerance",
        "wall",
    )

    def __init__(self, wall_clock: Callable[[], float], *, tolerance: float = 1.0) -> None:
        #: The injectable wall clock (seconds since the epoch, UTC).
        self.wall = wall_clock
        #: Disagreement between the clocks, in seconds, that counts as a step.
        self.tolerance = tolerance
        self._boot = boot_clock  # (read when made, so a test may replace it)
        self._trio0 = 0.0
        self._offset = 0.0  # wall - trio at the last check
        self._boot_offset = 0.0  # boot - trio at the last check
        self._listeners: list[Callable[[float], None]] = []
        self._sleepers: list[Callable[[float], None]] = []

    def start(self) -> None:
        self._trio0 = trio.current_time()
        self._offset = self.wall() - self._trio0
        if self._boot is not None:
            self._boot_offset = self._boot() - self._trio0

    @property
    def started_at(self) -> float:
        """Trio time of :meth:`start`."""
        return self._trio0

    def wall_at(self, t: float) -> float:
        """The wall-clock time of trio instant ``t``, as the wall clock reads now."""
        return self.wall() - (trio.current_time() - t)

    def trio_at(self, wall: float) -> float:
        """The trio instant of wall-clock time ``wall``, as the wall clock reads now."""
        return trio.current_time() - (self.wall() - wall)

    def on_step(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(seconds)`` whenever :meth:`check_step` finds a step."""
        self._listeners.append(listener)

    def on_suspend(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(seconds)`` when :meth:`check_step` finds the machine slept."""
        self._sleepers.append(listener)

    def check_step(self) -> float:
        """How far the wall clock stepped since the last check (0.0 if it did not).

        Slow drift (NTP slewing) moves the baseline along without counting. A
        jump that the boot clock saw too is a suspend, reported to ``on_suspend``
        listeners, not a step.
        """
        now = trio.current_time()
        offset = self.wall() - now
        step = offset - self._offset
        self._offset = offset
        if self._boot is not None:
            boot_offset = self._boot() - now
            slept = boot_offset - self._boot_offset
            self._boot_offset = boot_offset
            if slept > self.tolerance and step > 0:
                slept = min(slept, step)
                step -= slept
                logger.info("the machine slept %.3f s", slept)
                for sleeper in self._sleepers:
                    sleeper(slept)
        if abs(step) <= self.tolerance:
            return 0.0
        logger.info("the wall clock stepped %+.3f s", step)
        for listener in self._listeners:
            listener(step)
        return step
