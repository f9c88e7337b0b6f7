"""The deadline schedule: which keys are due at a time, in O(due).

Theory of operation
===================

Like trio's own ``Deadlines`` (``trio/_core/_run.py``), a container of its
own: the objects it schedules carry no scheduler fields, and it holds only
their *keys* (session ids), never the objects, so an entry left behind can
keep nothing alive.

It is a timing wheel on the scanner's grid. Bucket ``k`` holds the entries
``(deadline, seq, key)`` with ``(k - 1) * width < deadline <= k * width``; a
scan at time ``t`` opens the buckets with ``(k - 1) * width < t``, a small
heap of bucket numbers finding the earliest. Every entry of a bucket wholly
in the past is due, so a scan costs O(entries due), with no log factor per
entry; one that falls inside a bucket keeps its not-yet-due entries for
later. A key has one *current* entry (its ``seq`` in ``_current``); older
entries are stale and skipped. Invalidation is lazy, and when stale entries
outnumber current ones the buckets are rebuilt (amortised O(1) per change),
so the container's size is bounded by the live keys, not by their history.

:meth:`ensure_by` is what makes busy sessions cheap: it adds an entry only
if the current one is *later* than asked, so a session in use does not add
an entry per request; an entry that turns out early is rescheduled by
whoever pops it (the scanner asks the expiry rule again).

Pure data: no trio, no I/O, no clock of its own.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DeadlineSchedule"]

K = TypeVar("K", bound=Hashable)

#: Rebuild when at least this many stale entries have piled up (and they
#: outnumber the current ones): small schedules are never rebuilt.
_MIN_PRUNE = 1024


class DeadlineSchedule(Generic[K]):
    """Keys with deadlines, popped when due, on a grid of ``width``."""

    __slots__ = ("_bucket_keys", "_buckets", "_current", "_seq", "_stale", "width")

    def __init__(self, width: float) -> None:
        if not width > 0 or math.isinf(width):
            raise ValueError(f"width must be a positive finite number, not {width!r}")
        self.width = width
        self._current: dict[K, tuple[float, int]] = {}
        self._buckets: dict[int, list[tuple[float, int, K]]] = {}
        self._bucket_keys: list[int] = []
        self._seq = 0
        self._stale = 0

    def __len__(self) -> int:
        """Keys with a deadline."""
        return len(self._current)

    def __contains__(self, key: object) -> bool:
        return key in self._current

    @property
    def entries(self) -> int:
        """Entries held, stale ones included (bounded by about twice the keys)."""
        return len(self._current) + self._stale

    def deadline(self, key: K) -> float | None:
        """The key's current deadline, or ``None``."""
        entry = self._current.get(key)
        return entry[0] if entry is not None else None

    def ensure_by(self, key: K, deadline: float) -> None:
        """Make sure ``key`` comes due no later than ``deadline``.

        Keeps an earlier entry (it is rescheduled when it pops); replaces a
        later one.
        """
        current = self._current.get(key)
        if current is not None:
            if current[0] <= deadline:
                return
            self._stale += 1
        self._add(key, deadline)

    def set(self, key: K, deadline: float) -> None:
        """Give ``key`` exactly this deadline."""
        if self._current.get(key) is not None:
            self._stale += 1
        self._add(key, deadline)

    def cancel(self, key: K) -> None:
        """Forget ``key`` (its entry becomes stale). No-op if it has none."""
        if self._current.pop(key, None) is not None:
            self._stale += 1
            self._maybe_prune()

    def pop_due(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is at or before ``now``."""
        keys, buckets, width, current = self._bucket_keys, self._buckets, self.width, self._current
        due: list[K] = []
        later: list[tuple[float, int, K]] = []
        while keys and (keys[0] - 1) * width < now:
            for entry in buckets.pop(heapq.heappop(keys)):
                at, seq, key = entry
                held = current.get(key)
                if held is None or held[1] != seq:
                    self._stale -= 1  # superseded or cancelled
                elif at > now:
                    later.append(entry)  # its bucket has begun, it has not
                else:
                    del current[key]
                    due.append(key)
        # Filed after the loop: float rounding could put one back into a
        # bucket this very loop would open again.
        for entry in later:
            self._file(entry)
        return due

    def next_deadline(self) -> float:
        """A lower bound on the earliest deadline (``inf`` when empty)."""
        if not self._bucket_keys:
            return math.inf
        return (self._bucket_keys[0] - 1) * self.width

    # -- internals ---------------------------------------------------------------

    def _add(self, key: K, deadline: float) -> None:
        self._seq += 1
        self._current[key] = (deadline, self._seq)
        self._file((deadline, self._seq, key))
        self._maybe_prune()

    def _file(self, entry: tuple[float, int, K]) -> None:
        bucket_key = math.ceil(entry[0] / self.width) if entry[0] < math.inf else 2**62
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            self._buckets[bucket_key] = [entry]
            heapq.heappush(self._bucket_keys, bucket_key)
        else:
            bucket.append(entry)

    def _maybe_prune(self) -> None:
        if self._stale < _MIN_PRUNE or self._stale <= len(self._current):
            return
        self._buckets.clear()
        self._bucket_keys.clear()
        self._stale = 0
        for key, (deadline, seq) in self._current.items():
            self._file((deadline, seq, key))
