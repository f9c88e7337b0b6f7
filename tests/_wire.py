"""In-process wiring: a client-side JSON-lines transport over any trio stream, and the
official client connected to ``serve_stdio`` over an in-memory stream pair."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import trio
import trio.testing
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage
from mcp_types import jsonrpc_message_adapter

from mcp_sessions import serve_stdio


@asynccontextmanager
async def line_transport(stream: trio.abc.HalfCloseableStream) -> AsyncIterator[Any]:
    to_client_send, to_client_recv = anyio.create_memory_object_stream[SessionMessage | Exception](
        16
    )
    from_client_send, from_client_recv = anyio.create_memory_object_stream[SessionMessage](16)

    async def read() -> None:
        buf = b""
        async with to_client_send:
            while chunk := await stream.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    message = jsonrpc_message_adapter.validate_json(line, by_name=False)
                    await to_client_send.send(SessionMessage(message))

    written = trio.Event()

    async def write() -> None:
        async with from_client_recv:
            async for item in from_client_recv:
                data = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                await stream.send_all(data.encode() + b"\n")
        await stream.send_eof()
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)
        yield to_client_recv, from_client_send
        await from_client_send.aclose()
        await written.wait()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_in_process(
    server: MCPServer[Any], mode: str = "auto", **options: Any
) -> AsyncIterator[Client]:
    """The official client connected to ``serve_stdio(server, **options)`` in this process,
    over an in-memory stream pair (principal ``alice`` unless ``options`` says otherwise)."""
    async with connect_in_process(partial(serve_stdio, server), mode, **options) as client:
        yield client


@asynccontextmanager
async def connect_in_process(
    serve: Callable[..., Awaitable[None]],
    mode: str = "auto",
    *,
    message_handler: Any = None,
    **options: Any,
) -> AsyncIterator[Client]:
    """The official client connected to ``serve(stdin=..., stdout=..., **options)`` (a
    stdio server) in this process, over an in-memory stream pair (principal ``alice``
    unless ``options`` says otherwise)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    options.setdefault("principal", "alice")
    async with client_stream, server_stream, trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve, stdin=server_stream, stdout=server_stream, **options))
        transport = line_transport(client_stream)
        async with Client(transport, mode=mode, message_handler=message_handler) as client:
            yield client
