"""Upstream transports for the gateway: a stdio child in its own process group, or a URL.

Theory of operation
===================

:func:`stdio_upstream` is an MCP client transport (an async context manager
yielding the read and write streams ``mcp.client.client.Client`` takes) for a
child process. It differs from the SDK's ``stdio_client`` in what happens to
the child's own children: the child is the leader of a new process group, and
*every* exit (a clean one after stdin closes included) ends with the whole
group gone: stdin closed, ``stdin_grace`` for the child to leave by itself,
SIGTERM to the group, ``term_grace``, SIGKILL to the group, then the child is
reaped. A grandchild the server forgot therefore never outlives its session.
The shutdown is shielded and bounded, so a cancelled caller cannot leak a
process.

Messages are newline-delimited JSON-RPC, parsed and serialised exactly as the
SDK's own stdio transport does. A line longer than ``max_message_size`` or an
unparseable one is a broken upstream: the read stream ends (pending requests
get ``CONNECTION_CLOSED``) and :attr:`UpstreamProcess.exited` is set, which
the pool reads as "this upstream session has died".

:func:`http_upstream` is the SDK's Streamable HTTP client with the configured
headers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress

import anyio
import attrs
import mcp_types
import trio
from mcp.client._transport import TransportStreams
from mcp.client.stdio import get_default_environment
from mcp.shared.message import SessionMessage

__all__ = ["UpstreamProcess", "group_alive", "http_upstream", "stdio_upstream"]

logger = logging.getLogger("mcp_sessions.gateway")

#: How long a child gets to exit by itself once its stdin is closed.
STDIN_GRACE = 1.0
#: How long the group gets between SIGTERM and SIGKILL.
TERM_GRACE = 2.0
_POLL = 0.02


@attrs.define
class UpstreamProcess:
    """What the pool may know about a running child: its pid, and whether it has gone."""

    command: str
    pid: int | None = None
    #: Set when the child's stdout ends (it exited, or closed it) or it broke protocol.
    exited: trio.Event = attrs.field(factory=trio.Event)
    #: Why, in a few words, once ``exited`` is set.
    why: str | None = None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies awaiting their reaper count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover (a member changed user: it exists)
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@asynccontextmanager
async def stdio_upstream(
    command: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    process: UpstreamProcess | None = None,
    max_message_size: int = 16 * 1024 * 1024,
    stdin_grace: float = STDIN_GRACE,
    term_grace: float = TERM_GRACE,
) -> AsyncIterator[TransportStreams]:
    """Run ``command args`` as an MCP server in its own process group; see the module doc.

    Raises :class:`OSError` if it cannot be started. ``process`` (optional)
    receives the pid and the exit.
    """
    info = process if process is not None else UpstreamProcess(command)
    child = await trio.lowlevel.open_process(
        [command, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # the child's log goes where ours goes
        cwd=cwd,
        env=get_default_environment() | dict(env or {}),
        start_new_session=True,  # its own session and process group: pgid == pid
    )
    info.pid = child.pid
    assert child.stdin is not None
    assert child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    def gone(why: str) -> None:
        if not info.exited.is_set():
            info.why = why
            info.exited.set()

    async def reader() -> None:
        buffer = bytearray()
        async with read_writer:
            while True:
                try:
                    chunk = await stdout.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                    chunk = b""
                if not chunk:
                    gone("the upstream process closed its output")
                    return
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if not line.strip():
                        continue
                    try:
                        message = mcp_types.jsonrpc_message_adapter.validate_json(
                            line, by_name=False
                        )
                    except ValueError:
                        logger.warning("upstream %s (pid %s) wrote a line that is not JSON-RPC",
                                       command, child.pid)  # fmt: skip
                        gone("the upstream process broke the protocol")
                        return
                    try:
                        await read_writer.send(SessionMessage(message))
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
                if len(buffer) > max_message_size:
                    gone(f"the upstream process sent a message over {max_message_size} bytes")
                    return

    async def writer() -> None:
        try:
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send_all(data.encode() + b"\n")
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            gone("the upstream process closed its input")
            await read_writer.aclose()

    async def stop() -> None:
        read_stream.close()
        write_stream.close()
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            await stdin.aclose()
        with trio.move_on_after(stdin_grace):
            await child.wait()
        _signal_group(child.pid, signal.SIGTERM)
        with trio.move_on_after(term_grace):
            # The group, not just the child: a grandchild holds it open too.
            # (Nothing tells us when a grandchild exits: poll.)
            while child.poll() is None or group_alive(child.pid):  # noqa: ASYNC110
                await trio.sleep(_POLL)
        if child.poll() is None or group_alive(child.pid):
            logger.info("upstream %s (pid %s) outlived SIGTERM: killing its group",
                        command, child.pid)  # fmt: skip
            _signal_group(child.pid, signal.SIGKILL)
        with trio.move_on_after(term_grace):
            await child.wait()
        with suppress(OSError):
            await stdout.aclose()
        gone("stopped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, name=f"upstream reader {child.pid}")
        nursery.start_soon(writer, name=f"upstream writer {child.pid}")
        try:
            yield read_stream, write_stream
        finally:
            with trio.CancelScope(shield=True):
                await stop()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def http_upstream(
    url: str, headers: Mapping[str, str], *, read_timeout: float
) -> AsyncIterator[TransportStreams]:
    """The SDK's Streamable HTTP client for ``url``, sending ``headers`` on every request.

    Timeouts as the SDK's own client has them (30 s to connect, write or wait
    for the pool; reads may take ``read_timeout``, at least 300 s).
    """
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    timeout = httpx2.Timeout(30.0, read=max(300.0, read_timeout))
    async with (
        httpx2.AsyncClient(headers=dict(headers), timeout=timeout) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams
