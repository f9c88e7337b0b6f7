"""The pool under cancellation, races and the process cap: a :class:`Gateway` run in the
test (``Gateway(config).running()``, calls through ``gateway.pools[name].call``) with real
upstream processes. Each case was a bug found in review; each asserts what users need:
the next call is served, nothing is left running, nothing spins."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import trio
from mcp.client.client import Client

from mcp_sessions import Gateway, Hooks, UpstreamBusy, UpstreamError, parse_gateway_config

from .conftest import PYTHON, ROOT
from .test_gateway import UPSTREAM, alive, config, gateway, status, text


async def pid(client: Client) -> Any:
    return await client.call_tool("pid", {})


async def test_a_call_cancelled_while_its_isolated_session_starts_leaves_no_slot_taken() -> None:
    async with Gateway(config({"isolation": "session", "max": 1})).running() as gw:
        pool = gw.pools["up"]
        with trio.CancelScope() as scope:
            scope.cancel()  # the downstream client cancels the call at its first await
            await pool.call(pid, owner="downstream-a")
        with trio.fail_after(20):
            result = await pool.call(pid, owner="downstream-b")  # not "all 1 are bound"
        assert not result.is_error


async def test_a_call_cancelled_during_the_ping_before_reuse_releases_its_session() -> None:
    async with Gateway(config({"ping_after": 0, "concurrency": 1, "max": 1})).running() as gw:
        pool = gw.pools["up"]
        await pool.call(pid)
        await trio.sleep(0.01)
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.call(pid)
        assert pool.status()["in_use"] == 0
        assert not (await pool.call(pid)).is_error


async def test_a_downstream_cancel_during_a_hung_ping_does_not_wedge_the_pool() -> None:
    cfg = config({"ping_after": 0.2, "concurrency": 1, "max": 1, "queue_timeout": 1})
    async with gateway(cfg) as c:
        first = int(text(await c.call_tool("up__pid", {})))
        await trio.sleep(0.4)  # past ping_after
        os.kill(first, signal.SIGSTOP)
        try:
            with trio.move_on_after(1.0):  # the client gives up: notifications/cancelled
                await c.call_tool("up__echo", {"text": "x"})
        finally:
            os.kill(first, signal.SIGCONT)
        await trio.sleep(0.5)
        assert (await status(c))["up"]["in_use"] == 0
        assert text(await c.call_tool("up__echo", {"text": "y"})) == "y"


async def test_concurrent_first_calls_of_one_session_share_one_upstream_session() -> None:
    async with Gateway(config({"isolation": "session", "max": 4})).running() as gw:
        pool = gw.pools["up"]
        pids: list[int] = []

        async def one() -> None:
            result = await pool.call(pid, owner="downstream-a")
            pids.append(int(result.structured_content["result"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        assert len(set(pids)) == 1, pids
        pool.end_owner("downstream-a")  # the downstream session ends
        with trio.fail_after(10):
            while alive(pids[0]):  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)


async def test_listing_an_isolated_upstream_takes_no_session_slot() -> None:
    async with gateway(config({"isolation": "session", "max": 1})) as c:
        assert not (await c.call_tool("up__pid", {})).is_error


async def test_the_process_cap_holds_under_concurrent_starts() -> None:
    up = {"command": PYTHON, "args": [UPSTREAM], "pool": {"isolation": "session"}}
    cfg = parse_gateway_config({"mcpServers": {"up": up}, "gateway": {"max_processes": 1}})
    async with Gateway(cfg).running() as gw:
        pool = gw.pools["up"]
        pids: list[int] = []
        refused = 0

        async def one(owner: str) -> None:
            nonlocal refused
            try:
                result = await pool.call(pid, owner=owner)
            except UpstreamBusy:
                refused += 1
                return
            pids.append(int(result.structured_content["result"]))

        async with trio.open_nursery() as nursery:
            for owner in ("a", "b", "c"):
                nursery.start_soon(one, owner)
        assert len([p for p in pids if alive(p)]) <= 1
        assert refused == 2


async def test_upkeep_at_the_process_cap_does_not_freeze_the_gateway() -> None:
    # Run in a child process: a spinning upkeep would freeze this test's own event loop.
    script = f"""
import trio
from mcp_sessions import Gateway, parse_gateway_config
a = {{"command": {PYTHON!r}, "args": [{UPSTREAM!r}], "pool": {{"isolation": "session"}}}}
b = {{"command": {PYTHON!r}, "args": [{UPSTREAM!r}], "pool": {{"min": 1}}}}
cfg = parse_gateway_config({{"mcpServers": {{"a": a, "b": b}}, "gateway": {{"max_processes": 1}}}})
async def pid(client):
    return await client.call_tool("pid", {{}})
async def main():
    async with Gateway(cfg).running() as gw:
        while not gw.pools["b"].status()["sessions"]["idle"]:
            await trio.sleep(0.05)
        # A downstream session's call on a evicts b's idle warm session; b must not spin.
        await gw.pools["a"].call(pid, owner="downstream-1")
        await trio.sleep(1.5)
    print("exited cleanly", flush=True)
trio.run(main)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(30):
        done = await trio.run_process(
            [PYTHON, "-c", script], capture_stdout=True, capture_stderr=True, env=env, check=False
        )
    assert "exited cleanly" in done.stdout.decode(), done.stderr.decode()[-2000:]


FLAP = (
    "import os, runpy, sys, threading; threading.Timer(0.5, lambda: os._exit(1)).start(); "
    f"sys.argv = ['x']; runpy.run_path({UPSTREAM!r}, run_name='__main__')"
)


async def test_an_upstream_that_keeps_dying_is_not_redialled_in_a_loop() -> None:
    up = {
        "command": PYTHON,
        "args": ["-c", FLAP],
        "pool": {"min": 1},
        "breaker": {"failures": 3, "window": 60, "cooldown": 600, "backoff_base": 0.2},
    }
    async with Gateway(parse_gateway_config({"mcpServers": {"up": up}})).running() as gw:
        await trio.sleep(8)  # nobody calls
        up_status = gw.pools["up"].status()
        assert up_status["started"] == 3  # each death backs off; the third opens the breaker
        assert up_status["breaker"] == "open"


async def test_a_session_that_ends_while_its_upstream_starts_leaves_no_upstream() -> None:
    async def slow_setup(session: Any) -> None:
        await trio.sleep(0.5)  # the upstream session is being created for a while

    gateway_ = Gateway(config({"isolation": "session"}), hooks=Hooks(setup=slow_setup))
    async with gateway_.running() as gw:
        pool = gw.pools["up"]
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                with contextlib.suppress(UpstreamError):
                    await pool.call(pid, owner="gone")

            nursery.start_soon(call)
            await trio.sleep(0.1)  # its upstream session is being created
            pool.end_owner("gone")  # the downstream session ends
        with trio.fail_after(10):
            while pool.status()["pids"]:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)
