"""Metric cells, their frozen snapshot, and the Prometheus exposition.

Every metric the runtime keeps is a plain number in :class:`RuntimeMetrics`,
updated synchronously by the runtime between two checkpoints. Under trio's
cooperative scheduling such an update cannot interleave with another task, so
these cells need no lock; a ``trio.Lock`` guards a cell only where one update
spans an ``await`` (the store latency cells of the persistence layer).

:class:`RuntimeStatistics` is the one read path: a frozen snapshot, taken in
one synchronous step so its numbers agree with each other. The Prometheus text
is rendered from a snapshot, never from the live cells.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._state import SessionState

__all__ = [
    "DURATION_BUCKETS",
    "Histogram",
    "HistogramSnapshot",
    "RuntimeMetrics",
    "RuntimeStatistics",
    "render_prometheus",
]

#: Request duration buckets, in seconds (upper bounds; +Inf is implicit).
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@attrs.frozen
class HistogramSnapshot:
    """A histogram at one moment."""

    #: Upper bounds of the buckets, ascending; the implicit last bucket is +Inf.
    buckets: tuple[float, ...]
    #: Observations per bucket (not cumulative); one more entry than ``buckets`` (the +Inf one).
    counts: tuple[int, ...]
    #: Sum of all observed values.
    total: float

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)


class Histogram:
    """A fixed-bucket histogram cell."""

    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.buckets, tuple(self.counts), self.total)


class RuntimeMetrics:
    """The runtime's live metric cells. Read them through :class:`RuntimeStatistics`."""

    __slots__ = (
        "background_errors",
        "cleanup_errors",
        "cleanup_runs",
        "created",
        "expired",
        "handle_validations",
        "hook_errors",
        "live",
        "observer_dropped",
        "request_duration",
        "request_errors",
        "requests",
        "terminated",
    )

    def __init__(self) -> None:
        self.created: dict[str, int] = {}
        self.terminated: dict[tuple[str, str], int] = {}
        self.live: dict[SessionState, int] = dict.fromkeys(SessionState, 0)
        self.requests = 0
        self.request_errors = 0
        self.request_duration = Histogram()
        self.cleanup_runs = 0
        self.cleanup_errors = 0
        self.expired = 0
        self.hook_errors: dict[str, int] = {}
        self.observer_dropped = 0
        self.background_errors = 0
        self.handle_validations: dict[str, int] = {}

    @staticmethod
    def bump(cells: dict[str, int], key: str, by: int = 1) -> None:
        cells[key] = cells.get(key, 0) + by


@attrs.frozen(kw_only=True)
class RuntimeStatistics:
    """A consistent snapshot of the runtime's metrics (``Supervisor.statistics()``)."""

    #: Sessions created, by kind (``connection``/``handle``).
    created: Mapping[str, int]
    #: Sessions that reached TERMINATED, by ``(kind, reason)``.
    terminated: Mapping[tuple[str, str], int]
    #: Sessions in the live registry now, by state (TERMINATED is always 0).
    live_by_state: Mapping[SessionState, int]
    #: Requests that finished, in every session.
    requests: int
    #: Requests that finished with an error (including cancellation by termination).
    request_errors: int
    #: Request durations, in seconds.
    request_duration: HistogramSnapshot
    #: Cleanup scanner ticks.
    cleanup_runs: int
    #: Failures while expiring a session or purging tombstones (each is logged).
    cleanup_errors: int
    #: Sessions the scanner ended for ``idle_timeout`` or ``lifetime_exceeded``.
    expired: int
    #: Hook failures and timeouts, by hook (``setup``, ``teardown``, ``observer``).
    hook_errors: Mapping[str, int]
    #: Observer events dropped because the bounded queue was full.
    observer_dropped: int
    #: Session background tasks that raised (each ended its session with ``error``).
    background_errors: int
    #: Handle lookups by outcome (``ok``, ``not_found``, ``gone``).
    handle_validations: Mapping[str, int]
    #: Terminated sessions still remembered as tombstones.
    tombstones: int
    #: Seconds since the runtime started (trio clock).
    uptime: float

    @property
    def live(self) -> int:
        """Sessions in the live registry now."""
        return sum(self.live_by_state.values())

    @property
    def created_total(self) -> int:
        return sum(self.created.values())

    @property
    def terminated_total(self) -> int:
        return sum(self.terminated.values())

    @classmethod
    def from_cells(
        cls, cells: RuntimeMetrics, *, tombstones: int, uptime: float
    ) -> RuntimeStatistics:
        return cls(
            created=MappingProxyType(dict(cells.created)),
            terminated=MappingProxyType(dict(cells.terminated)),
            live_by_state=MappingProxyType(dict(cells.live)),
            requests=cells.requests,
            request_errors=cells.request_errors,
            request_duration=cells.request_duration.snapshot(),
            cleanup_runs=cells.cleanup_runs,
            cleanup_errors=cells.cleanup_errors,
            expired=cells.expired,
            hook_errors=MappingProxyType(dict(cells.hook_errors)),
            observer_dropped=cells.observer_dropped,
            background_errors=cells.background_errors,
            handle_validations=MappingProxyType(dict(cells.handle_validations)),
            tombstones=tombstones,
            uptime=uptime,
        )


class _SnapshotCollector(Collector):
    def __init__(self, stats: RuntimeStatistics) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        live = GaugeMetricFamily(
            "mcp_sessions_live", "Sessions in the live registry, by state", labels=["state"]
        )
        for state in SessionState:
            if state is not SessionState.TERMINATED:
                live.add_metric([state.value], s.live_by_state.get(state, 0))
        yield live

        created = CounterMetricFamily(
            "mcp_sessions_created", "Sessions created, by kind", labels=["kind"]
        )
        for kind, n in sorted(s.created.items()):
            created.add_metric([kind], n)
        yield created

        terminated = CounterMetricFamily(
            "mcp_sessions_terminated",
            "Sessions terminated, by kind and reason",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(s.terminated.items()):
            terminated.add_metric([kind, reason], n)
        yield terminated

        yield CounterMetricFamily(
            "mcp_session_requests", "Requests handled in sessions", value=s.requests
        )
        yield CounterMetricFamily(
            "mcp_session_errors", "Requests in sessions that ended in an error",
            value=s.request_errors,
        )  # fmt: skip

        hist = s.request_duration
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily(
            "mcp_session_request_duration_seconds",
            "Duration of requests in sessions",
            buckets=cumulative,
            sum_value=hist.total,
        )

        yield CounterMetricFamily("mcp_cleanup_runs", "Cleanup scanner ticks", value=s.cleanup_runs)
        yield CounterMetricFamily(
            "mcp_cleanup_errors", "Errors during cleanup", value=s.cleanup_errors
        )
        yield CounterMetricFamily(
            "mcp_sessions_expired", "Sessions ended by the cleanup scanner", value=s.expired
        )
        hooks = CounterMetricFamily(
            "mcp_hook_errors", "Hook failures and timeouts, by hook", labels=["hook"]
        )
        for hook, n in sorted(s.hook_errors.items()):
            hooks.add_metric([hook], n)
        yield hooks
        yield CounterMetricFamily(
            "mcp_hook_events_dropped",
            "Observer events dropped because the queue was full",
            value=s.observer_dropped,
        )
        yield CounterMetricFamily(
            "mcp_session_background_errors",
            "Session background tasks that raised",
            value=s.background_errors,
        )
        validations = CounterMetricFamily(
            "mcp_handle_validations", "Handle lookups, by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(s.handle_validations.items()):
            validations.add_metric([outcome], n)
        yield validations
        yield GaugeMetricFamily(
            "mcp_sessions_tombstones", "Terminated sessions remembered", value=s.tombstones
        )


def render_prometheus(stats: RuntimeStatistics, extra: Iterable[Collector] = ()) -> str:
    """Prometheus text exposition of one statistics snapshot (and of ``extra`` collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(stats))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry).decode("utf-8")
