"""Streamable HTTP, in process: a real server on a loopback port, the official client.

The server runs in the test's trio loop (``serve_http`` under anycorn); the
client talks to it over real TCP, as a remote client would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import trio
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from mcp_sessions import PostgresStore, Settings, SQLiteStore, open_supervisor
from mcp_sessions._http import serve_http

MODES = ["legacy", "auto", "2026-07-28"]

# The SDK's HTTP client (httpx2) leaves its SSE async generators to the garbage
# collector when a stream is cut short; trio warns about each. Not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)


@asynccontextmanager
async def http_server(**kwargs: Any) -> AsyncIterator[str]:
    server: MCPServer[Any] = kwargs.pop("server", None) or MCPServer("http-test")
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve_http(server, port=0, task_status=task_status, **kwargs)
        )
        yield urls[0] + "/mcp"
        nursery.cancel_scope.cancel()


def content(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result
    return dict(result.structured_content)


@pytest.mark.parametrize("mode", MODES)
async def test_session_tools_work_in_every_mode(mode: str) -> None:
    with trio.fail_after(30):
        async with http_server() as url, Client(url, mode=mode) as client:
            opened = content(await client.call_tool("session_open", {}))
            handle = opened["session"]
            patched = await client.call_tool(
                "session_state_patch", {"session": handle, "patch": {"a": 1}}
            )
            assert content(patched) == {"version": 1}
            got = content(await client.call_tool("session_state_get", {"session": handle}))
            assert got == {"state": {"a": 1}, "version": 1}
            listed = content(await client.call_tool("session_list", {}))
            kinds = sorted(s["kind"] for s in listed["sessions"])
            # Anonymous callers share one principal: a listing shows only what this
            # caller holds by its connection (a handshake-era client's own session),
            # never handles, which may be anyone's.
            assert kinds == (["connection"] if mode == "legacy" else [])
            closed = content(await client.call_tool("session_close", {"session": handle}))
            assert closed["state"] == "terminated"
            gone = await client.call_tool("session_info", {"session": handle})
            assert gone.is_error
            assert content(gone)["error"]["code"] == "session_closed"


async def test_handshake_session_is_a_connection_session_ended_by_delete() -> None:
    async with open_supervisor(Settings()) as supervisor:
        with trio.fail_after(30):
            async with http_server(supervisor=supervisor) as url:
                async with Client(url, mode="legacy") as client:
                    info = content(await client.call_tool("session_info", {}))
                    assert info["kind"] == "connection"
                    [live] = supervisor.sessions()
                    assert live.id == info["id"]
                # The client's exit sends DELETE: the session ended, closed, before it
                # was answered.
                tomb = supervisor.tombstone(info["id"])
                assert tomb is not None
                assert tomb.reason is not None
                assert tomb.reason.value == "closed"


async def test_operations_endpoints() -> None:
    with trio.fail_after(30):
        async with http_server() as url:
            base = url.removesuffix("/mcp")
            async with httpx.AsyncClient() as http:
                assert (await http.get(base + "/healthz")).status_code == 200
                ready = await http.get(base + "/readyz")
                assert ready.status_code == 200
                assert ready.json()["status"] == "ok"
                metrics = await http.get(base + "/metrics")
                assert "mcp_sessions" in metrics.text
                bad = await http.post(
                    url,
                    content=b"{not json",
                    headers={
                        "content-type": "application/json",
                        "accept": "application/json, text/event-stream",
                    },
                )
                assert bad.status_code == 400
                assert bad.json()["error"]["code"] == -32700


async def test_bearer_tokens_bind_handles_to_their_principal(tmp_path: Path) -> None:
    tokens = {"alice": "tok-alice", "bob": "tok-bob"}
    file = tmp_path / "tokens.json"
    file.write_text(
        json.dumps(
            {p: ["sha256:" + hashlib.sha256(t.encode()).hexdigest()] for p, t in tokens.items()}
        )
    )
    with trio.fail_after(30):
        async with http_server(bearer_tokens=file) as url:
            async with httpx.AsyncClient() as http:
                refused = await http.post(
                    url,
                    json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                    headers={"accept": "application/json, text/event-stream"},
                )
                assert refused.status_code == 401
            alice = httpx.AsyncClient(headers={"authorization": "Bearer tok-alice"})
            bob = httpx.AsyncClient(headers={"authorization": "Bearer tok-bob"})
            async with alice, bob:
                async with Client(streamable_http_client(url, http_client=alice), mode="auto") as a:
                    handle = content(await a.call_tool("session_open", {}))["session"]
                async with Client(streamable_http_client(url, http_client=bob), mode="auto") as b:
                    stolen = await b.call_tool("session_info", {"session": handle})
                    assert content(stolen)["error"]["code"] == "session_not_found"
                    assert content(await b.call_tool("session_list", {}))["sessions"] == []
                async with Client(streamable_http_client(url, http_client=alice), mode="auto") as a:
                    listed = content(await a.call_tool("session_list", {}))["sessions"]
                    assert [s["kind"] for s in listed] == ["handle"]


async def test_a_handshake_session_resumes_on_another_server_sharing_the_store(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    with trio.fail_after(30):
        async with (
            http_server(store=SQLiteStore(path)) as first,
            http_server(store=SQLiteStore(path)) as second,
            httpx.AsyncClient() as http,
        ):
            headers = await handshake(http, first)
            here = await call(http, first, headers, "session_info", {})
            there = await call(http, second, headers, "session_info", {})
            assert there.status_code == 200, there.text
            assert (
                _sse_result(here)["structuredContent"]["id"]
                == (_sse_result(there)["structuredContent"]["id"])
            )
            unknown = await call(http, second, headers | {"mcp-session-id": "nope"}, "x", {})
            assert unknown.status_code == 404


def _sse_result(response: httpx.Response) -> dict[str, Any]:
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            if "result" in message:
                return dict(message["result"])
    if response.headers.get("content-type", "").startswith("application/json"):
        return dict(response.json()["result"])
    raise AssertionError(response.text)


ACCEPT = {"accept": "application/json, text/event-stream"}


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


async def handshake(http: httpx.AsyncClient, url: str) -> dict[str, str]:
    """Initialize a handshake-era session by hand; return the headers that name it."""
    init = await http.post(url, headers=ACCEPT, json=INITIALIZE)
    assert init.status_code == 200, init.text
    headers = ACCEPT | {
        "mcp-session-id": init.headers["mcp-session-id"],
        "mcp-protocol-version": "2025-11-25",
    }
    done = await http.post(
        url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"}
    )
    assert done.status_code == 202, done.text
    return headers


async def call(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], tool: str, arguments: Any
) -> httpx.Response:
    return await http.post(
        url,
        headers=headers,
        json={
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        },
    )


async def test_a_handshake_session_survives_a_restart_on_a_durable_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            async with http_server(store=SQLiteStore(path)) as url:
                headers = await handshake(http, url)
                patched = await call(http, url, headers, "session_state_patch", {"patch": {"k": 1}})
                assert _sse_result(patched)["structuredContent"] == {"version": 1}
            async with http_server(store=SQLiteStore(path)) as url:
                got = await call(http, url, headers, "session_state_get", {})
                assert got.status_code == 200, got.text
                assert _sse_result(got)["structuredContent"] == {"state": {"k": 1}, "version": 1}
                # DELETE ends it for good: its id then answers 404, here and anywhere.
                deleted = await http.delete(url, headers=headers)
                assert deleted.status_code == 200
                again = await call(http, url, headers, "session_state_get", {})
                assert again.status_code == 404
            async with http_server(store=SQLiteStore(path)) as url:
                assert (await call(http, url, headers, "session_state_get", {})).status_code == 404


async def test_an_idle_handshake_session_expires_and_its_id_then_answers_404() -> None:
    settings = Settings(idle_timeout=0.3, cleanup_interval=0.05)
    async with open_supervisor(settings) as supervisor:
        with trio.fail_after(30):
            async with http_server(supervisor=supervisor) as url, httpx.AsyncClient() as http:
                headers = await handshake(http, url)
                [session] = supervisor.sessions()
                await supervisor.wait_terminated(supervisor.get(session.id))
                tomb = supervisor.tombstone(session.id)
                assert tomb is not None
                assert tomb.reason is not None
                assert tomb.reason.value == "idle_timeout"
                gone = await call(http, url, headers, "session_info", {})
                assert gone.status_code == 404


async def test_an_oversized_body_is_413_and_the_server_keeps_serving() -> None:
    with trio.fail_after(30):
        async with http_server(max_message_size=1024) as url, httpx.AsyncClient() as http:
            big = await http.post(
                url,
                headers=ACCEPT | {"content-type": "application/json"},
                content=b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "'
                + b"y" * 4096
                + b'"}}',
            )
            assert big.status_code == 413
            async with Client(url, mode="auto") as client:
                assert content(await client.call_tool("session_open", {}))["session"]


async def test_serving_a_public_address_without_authentication_needs_consent() -> None:
    server: MCPServer[Any] = MCPServer("public")
    with pytest.raises(ValueError, match="without authentication"):
        await serve_http(server, host="0.0.0.0", port=0)


async def test_closing_a_modern_response_stream_cancels_the_request() -> None:
    server: MCPServer[Any] = MCPServer("cancel")
    started, cancelled = trio.Event(), trio.Event()

    @server.tool()
    async def wait_forever() -> str:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    with trio.fail_after(30):
        async with http_server(server=server) as url, Client(url, mode="2026-07-28") as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.call_tool, "wait_forever", {})
                await started.wait()
                nursery.cancel_scope.cancel()  # the client gives up: its stream closes
            await cancelled.wait()


# -- many instances on one PostgreSQL database ------------------------------------------


@pytest.fixture
def pg_schema_name() -> Iterator[str]:
    from .test_store_contract import PG_DSN, drop_pg_schema, pg_schema

    if PG_DSN is None:
        pytest.skip("PostgreSQL tests need MCP_SESSIONS_TEST_PG_DSN (set by .ci/run)")
    schema = pg_schema()
    yield schema
    drop_pg_schema(schema)


def pg_store(schema: str, dsn: str | None = None, **kwargs: Any) -> PostgresStore:
    from .test_store_contract import PG_DSN

    assert PG_DSN is not None
    return PostgresStore(dsn or PG_DSN, schema=schema, **kwargs)


async def test_three_instances_share_handles_and_handshake_sessions(pg_schema_name: str) -> None:
    with trio.fail_after(60):
        async with (
            http_server(store=pg_store(pg_schema_name)) as a,
            http_server(store=pg_store(pg_schema_name)) as b,
            http_server(store=pg_store(pg_schema_name)) as c,
        ):
            async with Client(a, mode="auto") as on_a:
                handle = content(await on_a.call_tool("session_open", {}))["session"]
            async with Client(b, mode="2026-07-28") as on_b:
                patched = await on_b.call_tool(
                    "session_state_patch", {"session": handle, "patch": {"from": "b"}}
                )
                assert content(patched) == {"version": 1}
            async with Client(c, mode="legacy") as on_c:
                closed = await on_c.call_tool("session_close", {"session": handle})
                assert content(closed)["state"] == "terminated"
            async with Client(a, mode="auto") as on_a:
                gone = await on_a.call_tool("session_state_get", {"session": handle})
                assert content(gone)["error"]["code"] == "session_closed"

            # A handshake-era session opened on a, used on b and c (no stickiness).
            async with httpx.AsyncClient() as http:
                headers = await handshake(http, a)
                await call(http, a, headers, "session_state_patch", {"patch": {"n": 1}})
                got = await call(http, b, headers, "session_state_get", {})
                assert _sse_result(got)["structuredContent"]["state"] == {"n": 1}
                await call(http, c, headers, "session_state_patch", {"patch": {"n": 3}})
                got = await call(http, a, headers, "session_state_get", {})
                assert _sse_result(got)["structuredContent"]["state"] == {"n": 3}


@asynccontextmanager
async def proxied_pg(schema: str) -> AsyncIterator[tuple[Any, PostgresStore]]:
    """A PostgreSQL store reached through a loopback proxy that can cut it off."""
    from urllib.parse import urlsplit

    from .test_store_contract import PG_DSN
    from .test_store_faults import Proxy

    assert PG_DSN is not None
    parts = urlsplit(PG_DSN)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        dsn = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}")
        yield proxy, pg_store(schema, dsn.geturl(), op_timeout=1.0, connect_timeout=0.5, max_size=2)
        nursery.cancel_scope.cancel()


async def test_readyz_is_503_with_the_reason_while_the_store_is_down(pg_schema_name: str) -> None:
    with trio.fail_after(60):
        async with (
            proxied_pg(pg_schema_name) as (proxy, store),
            http_server(store=store) as url,
            httpx.AsyncClient() as http,
        ):
            base = url.removesuffix("/mcp")
            assert (await http.get(base + "/readyz")).status_code == 200
            proxy.cut_all()
            down = await http.get(base + "/readyz")
            assert down.status_code == 503
            assert down.json()["store"]["healthy"] is False
            assert down.json()["store"]["error"]
            assert (await http.get(base + "/healthz")).status_code == 200
            proxy.restore()
            # The pool reconnects in the background: ready again within seconds.
            while (await http.get(base + "/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)


async def test_sigterm_drains_a_call_in_flight_then_stops() -> None:
    import os
    import signal

    server: MCPServer[Any] = MCPServer("drain")
    started = trio.Event()

    @server.tool()
    async def slow() -> str:
        started.set()
        await trio.sleep(0.5)
        return "finished"

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve_http(
                    server, port=0, handle_signals=True, shutdown_grace=5, task_status=task_status
                )
            )
            url = urls[0] + "/mcp"
            async with httpx.AsyncClient() as http:
                headers = await handshake(http, url)
                result: list[httpx.Response] = []

                async def call_slow() -> None:
                    result.append(await call(http, url, headers, "slow", {}))

                async with trio.open_nursery() as calls:
                    calls.start_soon(call_slow)
                    await started.wait()
                    os.kill(os.getpid(), signal.SIGTERM)
            [answer] = result
            assert answer.status_code == 200
            assert _sse_result(answer)["content"][0]["text"] == "finished"
            # serve_http returns by itself once drained: the nursery needs no cancel.


async def test_the_command_serves_http_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, MCP_SESSIONS_TRANSPORT="http", MCP_SESSIONS_PORT="0")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mcp_sessions", "serve", "--store", f"sqlite:///{tmp_path}/s.db"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    with trio.fail_after(60):
        seen = b""
        while b"Streamable HTTP at " not in seen or not seen.endswith(b"\n"):
            chunk = await process.stderr.receive_some(4096)
            assert chunk, seen.decode()
            seen += chunk
        line = next(x for x in seen.decode().splitlines() if "Streamable HTTP at " in x)
        url = line.split("Streamable HTTP at ", 1)[1].split(",")[0].strip()
        async with Client(url, mode="legacy") as client:
            opened = content(await client.call_tool("session_open", {}))
            assert opened["session"]
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        assert process.stdout is not None
        assert await process.stdout.receive_some(1) == b""  # nothing on stdout


async def test_a_principal_hook_decides_who_calls() -> None:
    async def principal_from(request: Any) -> str | None:
        user = request.headers.get("x-user")
        return user if user in ("alice", "bob") else None

    with trio.fail_after(30):
        async with http_server(principal_from=principal_from) as url:
            alice = httpx.AsyncClient(headers={"x-user": "alice"})
            bob = httpx.AsyncClient(headers={"x-user": "bob"})
            async with alice, bob, httpx.AsyncClient() as nobody:
                refused = await nobody.post(url, headers=ACCEPT, json={"jsonrpc": "2.0"})
                assert refused.status_code == 401
                async with Client(streamable_http_client(url, http_client=alice)) as a:
                    handle = content(await a.call_tool("session_open", {}))["session"]
                    assert content(await a.call_tool("session_info", {"session": handle}))
                async with Client(streamable_http_client(url, http_client=bob)) as b:
                    other = await b.call_tool("session_info", {"session": handle})
                    assert content(other)["error"]["code"] == "session_not_found"


async def test_the_sdks_token_verifier_decides_the_principal() -> None:
    from mcp.server.auth.provider import AccessToken

    class Verifier:
        async def verify_token(self, token: str) -> AccessToken | None:
            if token in ("tok-alice", "tok-bob"):
                return AccessToken(token=token, client_id="app", scopes=[], subject=token[4:])
            return None

    with trio.fail_after(30):
        async with http_server(token_verifier=Verifier()) as url:
            alice = httpx.AsyncClient(headers={"authorization": "Bearer tok-alice"})
            bob = httpx.AsyncClient(headers={"authorization": "Bearer tok-bob"})
            wrong = httpx.AsyncClient(headers={"authorization": "Bearer tok-eve"})
            async with alice, bob, wrong:
                refused = await wrong.post(url, headers=ACCEPT, json={"jsonrpc": "2.0"})
                assert refused.status_code == 401
                async with Client(streamable_http_client(url, http_client=alice)) as a:
                    handle = content(await a.call_tool("session_open", {}))["session"]
                    # Same client id, another subject: another principal.
                async with Client(streamable_http_client(url, http_client=bob)) as b:
                    other = await b.call_tool("session_info", {"session": handle})
                    assert content(other)["error"]["code"] == "session_not_found"
                async with Client(streamable_http_client(url, http_client=alice)) as a:
                    assert content(await a.call_tool("session_info", {"session": handle}))["id"]


async def test_resuming_during_a_store_outage_is_503_not_404(pg_schema_name: str) -> None:
    # 404 would tell the client its session is gone, and it would start over.
    with trio.fail_after(60):
        async with (
            proxied_pg(pg_schema_name) as (proxy, far),
            http_server(store=pg_store(pg_schema_name)) as here,
            http_server(store=far) as there,
            httpx.AsyncClient() as http,
        ):
            headers = await handshake(http, here)
            proxy.cut_all()
            cut = await call(http, there, headers, "session_info", {})
            assert cut.status_code == 503, cut.text
            proxy.restore()
            while (got := await call(http, there, headers, "session_info", {})).status_code != 200:
                assert got.status_code == 503
                await trio.sleep(0.1)  # the pool reconnects in the background


async def test_a_handshake_over_the_session_limit_is_refused_and_leaves_no_session() -> None:
    from mcp.shared.exceptions import MCPError

    async with open_supervisor(Settings(max_sessions=1)) as supervisor:
        with trio.fail_after(30):
            async with (
                http_server(supervisor=supervisor) as url,
                Client(url, mode="legacy") as first,
            ):
                with pytest.raises(BaseException) as refused:  # noqa: PT011 (a group, unwrapped below)
                    async with Client(url, mode="legacy") as second:
                        await second.call_tool("session_info", {})
                error = refused.value
                while isinstance(error, BaseExceptionGroup):  # the client's task group
                    error = error.exceptions[0]
                assert isinstance(error, MCPError), refused.value
                assert error.error.data == {"code": "limit_exceeded"}
                assert len(supervisor.sessions()) == 1
                # The first session is untouched and still served.
                info = content(await first.call_tool("session_info", {}))
                assert info["kind"] == "connection"


async def test_a_delete_the_store_cannot_record_is_503_and_the_session_lives_on(
    pg_schema_name: str,
) -> None:
    async with proxied_pg(pg_schema_name) as (proxy, store):
        with trio.fail_after(60):
            async with http_server(store=store) as url, httpx.AsyncClient() as http:
                headers = await handshake(http, url)
                await call(http, url, headers, "session_state_patch", {"patch": {"k": 1}})
                proxy.cut_all()
                deleted = await http.delete(url, headers=headers)
                assert deleted.status_code == 503, deleted.text
                proxy.restore()
                with trio.fail_after(20):
                    while True:  # the store answers again once the pool reconnects
                        got = await call(http, url, headers, "session_state_get", {})
                        if got.status_code == 200:
                            break
                        await trio.sleep(0.2)
                assert _sse_result(got)["structuredContent"]["state"] == {"k": 1}


async def test_an_anonymous_listing_refuses_a_cursor_it_never_gave() -> None:
    with trio.fail_after(30):
        async with http_server() as url, Client(url, mode="legacy") as client:
            bad = await client.call_tool("session_list", {"cursor": "not-a-cursor"})
            assert bad.is_error
            assert content(bad)["error"]["code"] == "invalid_arguments"
            listed = content(await client.call_tool("session_list", {}))
            assert [s["kind"] for s in listed["sessions"]] == ["connection"]
            assert listed["next_cursor"] is None
