"""The gateway end to end: the official client, the gateway in process (over an in-memory
stdio pair), and real upstream processes (``tests/gateway_upstream.py``, the examples).

Processes, not mocks: every upstream here is a child process the gateway starts, and what
the tests check about them (reuse, isolation, crash, cleanup) is checked by pid.
``test_gateway_processes.py`` runs the ``mcp-sessions gateway`` command itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp.client.client import Client
from mcp_types import CallToolResult, TextResourceContents

from mcp_sessions._breaker import Breaker, BreakerState
from mcp_sessions._gateway import serve_gateway
from mcp_sessions._gateway_config import GatewayConfig, parse_config

from ._wire import connect_in_process
from .conftest import PYTHON, ROOT
from .test_server_e2e import error_code, ok

UPSTREAM = str(ROOT / "tests" / "gateway_upstream.py")


def config(
    pool: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
    **more: dict[str, Any],
) -> GatewayConfig:
    up: dict[str, Any] = {"command": PYTHON, "args": [UPSTREAM, *args]}
    if pool:
        up["pool"] = pool
    if breaker:
        up["breaker"] = breaker
    return parse_config({"mcpServers": {"up": up, **more}})


@asynccontextmanager
async def gateway(
    cfg: GatewayConfig, mode: str = "legacy", *, message_handler: Any = None, **options: Any
) -> AsyncIterator[Client]:
    """The official client connected to the gateway for ``cfg``, served in this process."""
    serve = partial(serve_gateway, cfg)
    async with connect_in_process(serve, mode, message_handler=message_handler, **options) as c:
        yield c


async def status(client: Client) -> dict[str, Any]:
    result = await client.read_resource("gateway://status")
    item = result.contents[0]
    assert isinstance(item, TextResourceContents)
    data: dict[str, Any] = json.loads(item.text)
    return data


async def warm(client: Client, count: int) -> None:
    """Wait until ``count`` upstream sessions are ready in the pool."""
    with trio.fail_after(15):
        while (await status(client))["up"]["sessions"]["idle"] < count:  # noqa: ASYNC110 (polling another process)
            await trio.sleep(0.05)


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    parts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    return "".join(parts)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_dead(pid: int, within: float = 10.0) -> None:
    with trio.fail_after(within):
        while alive(pid):  # noqa: ASYNC110 (polling another process)
            await trio.sleep(0.05)


# -- aggregation ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_upstream_tools_resources_and_prompts_are_served_with_a_prefix(mode: str) -> None:
    async with gateway(config(), mode) as c:
        names = {tool.name for tool in (await c.list_tools()).tools}
        assert {"up__echo", "up__add", "up__crash", "session_open", "session_list"} <= names
        assert text(await c.call_tool("up__echo", {"text": "hi"})) == "hi"
        added = await c.call_tool("up__add", {"a": 2, "b": 3})
        assert text(added) == "5"
        # An upstream tool error comes back as the upstream said it.
        failed = await c.call_tool("up__fail", {})
        assert failed.is_error
        assert "failed on purpose" in failed.content[0].text  # type: ignore[union-attr]
        # The built-in session tools stay.
        assert ok(await c.call_tool("session_open", {}))["session"]
        resources = {r.name: str(r.uri) for r in (await c.list_resources()).resources}
        assert resources["up__info"] == "test://info"
        read = await c.read_resource("test://info")
        assert isinstance(read.contents[0], TextResourceContents)
        assert read.contents[0].text == "upstream info"
        # Templated resources: read through the upstream they match, listed with the prefix.
        await c.call_tool("up__remember", {"key": "k1", "value": "kept"})
        note = (await c.read_resource("test://notes/k1")).contents[0]
        assert isinstance(note, TextResourceContents)
        assert note.text == "note k1: kept"
        templates = (await c.list_resource_templates()).resource_templates
        assert {(t.name, t.uri_template) for t in templates} >= {("up__note", "test://notes/{key}")}
        prompts = {p.name for p in (await c.list_prompts()).prompts}
        assert "up__greet" in prompts
        prompt = await c.get_prompt("up__greet", {"name": "Ada"})
        assert "Ada" in str(prompt.messages[0].content)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_upstream_progress_reaches_a_caller_that_asked_for_it(mode: str) -> None:
    heard: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, total, message))

    async with gateway(config(), mode) as c:
        done = await c.call_tool("up__steps", {"n": 3}, progress_callback=on_progress)
        assert text(done) == "asked"
        assert heard == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
        # A caller that did not ask is not asked on its behalf upstream.
        assert text(await c.call_tool("up__steps", {"n": 2})) == "not asked"
        assert len(heard) == 3


async def test_list_changed_upstream_is_followed_and_told_to_clients() -> None:
    heard: list[str] = []

    async def on_message(message: Any) -> None:
        heard.append(getattr(message, "method", ""))

    async with gateway(config(), message_handler=on_message) as c:
        assert c.server_capabilities.tools is not None
        assert c.server_capabilities.tools.list_changed  # advertised in the handshake
        before = {tool.name for tool in (await c.list_tools()).tools}
        assert "up__brand_new" not in before
        await c.call_tool("up__add_tool", {"name": "brand_new"})
        with trio.fail_after(5):
            while "notifications/tools/list_changed" not in heard:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert "up__brand_new" in {t.name for t in (await c.list_tools()).tools}
        assert text(await c.call_tool("up__brand_new", {})) == "new"


# The SDK's HTTP client (httpx2) leaves its GET stream's async generators to the garbage
# collector when a session ends; trio warns about each (as in test_http.py).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)
async def test_a_client_hears_of_a_change_another_client_caused() -> None:
    heard: list[str] = []

    async def on_message(message: Any) -> None:
        heard.append(getattr(message, "method", ""))

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(serve_gateway, config(), transport="http", port=0, handle_signals=False)
        )
        url = urls[0] + "/mcp"
        async with Client(url, mode="legacy", message_handler=on_message) as a:
            assert text(await a.call_tool("up__echo", {"text": "x"})) == "x"  # a's call is over
            async with Client(url, mode="legacy") as b:
                await b.call_tool("up__add_tool", {"name": "from_b"})
            with trio.fail_after(5):
                while "notifications/tools/list_changed" not in heard:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert "up__from_b" in {t.name for t in (await a.list_tools()).tools}
        nursery.cancel_scope.cancel()


async def test_a_2026_client_hears_of_upstream_changes_on_its_listen_stream() -> None:
    async with gateway(config(), "2026-07-28") as c:
        await c.list_tools()
        async with c.listen(tools_list_changed=True) as subscription:
            await c.call_tool("up__add_tool", {"name": "brand_new"})
            with trio.fail_after(5):
                async for _event in subscription:
                    break
        names = {t.name for t in (await c.list_tools(cache_mode="refresh")).tools}
        assert "up__brand_new" in names


# -- the pool ------------------------------------------------------------------------------


async def test_a_pooled_session_is_reused_and_is_a_runtime_session() -> None:
    async with gateway(config()) as c:
        pids = {text(await c.call_tool("up__pid", {})) for _ in range(5)}
        assert len(pids) == 1
        up = (await status(c))["up"]
        assert up["started"] == 1
        assert up["sessions"]["idle"] == 1
        assert up["pids"] == [int(pids.pop())]
        metrics = await c.read_resource("sessions://metrics")
        exposition = metrics.contents[0].text  # type: ignore[union-attr]
        assert 'mcp_gateway_calls_total{upstream="up"}' in exposition
        assert 'mcp_gateway_upstream_sessions{state="idle",upstream="up"} 1.0' in exposition


async def test_calls_beyond_capacity_wait_in_order_and_the_queue_is_bounded() -> None:
    cfg = config({"min": 2, "max": 2, "concurrency": 1, "queue_max": 2, "queue_timeout": 20})
    async with gateway(cfg) as c:
        await warm(c, 2)
        finished: dict[int, float] = {}

        async def slow(i: int, seconds: float) -> None:
            assert text(await c.call_tool("up__slow", {"seconds": seconds})) == "done"
            finished[i] = trio.current_time()

        async def until(in_use: int, waiting: int) -> None:
            with trio.fail_after(10):
                while True:
                    up = (await status(c))["up"]
                    if (up["in_use"], up["waiting"]) == (in_use, waiting):
                        return
                    await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            # Two run (1 s and 2 s), two wait; the first to wait takes the first free one.
            for i, (seconds, in_use, waiting) in enumerate([(1, 1, 0), (2, 2, 0), (1, 2, 1),
                                                            (1, 2, 2)]):  # fmt: skip
                nursery.start_soon(slow, i, seconds)
                await until(in_use, waiting)
            busy = await c.call_tool("up__echo", {"text": "x"})
            assert error_code(busy) == "upstream_busy"  # the queue is full
        assert finished[2] < finished[3]
        assert finished[3] - finished[2] > 0.5
        assert (await status(c))["up"]["started"] == 2


async def test_the_pool_grows_when_calls_keep_waiting_and_not_before() -> None:
    async with gateway(config({"max": 3, "concurrency": 1})) as c:
        assert text(await c.call_tool("up__echo", {"text": "cold"})) == "cold"
        for _ in range(3):  # one at a time: one session does
            assert text(await c.call_tool("up__echo", {"text": "x"})) == "x"
        assert (await status(c))["up"]["started"] == 1
        async with trio.open_nursery() as nursery:  # two at once, for a while: a second
            for _ in range(2):
                nursery.start_soon(c.call_tool, "up__slow", {"seconds": 2.0})
        up = (await status(c))["up"]
        assert up["started"] == 2
        assert len(up["pids"]) == 2


async def test_a_call_that_waits_past_queue_timeout_is_busy() -> None:
    cfg = config({"min": 1, "max": 1, "concurrency": 1, "queue_timeout": 0.3})
    async with gateway(cfg) as c, trio.open_nursery() as nursery:
        await warm(c, 1)
        nursery.start_soon(c.call_tool, "up__slow", {"seconds": 1.5})
        with trio.fail_after(10):
            while (await status(c))["up"]["in_use"] < 1:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.02)
        started = trio.current_time()
        busy = await c.call_tool("up__echo", {"text": "x"})
        assert error_code(busy) == "upstream_busy"
        assert busy.structured_content["error"]["upstream"] == "up"  # type: ignore[index]
        assert 0.25 < trio.current_time() - started < 1.0


async def test_a_call_past_call_timeout_is_cancelled_and_the_session_serves_on() -> None:
    async with gateway(config({"call_timeout": 0.5})) as c:
        pid = text(await c.call_tool("up__pid", {}))
        timed_out = await c.call_tool("up__hang", {})
        assert error_code(timed_out) == "upstream_timeout"
        assert text(await c.call_tool("up__pid", {})) == pid
        assert (await status(c))["up"]["breaker"] == "closed"


async def test_a_crash_mid_call_is_upstream_error_and_the_next_call_gets_a_fresh_session() -> None:
    async with gateway(config()) as c:
        first = int(text(await c.call_tool("up__pid", {})))
        crashed = await c.call_tool("up__crash", {})
        assert error_code(crashed) == "upstream_error"
        await wait_dead(first)
        second = int(text(await c.call_tool("up__pid", {})))
        assert second != first
        up = (await status(c))["up"]
        assert up["started"] == 2
        assert up["pids"] == [second]


async def test_idle_sessions_are_closed_and_min_are_kept_warm() -> None:
    cfg = config({"min": 1, "max": 3, "concurrency": 1, "idle_timeout": 0.5})
    async with gateway(cfg) as c:
        await warm(c, 1)  # before any call
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(c.call_tool, "up__slow", {"seconds": 0.5})
        up = (await status(c))["up"]
        assert up["started"] == 2
        extra = list(up["pids"])
        await trio.sleep(1.5)  # past idle_timeout: back to min, the warm one stays
        up = (await status(c))["up"]
        assert len(up["pids"]) == 1
        assert up["sessions"]["idle"] == 1
        for pid in set(extra) - set(up["pids"]):
            await wait_dead(pid)


async def test_a_hung_idle_session_fails_its_ping_and_is_replaced() -> None:
    async with gateway(config({"ping_after": 0.2, "call_timeout": 1})) as c:
        first = int(text(await c.call_tool("up__pid", {})))
        os.kill(first, signal.SIGSTOP)  # alive, but answers nothing
        try:
            await trio.sleep(0.3)
            second = int(text(await c.call_tool("up__pid", {})))
            assert second != first
            await wait_dead(first)  # its group was stopped (SIGKILL reaches a stopped process)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first, signal.SIGKILL)


async def test_the_cap_on_child_processes_evicts_an_idle_session_of_another_upstream() -> None:
    both = {
        "a": {"command": PYTHON, "args": [UPSTREAM]},
        "b": {"command": PYTHON, "args": [UPSTREAM]},
    }
    cfg = parse_config({"mcpServers": both, "gateway": {"max_processes": 1}})
    async with gateway(cfg) as c:
        a = int(text(await c.call_tool("a__pid", {})))
        b = int(text(await c.call_tool("b__pid", {})))  # a's idle session made room
        await wait_dead(a)
        s = await status(c)
        assert s["a"]["pids"] == []
        assert s["b"]["pids"] == [b]
        async with trio.open_nursery() as nursery:  # b busy: a has no room, and waits
            nursery.start_soon(c.call_tool, "b__slow", {"seconds": 1.0})
            await trio.sleep(0.3)

            refused = await c.call_tool("a__pid", {})
            assert error_code(refused) == "upstream_busy"
            assert "cap of 1 child processes" in refused.structured_content["error"]["message"]  # type: ignore[index]


async def test_listings_under_the_cap_start_each_upstream_once() -> None:
    """Tools, resources and prompts of an upstream come in one pooled call: listing
    everything under a cap of one process does not evict back and forth."""
    both = {
        "a": {"command": PYTHON, "args": [UPSTREAM]},
        "b": {"command": PYTHON, "args": [UPSTREAM]},
    }
    cfg = parse_config({"mcpServers": both, "gateway": {"max_processes": 1}})
    async with gateway(cfg) as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        resources = {r.name for r in (await c.list_resources()).resources}
        prompts = {p.name for p in (await c.list_prompts()).prompts}
        assert {"a__echo", "b__echo"} <= tools
        assert {"a__greet", "b__greet"} <= prompts
        assert resources
        s = await status(c)
        assert (s["a"]["started"], s["b"]["started"]) == (1, 1)


async def test_no_upstream_template_shadows_the_gateways_own_resources() -> None:
    async with gateway(config(args=("--shadow",))) as c:
        templates = (await c.list_resource_templates()).resource_templates
        assert "gateway://{name}" in {t.uri_template for t in templates}
        assert "up" in await status(c)  # the gateway's JSON, not "the upstream's status"


async def test_an_upstream_whose_resource_listing_fails_still_lists_its_tools() -> None:
    async with gateway(config(args=("--fail-list", "resources"))) as c:
        assert "up__echo" in {t.name for t in (await c.list_tools()).tools}
        assert "up__info" not in {r.name for r in (await c.list_resources()).resources}
        assert "up__greet" in {p.name for p in (await c.list_prompts()).prompts}
        assert text(await c.call_tool("up__echo", {"text": "still"})) == "still"


# -- isolation -----------------------------------------------------------------------------


async def test_session_isolation_gives_each_downstream_session_its_own_upstream() -> None:
    cfg = config({"isolation": "session", "max": 4})
    async with gateway(cfg) as a, gateway(cfg) as b:
        # Handshake era: each connection session has its own upstream session.
        tools = {t.name: t for t in (await a.list_tools()).tools}
        assert "session" in tools["up__remember"].input_schema["properties"]
        await a.call_tool("up__remember", {"key": "k", "value": "alice's"})
        assert text(await a.call_tool("up__recall", {"key": "k"})) == "alice's"
        assert text(await b.call_tool("up__recall", {"key": "k"})) == ""
        pid_a = int(text(await a.call_tool("up__pid", {})))
        assert int(text(await b.call_tool("up__pid", {}))) != pid_a


async def test_an_isolated_upstream_session_ends_with_its_downstream_session() -> None:
    cfg = config({"isolation": "session"})
    async with gateway(cfg, "2026-07-28") as c:
        # Modern era: state goes through handles.
        h1 = ok(await c.call_tool("session_open", {}))["session"]
        h2 = ok(await c.call_tool("session_open", {}))["session"]
        await c.call_tool("up__remember", {"key": "k", "value": "one", "session": h1})
        assert text(await c.call_tool("up__recall", {"key": "k", "session": h1})) == "one"
        assert text(await c.call_tool("up__recall", {"key": "k", "session": h2})) == ""
        pid = int(text(await c.call_tool("up__pid", {"session": h1})))
        needs = await c.call_tool("up__pid", {})
        assert error_code(needs) == "session_required"
        ok(await c.call_tool("session_close", {"session": h1}))
        await wait_dead(pid)
        gone = await c.call_tool("up__pid", {"session": h1})
        assert error_code(gone) == "session_closed"


# -- failures and the breaker --------------------------------------------------------------


async def test_the_breaker_opens_fails_fast_then_probes_and_closes(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    cfg = config(
        breaker={"failures": 2, "window": 30, "cooldown": 1.0, "backoff_base": 0.05,
                 "backoff_max": 0.1},
        args=("--fail-start-if", str(flag)),
    )  # fmt: skip
    async with gateway(cfg) as c:
        for _ in range(2):
            failed = await c.call_tool("up__echo", {"text": "x"})
            assert error_code(failed) == "upstream_unavailable"
            await trio.sleep(0.15)  # past the backoff
        up = (await status(c))["up"]
        assert up["breaker"] == "open"
        started = up["started"]
        fast = await c.call_tool("up__echo", {"text": "x"})
        assert error_code(fast) == "upstream_unavailable"
        assert "circuit breaker open" in fast.structured_content["error"]["message"]  # type: ignore[index]
        assert (await status(c))["up"]["started"] == started  # nothing spawned
        flag.unlink()
        await trio.sleep(1.1)  # the cooldown: the next call is the probe
        assert (await status(c))["up"]["breaker"] == "half_open"
        assert text(await c.call_tool("up__echo", {"text": "back"})) == "back"
        assert (await status(c))["up"]["breaker"] == "closed"


async def test_an_upstream_that_cannot_run_is_unavailable() -> None:
    cfg = parse_config({"mcpServers": {"up": {"command": "/nonexistent/mcp-server"}}})
    async with gateway(cfg) as c:
        failed = await c.call_tool("up__anything", {})
        assert error_code(failed) == "upstream_unavailable"
        assert "cannot run it" in failed.structured_content["error"]["message"]  # type: ignore[index]
        # Listing leaves the broken upstream out instead of failing.
        names = {t.name for t in (await c.list_tools()).tools}
        assert "session_open" in names


async def test_breaker_states_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    breaker = Breaker(failures=3, window=10, cooldown=30)
    for _ in range(2):
        breaker.record_failure(trio.current_time())
        await trio.sleep(6)
    breaker.record_failure(trio.current_time())  # the first fell out of the window
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED
    breaker.record_failure(trio.current_time())
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    assert not breaker.allow(trio.current_time())
    await trio.sleep(30)
    assert breaker.state(trio.current_time()) is BreakerState.HALF_OPEN
    assert breaker.allow(trio.current_time())  # the probe
    assert not breaker.allow(trio.current_time())  # only one
    breaker.record_failure(trio.current_time())
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    await trio.sleep(30)
    assert breaker.allow(trio.current_time())
    breaker.record_success(trio.current_time())
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED


async def test_the_gateway_over_streamable_http() -> None:
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(serve_gateway, config(), transport="http", port=0, handle_signals=False)
        )
        async with Client(urls[0] + "/mcp", mode="2026-07-28") as c:
            assert text(await c.call_tool("up__echo", {"text": "over http"})) == "over http"
            handle = ok(await c.call_tool("session_open", {}))["session"]
            assert ok(await c.call_tool("session_info", {"session": handle}))["state"]
        nursery.cancel_scope.cancel()


# -- upstreams of other kinds --------------------------------------------------------------


async def test_the_examples_as_upstreams() -> None:
    cfg = parse_config(
        {
            "mcpServers": {
                "notes": {"command": PYTHON, "args": [str(ROOT / "examples" / "notes_server.py")]}
            }
        }
    )
    async with gateway(cfg) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert any(name.startswith("notes__") for name in names), names


async def test_an_http_upstream(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {**os.environ, "MCP_SESSIONS_STORE": "memory"}
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-m", "mcp_sessions", "serve", "--transport", "http", "--port", "0"],
            stdin=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    try:
        with trio.fail_after(20):
            while "/mcp" not in log.read_text():  # noqa: ASYNC110 (polling another process)
                await trio.sleep(0.05)
        found = re.search(r"http://\S+/mcp", log.read_text())
        assert found is not None
        cfg = parse_config({"mcpServers": {"remote": {"url": found.group(0)}}})
        async with gateway(cfg) as c:
            # The upstream's own 'session' argument is the upstream's: passed through.
            handle = ok(await c.call_tool("remote__session_open", {}))["session"]
            info = ok(await c.call_tool("remote__session_info", {"session": handle}))
            assert info["state"] in ("idle", "active")
            assert (await status(c))["remote"]["transport"] == "http"
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
