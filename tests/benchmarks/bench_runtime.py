"""Benchmark of the session runtime: creation rate, memory per session, mass expiry, scan tick.

Run: ``python tests/benchmarks/bench_runtime.py [--sessions N]``. Prints human
lines, then as its last line one JSON object with the figures.

Goals (issue 7): ``kib_per_session <= 8``; ``sessions_per_s >= 0.8 *
bare_nursery_per_s`` (a bare ``nursery.start`` loop of tasks that each hold a
nursery, the same count, in the same run); ``expire_100k_s <= 2``;
``scan_tick_ms_100k <= 1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from mcp_sessions import SessionState, Settings, Supervisor


def rss_kib() -> int:
    """Current resident set size in KiB (from /proc, so it can go down too)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() // 1024
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def bare_nursery_rate(n: int) -> float:
    """Tasks per second for a bare ``nursery.start`` of a task holding its own nursery."""

    async def holder(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery():
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        for _ in range(n):
            await nursery.start(holder)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return n / elapsed


async def bare_wake_exit_s(n: int) -> float:
    """Trio's floor for mass expiry: wake n parked tasks holding a nursery, until all exit."""
    tasks: list[trio.lowlevel.Task] = []
    done = 0

    async def holder(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal done
        async with trio.open_nursery():
            tasks.append(trio.lowlevel.current_task())
            task_status.started()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
        done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await nursery.start(holder)
        gc.collect()
        t0 = time.perf_counter()
        for task in tasks:
            trio.lowlevel.reschedule(task)
        while done < n:
            await trio.lowlevel.checkpoint()
        return time.perf_counter() - t0


async def runtime_figures(n: int) -> dict[str, float]:
    settings = Settings(
        idle_timeout=1000.0,
        max_sessions=n,
        max_sessions_per_principal=n,
        cleanup_interval=3600.0,  # we tick the scanner by hand
    )
    supervisor = Supervisor(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        gc.collect()
        rss0 = rss_kib()
        t0 = time.perf_counter()
        for i in range(n):
            await supervisor.create_session(principal=f"p{i % 1000}")
        create_s = time.perf_counter() - t0
        gc.collect()
        rss1 = rss_kib()
        assert supervisor.live_count == n

        # One scanner tick with n live, none due.
        ticks = 1000
        t0 = time.perf_counter()
        for _ in range(ticks):
            supervisor.scan_once()
        tick_ms = (time.perf_counter() - t0) / ticks * 1000

        # All idle out at once: jump past the idle timeout, tick, wait until all TERMINATED.
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        clock.jump(settings.idle_timeout + 1)
        t0 = time.perf_counter()
        ended = supervisor.scan_once()
        while supervisor.live_count:
            await trio.lowlevel.checkpoint()
        expire_s = time.perf_counter() - t0
        stats = supervisor.statistics()
        assert ended == n, ended
        assert stats.live_by_state[SessionState.TERMINATING] == 0
        assert stats.terminated[("handle", "idle_timeout")] == n
        await supervisor.shutdown()
    return {
        "sessions_per_s": n / create_s,
        "kib_per_session": (rss1 - rss0) / n,
        "scan_tick_ms_100k": tick_ms,
        "expire_100k_s": expire_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args(argv)
    n = args.sessions
    # As run_stdio does once start-up is over: what exists now stays out of the
    # cyclic collector's full passes (the same for the runtime and the bare loop).
    gc.collect()
    gc.freeze()
    clock = trio.testing.MockClock()
    figures: dict[str, Any] = {"sessions": n}
    figures.update(trio.run(runtime_figures, n, clock=clock))
    figures["bare_nursery_per_s"] = trio.run(bare_nursery_rate, n)
    figures["ratio_vs_bare"] = figures["sessions_per_s"] / figures["bare_nursery_per_s"]
    figures["bare_wake_exit_100k_s"] = trio.run(bare_wake_exit_s, n)
    print(
        f"{n} sessions: {figures['sessions_per_s']:.0f}/s created "
        f"({figures['ratio_vs_bare']:.2f}x a bare nursery.start loop at "
        f"{figures['bare_nursery_per_s']:.0f}/s), {figures['kib_per_session']:.2f} KiB each, "
        f"all expired in {figures['expire_100k_s']:.3f} s (trio's floor, waking as many bare "
        f"tasks: {figures['bare_wake_exit_100k_s']:.3f} s), "
        f"idle scan tick {figures['scan_tick_ms_100k']:.4f} ms",
        file=sys.stderr,
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
