"""A client-side JSON-lines transport over any trio stream (for in-process tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import trio
from mcp.shared.message import SessionMessage
from mcp_types import jsonrpc_message_adapter


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
