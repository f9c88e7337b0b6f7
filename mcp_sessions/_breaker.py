"""A circuit breaker and a restart backoff, as pure logic: the caller passes the time in.

Theory of operation
===================

:class:`Breaker` has three states. CLOSED lets every call through and
remembers the failures of the last ``window`` seconds; the ``failures``-th
one opens it. OPEN refuses everything for ``cooldown`` seconds; it then reads
as HALF_OPEN, and exactly one call is let through: the probe. The probe's
success closes the breaker (failures forgotten), its failure opens it again
for another cooldown, and a probe with neither outcome (cancelled) lets the
next call probe instead.

:class:`Backoff` spaces restarts: capped exponential delays with full jitter
(a uniform draw in ``[0, min(cap, base * 2**attempts)]``), so that many
gateways restarting one dead upstream do not do it in step.

Neither imports trio: ``now`` is whatever clock the caller uses (the pool
passes ``trio.current_time()``, so a ``MockClock`` drives the tests).
"""

from __future__ import annotations

import collections
import enum
import random

__all__ = ["Backoff", "Breaker", "BreakerState"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Closed / open / half-open; see the module doc."""

    def __init__(self, *, failures: int, window: float, cooldown: float) -> None:
        if failures < 1 or window <= 0 or cooldown <= 0:
            raise ValueError("failures must be >= 1, window and cooldown positive")
        self.failures = failures
        self.window = window
        self.cooldown = cooldown
        self._recent: collections.deque[float] = collections.deque()
        self._opened_at: float | None = None
        self._probing = False
        #: How many times it has opened.
        self.opened = 0

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or now >= self._opened_at + self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, now: float) -> bool:
        """Whether a call may go through now (after the cooldown: once, as the probe)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._probing = True
        return True

    def record_success(self, now: float) -> None:
        if self._opened_at is not None and self._probing:
            self._opened_at = None
            self._probing = False
            self._recent.clear()

    def record_failure(self, now: float) -> None:
        if self._opened_at is not None:
            if self._probing:  # the probe failed: open for another cooldown
                self._probing = False
                self._open(now)
            return
        self._recent.append(now)
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        if len(self._recent) >= self.failures:
            self._open(now)

    def release_probe(self, now: float) -> None:
        """The probe ended with no outcome: the next call may probe."""
        self._probing = False

    def retry_in(self, now: float) -> float:
        """Seconds until :meth:`allow` would let a call through (0 if it would now)."""
        if self._opened_at is None:
            return 0.0
        if self._probing:
            return self.cooldown  # at most: the probe decides first
        return max(0.0, self._opened_at + self.cooldown - now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._recent.clear()
        self.opened += 1


class Backoff:
    """Restart delays: capped exponential, full jitter."""

    def __init__(self, *, base: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, 60))
        self.attempts += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempts = 0
