"""StdioTransport framing in process: lines split across reads, oversize lines, EOF draining."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from mcp_sessions import StdioTransport


class Sink(trio.abc.SendStream):
    """A stdout that keeps everything written to it."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def run_transport(
    chunks: list[bytes], *, max_message_size: int = 64
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Feed ``chunks`` to a transport whose loop records what the SDK would receive."""
    stdin_send, stdin_recv = trio.testing.memory_stream_one_way_pair()
    stdout = Sink()
    # Nothing answers these requests, so EOF must not wait for them: no grace period.
    transport = StdioTransport(stdin_recv, stdout, max_message_size=max_message_size, grace=0)
    received: list[Any] = []

    async def loop(read_stream: Any, write_stream: Any) -> None:
        async with read_stream:
            received.extend([item.message async for item in read_stream])

    async def feed() -> None:
        for chunk in chunks:
            await stdin_send.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        await stdin_send.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            await transport.serve(loop)
    replies = [json.loads(line) for line in bytes(stdout.data).splitlines()]
    return received, replies


async def test_a_line_split_across_reads_is_one_message() -> None:
    ping = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n'
    received, replies = await run_transport(
        [ping[:5], ping[5:20], ping[20:] + ping], max_message_size=100
    )
    assert [m.id for m in received] == [1, 1]
    assert replies == []


async def test_oversize_lines_are_answered_and_skipped_across_reads() -> None:
    big = b'{"jsonrpc": "2.0", "id": 2, "method": "ping", "x": "' + b"a" * 200 + b'"}\n'
    ping = b'{"jsonrpc": "2.0", "id": 3, "method": "ping"}\n'
    chunks = [big[:30], big[30:100], big[100:], ping, big + ping]
    received, replies = await run_transport(chunks, max_message_size=64)
    assert [m.id for m in received] == [3, 3]
    assert [(r["id"], r["error"]["code"]) for r in replies] == [(None, -32600), (None, -32600)]


async def test_last_line_without_newline_is_read_at_eof() -> None:
    received, _ = await run_transport([b'{"jsonrpc": "2.0", "id": 4, "method": "ping"}'])
    assert [m.id for m in received] == [4]
