"""Streamable HTTP with real server processes: ``mcp-sessions serve --transport http`` (and
``tests/e2e_server.py`` for a slow tool), the official client and raw HTTP over loopback TCP.

The processes start once for the module, all at once (spawning is the cost), on port 0; each
one's URL is read from its log. ``tests/test_http.py`` covers the same transport in process;
here the point is the command, its options, separate processes and signals:

- every built-in tool in each client mode (``legacy``, ``auto``, ``2026-07-28``), and every
  tool error a client can provoke: ``session_not_found`` (an unknown handle, another
  principal's handle: indistinguishable), ``session_required``, ``session_closed``,
  ``session_expired``, ``version_conflict``, ``state_too_large``, ``metadata_too_large``,
  ``invalid_arguments``, ``limit_exceeded``;
- three instances on one PostgreSQL schema (a SQLite file without
  ``MCP_SESSIONS_TEST_PG_DSN``): a handle opened on one, patched on another, closed on the third
  is closed on the first; a handshake-era session opened on one continues on the others, and a
  DELETE ends it everywhere;
- ``--bearer-tokens``: no or a wrong token is 401; a handle or an ``Mcp-Session-Id`` of one
  principal is nothing to another;
- SIGTERM with calls in flight (both eras): they are answered, the process exits 0 soon after
  (its clients still connected), well within its ``--shutdown-grace``, and never writes to
  stdout; SIGTERM with idle clients connected (keep-alive connections of both eras, a
  handshake-era session's GET stream, a ``subscriptions/listen`` stream): the process exits 0
  at once, not after its grace, and ends the listen stream gracefully;
- bad input: a body that is not JSON is 400 with JSON-RPC -32700, a body past
  ``--max-message-size`` is 413, and the process serves on (the session it named too).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import trio
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from .conftest import E2E_SERVER, PYTHON, ROOT
from .test_http import ACCEPT, INITIALIZE, MODES, _sse_result, call, handshake
from .test_server_e2e import error_code, ok
from .test_store_contract import PG_DSN, drop_pg_schema, pg_schema

# The SDK's HTTP client (httpx2) leaves its SSE async generators to the garbage
# collector when a stream is cut short; trio warns about each (as in test_http.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)

BUILTIN_TOOLS = {
    "session_open",
    "session_close",
    "session_info",
    "session_list",
    "session_state_get",
    "session_state_patch",
}
MAX_STATE_BYTES = 1000
MAX_METADATA_BYTES = 256
MAX_MESSAGE_SIZE = 64 * 1024
PER_PRINCIPAL = 3  # the bearer-token server's --max-sessions-per-principal
GRACE = 5.0  # the drain server's --shutdown-grace
SLOW = 1.5  # seconds the calls in flight at SIGTERM still need
IDLE_GRACE = 10.0  # the idle server's --shutdown-grace (with nothing in flight, unused)
EXIT_SOON = 3.0  # seconds a process takes to exit at SIGTERM with no call in flight, at most
TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}
MODERN = {"mcp-protocol-version": "2026-07-28"}


# -- the processes ------------------------------------------------------------------------


@dataclass
class Served:
    """One server process: its URL (``.../mcp``), its stderr and stdout files."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    out: Path
    url: str = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    a: Served  # a, b, c: the built-in server, three instances on one store
    b: Served
    c: Served
    auth: Served  # the built-in server with --bearer-tokens
    drain: Served  # tests/e2e_server.py (a slow tool), for SIGTERM
    idle: Served  # tests/e2e_server.py, for SIGTERM with idle clients
    store: str

    @property
    def shared(self) -> list[Served]:
        return [self.a, self.b, self.c]


def _spawn(name: str, args: Sequence[str], directory: Path, stack: ExitStack) -> Served:
    log, out = directory / f"{name}.log", directory / f"{name}.out"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with log.open("wb") as err_file, out.open("wb") as out_file:
        process = subprocess.Popen(
            [PYTHON, *args, "--transport", "http", "--host", "127.0.0.1", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=path),
        )
    served = Served(name, process, log, out)
    stack.callback(_stop, served)
    return served


def _stop(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(15)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


def _wait_ready(served: Served, deadline: float) -> None:
    """Wait for the line that says where it serves (a file, so the pipe never fills)."""
    marker = "serving MCP over Streamable HTTP at "
    while time.monotonic() < deadline:
        text = served.log_text()
        for line in text.splitlines():
            if marker in line and line.endswith("/mcp"):
                served.url = line.split(marker, 1)[1].strip()
                return
        if served.process.poll() is not None:
            raise AssertionError(f"{served.name} exited {served.process.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"{served.name} not serving in time:\n{served.log_text()}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("http_processes")
    schema = pg_schema() if PG_DSN else None
    if schema is not None:
        assert PG_DSN is not None
        store = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"
    else:
        store = f"sqlite:///{directory / 'shared.db'}"
    tokens = directory / "tokens.json"
    tokens.write_text(
        json.dumps(
            {p: ["sha256:" + hashlib.sha256(t.encode()).hexdigest()] for p, t in TOKENS.items()}
        )
    )
    serve = ["-m", "mcp_sessions", "serve", "--log-level", "info"]
    limits = ["--max-state-bytes", str(MAX_STATE_BYTES),
              "--max-metadata-bytes", str(MAX_METADATA_BYTES),
              "--max-message-size", str(MAX_MESSAGE_SIZE),
              "--cleanup-interval", "0.1"]  # fmt: skip
    try:
        with ExitStack() as stack:
            a, b, c = (
                _spawn(name, [*serve, "--store", store, *limits], directory, stack)
                for name in ("a", "b", "c")
            )
            tokens_args = ["--bearer-tokens", str(tokens),
                           "--max-sessions-per-principal", str(PER_PRINCIPAL)]  # fmt: skip
            auth_args = [*serve, "--store", "memory", *tokens_args]
            auth = _spawn("auth", auth_args, directory, stack)
            drain = _spawn(
                "drain",
                [E2E_SERVER, "serve", "--store", "memory", "--shutdown-grace", str(GRACE)],
                directory,
                stack,
            )
            idle = _spawn(
                "idle",
                [E2E_SERVER, "serve", "--store", "memory", "--shutdown-grace", str(IDLE_GRACE)],
                directory,
                stack,
            )
            deadline = time.monotonic() + 30
            for served in (a, b, c, auth, drain, idle):
                _wait_ready(served, deadline)
            yield Fleet(a, b, c, auth, drain, idle, store)
        # Stopped (SIGTERM): each exited 0, wrote nothing to stdout and logged no error.
        for served in (a, b, c, auth, drain, idle):
            log = served.log_text()
            assert served.process.returncode == 0, (served.name, log)
            assert served.out.read_bytes() == b"", served.name
            assert "Traceback" not in log, (served.name, log)
            assert " ERROR " not in log, (served.name, log)
    finally:
        if schema is not None:
            drop_pg_schema(schema)


# -- helpers ----------------------------------------------------------------------------------


def _bearer(principal: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[principal]}"}


def _as(url: str, http: httpx.AsyncClient, mode: str) -> Client:
    """The official client of ``url`` over ``http`` (which carries the caller's token)."""
    return Client(streamable_http_client(url, http_client=http), mode=mode)


def _error(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result
    assert result.structured_content is not None, result
    error: dict[str, Any] = result.structured_content["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def _content(result: CallToolResult) -> list[Any]:
    return [c.model_dump() for c in result.content]


# -- every tool, every error, each mode -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_tool_and_error_in_each_mode(fleet: Fleet, mode: str) -> None:
    with trio.fail_after(30):
        async with Client(fleet.a.url, mode=mode) as client:
            listed = await client.list_tools()
            assert {t.name for t in listed.tools} == BUILTIN_TOOLS

            opened = ok(
                await client.call_tool(
                    "session_open", {"metadata": {"mode": mode}, "idle_timeout_s": 120}
                )
            )
            handle = opened["session"]
            assert len(handle) >= 22
            assert opened["id"] != handle
            assert opened["idle_timeout_s"] == 120
            assert opened["state"] in ("idle", "active")
            h = {"session": handle}

            info = ok(await client.call_tool("session_info", h))
            assert info["id"] == opened["id"]
            assert info["kind"] == "handle"
            assert info["version"] == 0

            patch = {"a": 1, "b": {"c": 2}, "drop": True}
            assert ok(await client.call_tool("session_state_patch", {**h, "patch": patch})) == {
                "version": 1
            }
            again = {**h, "patch": {"drop": None, "b": {"d": 3}}, "if_version": 1}
            assert ok(await client.call_tool("session_state_patch", again)) == {"version": 2}
            got = ok(await client.call_tool("session_state_get", h))
            assert got == {"state": {"a": 1, "b": {"c": 2, "d": 3}}, "version": 2}
            some = ok(await client.call_tool("session_state_get", {**h, "keys": ["a", "zz"]}))
            assert some == {"state": {"a": 1}, "version": 2}

            # version_conflict: a stale if_version writes nothing.
            stale = await client.call_tool(
                "session_state_patch", {**h, "patch": {"a": 9}, "if_version": 1}
            )
            assert error_code(stale) == "version_conflict"
            assert _error(stale)["current_version"] == 2
            # state_too_large: past --max-state-bytes, nothing written.
            big = await client.call_tool(
                "session_state_patch", {**h, "patch": {"big": "x" * MAX_STATE_BYTES}}
            )
            assert error_code(big) == "state_too_large"
            assert _error(big)["limit_bytes"] == MAX_STATE_BYTES
            assert _error(big)["size_bytes"] > MAX_STATE_BYTES
            assert ok(await client.call_tool("session_state_get", h))["version"] == 2
            # metadata_too_large: past --max-metadata-bytes, nothing opened.
            fat = {"metadata": {"x": "y" * MAX_METADATA_BYTES}}
            too_fat = await client.call_tool("session_open", fat)
            assert error_code(too_fat) == "metadata_too_large"
            assert _error(too_fat)["limit_bytes"] == MAX_METADATA_BYTES

            # invalid_arguments: named, for each tool that takes any.
            for tool, arguments, named in [
                ("session_state_patch", {**h, "patch": "not an object"}, ["patch"]),
                ("session_state_patch", h, ["patch"]),
                ("session_state_get", {**h, "keys": "a"}, ["keys"]),
                ("session_open", {"idle_timeout_s": -1}, ["idle_timeout_s"]),
                ("session_list", {"limit": 0}, ["limit"]),
            ]:
                bad = await client.call_tool(tool, arguments)
                assert error_code(bad) == "invalid_arguments", (tool, arguments)
                assert _error(bad)["arguments"] == named, (tool, arguments)

            # session_not_found: unknown and malformed handles, alike.
            unknown = await client.call_tool("session_info", {"session": secrets.token_urlsafe(32)})
            malformed = await client.call_tool("session_info", {"session": "nope"})
            assert error_code(unknown) == "session_not_found"
            assert unknown.structured_content == malformed.structured_content
            for tool in ("session_state_get", "session_state_patch", "session_close"):
                args: dict[str, Any] = {"session": "nope"}
                if tool == "session_state_patch":
                    args["patch"] = {}
                assert error_code(await client.call_tool(tool, args)) == "session_not_found"

            # Without a handle: a handshake-era client has its connection's session; a
            # 2026-07-28 request has none (session_required).
            # session_close always needs one (it never closes a connection's session).
            assert error_code(await client.call_tool("session_close", {})) == "session_required"
            listed_sessions = ok(await client.call_tool("session_list", {}))
            assert listed_sessions["next_cursor"] is None
            own = await client.call_tool("session_info", {})
            if mode == "legacy":
                connection = ok(own)
                assert connection["kind"] == "connection"
                # Anonymous callers share one principal: only what this client holds.
                assert [s["id"] for s in listed_sessions["sessions"]] == [connection["id"]]
                ok(await client.call_tool("session_state_patch", {"patch": {"n": 1}}))
                assert ok(await client.call_tool("session_state_get", {}))["state"] == {"n": 1}
            else:
                assert error_code(own) == "session_required"
                assert listed_sessions["sessions"] == []
                for tool, arguments in [
                    ("session_state_get", {}),
                    ("session_state_patch", {"patch": {"n": 1}}),
                ]:
                    assert error_code(await client.call_tool(tool, arguments)) == (
                        "session_required"
                    )

            closed = ok(await client.call_tool("session_close", h))
            assert closed == {"id": opened["id"], "state": "terminated", "reason": "closed"}
            # session_closed, from every tool naming it.
            for tool, arguments in [
                ("session_info", h),
                ("session_state_get", h),
                ("session_state_patch", {**h, "patch": {"late": 1}}),
                ("session_close", h),
            ]:
                assert error_code(await client.call_tool(tool, arguments)) == "session_closed"


async def test_an_idle_handle_expires_for_every_instance(fleet: Fleet) -> None:
    with trio.fail_after(30):
        async with Client(fleet.a.url, mode="auto") as a, Client(fleet.b.url, mode="auto") as b:
            opened = ok(await a.call_tool("session_open", {"idle_timeout_s": 0.2}))
            await trio.sleep(0.8)  # past 0.2 s idle, its grace and a cleanup tick
            for client in (a, b):  # the one holding it, one bringing it in from the store
                gone = await client.call_tool("session_info", {"session": opened["session"]})
                assert error_code(gone) == "session_expired"
                assert opened["id"] in _error(gone)["message"]


# -- instances sharing one store --------------------------------------------------------------


async def test_instances_share_handles(fleet: Fleet) -> None:
    a, b, c = (s.url for s in fleet.shared)
    with trio.fail_after(30):
        async with Client(a, mode="auto") as on_a:
            opened = ok(await on_a.call_tool("session_open", {"metadata": {"opened_on": "a"}}))
            h = {"session": opened["session"]}
            ok(await on_a.call_tool("session_state_patch", {**h, "patch": {"a": 1}}))
            async with Client(b, mode="2026-07-28") as on_b:
                assert ok(await on_b.call_tool("session_info", h))["id"] == opened["id"]
                patched = await on_b.call_tool(
                    "session_state_patch", {**h, "patch": {"b": 2}, "if_version": 1}
                )
                assert ok(patched) == {"version": 2}
                # a's copy is stale: its if_version check is the store's.
                stale = await on_a.call_tool(
                    "session_state_patch", {**h, "patch": {"a": 0}, "if_version": 1}
                )
                assert error_code(stale) == "version_conflict"
                assert _error(stale)["current_version"] == 2
                async with Client(c, mode="legacy") as on_c:
                    got = ok(await on_c.call_tool("session_state_get", h))
                    assert got == {"state": {"a": 1, "b": 2}, "version": 2}
                    closed = ok(await on_c.call_tool("session_close", h))
                    assert closed["reason"] == "closed"
                # Closed on c: closed on a (which opened it) and on b (which brought it in).
                for client in (on_a, on_b):
                    for tool, arguments in [
                        ("session_info", h),
                        ("session_state_get", h),
                        ("session_state_patch", {**h, "patch": {"late": 1}}),
                    ]:
                        result = await client.call_tool(tool, arguments)
                        assert error_code(result) == "session_closed", (client, tool)


async def test_a_handshake_session_opened_on_one_instance_continues_on_the_others(
    fleet: Fleet,
) -> None:
    a, b, c = (s.url for s in fleet.shared)
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            headers = await handshake(http, a)
            here = await call(http, a, headers, "session_info", {})
            assert here.status_code == 200, here.text
            connection = _sse_result(here)["structuredContent"]
            assert connection["kind"] == "connection"
            patched = await call(http, a, headers, "session_state_patch", {"patch": {"n": 1}})
            assert _sse_result(patched)["structuredContent"] == {"version": 1}

            there = await call(http, b, headers, "session_info", {})
            assert there.status_code == 200, there.text  # not 404: resumed from the store
            assert _sse_result(there)["structuredContent"]["id"] == connection["id"]
            got = await call(http, b, headers, "session_state_get", {})
            assert _sse_result(got)["structuredContent"] == {"state": {"n": 1}, "version": 1}
            patched = await call(
                http, c, headers, "session_state_patch", {"patch": {"n": 3}, "if_version": 1}
            )
            assert patched.status_code == 200, patched.text
            assert _sse_result(patched)["structuredContent"] == {"version": 2}
            got = await call(http, a, headers, "session_state_get", {})
            assert _sse_result(got)["structuredContent"] == {"state": {"n": 3}, "version": 2}
            listed = await call(http, b, headers, "session_list", {})
            ids = [s["id"] for s in _sse_result(listed)["structuredContent"]["sessions"]]
            assert ids == [connection["id"]]

            # DELETE on the instance serving it: its id is then 404 there.
            deleted = await http.delete(c, headers=headers)
            assert deleted.status_code == 200, deleted.text
            gone = await call(http, c, headers, "session_info", {})
            assert gone.status_code == 404, gone.text


async def test_a_handshake_session_deleted_on_one_instance_is_404_on_the_others(
    fleet: Fleet,
) -> None:
    a, b, c = (s.url for s in fleet.shared)
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            headers = await handshake(http, a)  # a runs its loop
            assert (await call(http, b, headers, "session_info", {})).status_code == 200  # b too
            deleted = await http.delete(c, headers=headers)
            assert deleted.status_code == 200, deleted.text
            not_found = {"code": -32600, "message": "Session not found"}
            for url in (a, b):
                first = await call(http, url, headers, "session_info", {})
                assert first.status_code == 404, (url, first.status_code, first.text)
                assert first.json()["error"] == not_found


# -- bearer tokens and limits ------------------------------------------------------------------


async def test_bearer_tokens_bind_handles_and_http_sessions_to_their_principal(
    fleet: Fleet,
) -> None:
    url = fleet.auth.url
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            for headers in (
                {},
                {"authorization": "Bearer tok-eve"},
                {"authorization": "Bearer"},
                {"authorization": f"Basic {TOKENS['alice']}"},
                MODERN,
            ):
                refused = await http.post(url, headers=ACCEPT | headers, json=INITIALIZE)
                assert refused.status_code == 401, (headers, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["message"] == "Unauthorized"
            assert (await http.get(url.removesuffix("/mcp") + "/healthz")).status_code == 200

        alice = httpx.AsyncClient(headers=_bearer("alice"))
        bob = httpx.AsyncClient(headers=_bearer("bob"))
        async with alice, bob:
            async with _as(url, alice, "auto") as a:
                opened = ok(await a.call_tool("session_open", {}))
                h = {"session": opened["session"]}
                ok(await a.call_tool("session_state_patch", {**h, "patch": {"secret": 1}}))
            unknown = {"session": secrets.token_urlsafe(32)}
            for mode in ("legacy", "2026-07-28"):
                async with _as(url, bob, mode) as b:
                    for tool, extra in [
                        ("session_info", {}),
                        ("session_state_get", {}),
                        ("session_state_patch", {"patch": {"stolen": True}}),
                        ("session_close", {}),
                    ]:
                        theirs = await b.call_tool(tool, {**h, **extra})
                        nobodys = await b.call_tool(tool, {**unknown, **extra})
                        assert error_code(theirs) == "session_not_found", (mode, tool)
                        # Indistinguishable from a handle that does not exist.
                        assert theirs.structured_content == nobodys.structured_content
                        assert _content(theirs) == _content(nobodys)
                    listed = ok(await b.call_tool("session_list", {}))["sessions"]
                    assert opened["id"] not in {s["id"] for s in listed}
                    assert {s["kind"] for s in listed} <= {"connection"}
            async with _as(url, alice, "legacy") as a:
                # Untouched by bob, and alice's (not shared: the principal's own listing).
                got = ok(await a.call_tool("session_state_get", h))
                assert got == {"state": {"secret": 1}, "version": 1}
                listed = ok(await a.call_tool("session_list", {}))["sessions"]
                handles = [s["id"] for s in listed if s["kind"] == "handle"]
                assert handles == [opened["id"]]
                bad = await a.call_tool("session_list", {"cursor": "not a cursor"})
                assert error_code(bad) == "invalid_arguments"
                assert _error(bad)["arguments"] == ["cursor"]

            # A handshake-era session id is alice's too: 404 for bob, 401 without a token.
            headers = await handshake(alice, url)
            assert (await call(alice, url, headers, "session_info", {})).status_code == 200
            as_bob = await call(bob, url, headers, "session_info", {})
            assert as_bob.status_code == 404, as_bob.text
            assert (await bob.delete(url, headers=headers)).status_code == 404
            async with httpx.AsyncClient() as anonymous:
                nobody = await call(anonymous, url, headers, "session_info", {})
                assert nobody.status_code == 401
            mine = await call(alice, url, headers, "session_info", {})
            assert mine.status_code == 200, mine.text
            assert _sse_result(mine)["structuredContent"]["kind"] == "connection"
            assert (await alice.delete(url, headers=headers)).status_code == 200


async def test_the_per_principal_limit_refuses_an_open_past_it(fleet: Fleet) -> None:
    url = fleet.auth.url
    with trio.fail_after(30):
        carol = httpx.AsyncClient(headers=_bearer("carol"))
        alice = httpx.AsyncClient(headers=_bearer("alice"))
        async with carol, alice, _as(url, carol, "2026-07-28") as c:
            handles = [
                ok(await c.call_tool("session_open", {}))["session"] for _ in range(PER_PRINCIPAL)
            ]
            refused = await c.call_tool("session_open", {})
            assert error_code(refused) == "limit_exceeded"
            error = _error(refused)
            assert error["limit"] == PER_PRINCIPAL
            assert error["scope"] == "principal 'carol'"
            listed = ok(await c.call_tool("session_list", {}))["sessions"]
            assert len(listed) == PER_PRINCIPAL  # the refused open left nothing behind
            async with _as(url, alice, "auto") as a:  # another principal is not at its limit
                ok(await a.call_tool("session_open", {}))
            ok(await c.call_tool("session_close", {"session": handles[0]}))
            ok(await c.call_tool("session_open", {}))  # the room freed is free again
            assert error_code(await c.call_tool("session_open", {})) == "limit_exceeded"


# -- SIGTERM --------------------------------------------------------------------------------------


async def _exited(served: Served) -> float:
    """Wait for ``served`` to exit; return when (trio's clock)."""
    while served.process.poll() is None:  # noqa: ASYNC110 (a Popen, not a trio process)
        await trio.sleep(0.02)
    return trio.current_time()


async def test_sigterm_answers_the_calls_in_flight_then_exits_0(fleet: Fleet) -> None:
    drain = fleet.drain
    modes = ("legacy", "2026-07-28")
    progressed = {mode: trio.Event() for mode in modes}
    results: dict[str, CallToolResult] = {}
    exited = trio.Event()

    async def slow(mode: str) -> None:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            progressed[mode].set()

        # No DELETE on the way out: the server is gone by then.
        transport = streamable_http_client(drain.url, terminate_on_close=False)
        async with Client(transport, mode=mode) as client:
            # The client checks a result against the tool's output schema: have it now (a
            # new connection once the server drains would be refused).
            assert "slow" in {t.name for t in (await client.list_tools()).tools}
            results[mode] = await client.call_tool(
                "slow", {"seconds": SLOW}, progress_callback=on_progress
            )
            # Still connected (a legacy client's GET stream open) until the server is gone:
            # that does not hold its drain.
            await exited.wait()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for mode in modes:
                nursery.start_soon(slow, mode)
            for event in progressed.values():
                await event.wait()  # both calls are running in the server
            signalled = trio.current_time()
            drain.process.send_signal(signal.SIGTERM)
            # Draining: no new connections, while the calls in flight run on.
            while True:
                async with httpx.AsyncClient() as fresh:
                    try:
                        await fresh.get(drain.url.removesuffix("/mcp") + "/healthz")
                    except httpx.ConnectError:
                        break
                await trio.sleep(0.02)
            assert drain.process.poll() is None
            assert not results
            took = await _exited(drain) - signalled
            exited.set()
        for mode in modes:
            result = results[mode]
            assert not result.is_error, (mode, result)
            assert _content(result)[0]["text"] == "done", (mode, result)
    assert drain.process.returncode == 0, drain.log_text()
    # Once the calls are answered, not at the end of the grace.
    assert took < min(SLOW + EXIT_SOON, GRACE), took
    assert "SIGTERM: draining" in drain.log_text()
    assert drain.out.read_bytes() == b""  # stdout carries nothing


async def test_sigterm_with_idle_clients_connected_exits_0_at_once(fleet: Fleet) -> None:
    served = fleet.idle
    url = served.url
    ready = {name: trio.Event() for name in ("legacy", "2026-07-28", "GET")}
    exited = trio.Event()
    ended: list[str] = []

    async def connected(mode: str) -> None:
        transport = streamable_http_client(url, terminate_on_close=False)
        async with Client(transport, mode=mode) as client:
            # An answered call: the client's connection now idles, kept alive.
            assert ok(await client.call_tool("session_open", {}))["session"]
            if mode == "2026-07-28":
                async with client.listen(tools_list_changed=True) as subscription:
                    ready[mode].set()
                    async for _ in subscription:
                        pass
                # The server ended it gracefully (an abrupt drop raises SubscriptionLost).
                ended.append("listen")
            else:
                ready[mode].set()
            await exited.wait()

    async def get_stream() -> None:
        """A handshake-era session's GET stream, by hand: known to be open."""
        async with httpx.AsyncClient(timeout=2 * IDLE_GRACE) as http:
            headers = await handshake(http, url)
            sse = headers | {"accept": "text/event-stream"}
            async with http.stream("GET", url, headers=sse) as response:
                assert response.status_code == 200
                ready["GET"].set()
                async for _ in response.aiter_bytes():
                    pass
            ended.append("GET")
            await exited.wait()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connected, "legacy")
            nursery.start_soon(connected, "2026-07-28")
            nursery.start_soon(get_stream)
            for event in ready.values():
                await event.wait()
            signalled = trio.current_time()
            served.process.send_signal(signal.SIGTERM)
            took = await _exited(served) - signalled
            exited.set()
    assert served.process.returncode == 0, served.log_text()
    assert took < EXIT_SOON < IDLE_GRACE, took
    assert sorted(ended) == ["GET", "listen"]
    assert "SIGTERM: draining" in served.log_text()


# -- bad input ---------------------------------------------------------------------------------


async def test_bad_bodies_are_refused_and_the_process_serves_on(fleet: Fleet) -> None:
    url = fleet.a.url
    json_type = {"content-type": "application/json"}
    oversized = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "'
        + b"y" * MAX_MESSAGE_SIZE
        + b'"}}'
    )
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            headers = await handshake(http, url)
            patched = await call(http, url, headers, "session_state_patch", {"patch": {"k": 1}})
            assert _sse_result(patched)["structuredContent"] == {"version": 1}
            # Without a session, in a session, and as a 2026-07-28 request.
            for extra in ({}, headers, MODERN):
                bad = await http.post(url, headers=ACCEPT | json_type | extra, content=b"{not json")
                assert bad.status_code == 400, (extra, bad.text)
                assert bad.json()["error"]["code"] == -32700, (extra, bad.text)
                big = await http.post(url, headers=ACCEPT | json_type | extra, content=oversized)
                assert big.status_code == 413, (extra, big.text)
            # The session they named serves on, state intact.
            got = await call(http, url, headers, "session_state_get", {})
            assert got.status_code == 200, got.text
            assert _sse_result(got)["structuredContent"] == {"state": {"k": 1}, "version": 1}
            # Just under the limit is accepted (the limit is the body's size, not less).
            fits = await call(
                http, url, headers, "session_state_get", {"keys": ["k" * (MAX_MESSAGE_SIZE // 2)]}
            )
            assert fits.status_code == 200, fits.text
            assert (await http.delete(url, headers=headers)).status_code == 200
        for mode in MODES:
            async with Client(url, mode=mode) as client:
                assert ok(await client.call_tool("session_open", {}))["session"]
