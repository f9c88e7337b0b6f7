"""A byte relay between our stdio and a child's: the floor of what any stdio gateway costs.

    python tests/benchmarks/byte_relay.py COMMAND [ARGS...]

Starts COMMAND and copies bytes stdin -> its stdin and its stdout -> stdout, nothing else
(no parsing, no protocol): ``bench_gateway.py`` measures it as ``relay`` next to the gateway.
"""

from __future__ import annotations

import subprocess
import sys

import trio


async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    while data := await source.receive_some(65536):
        await sink.send_all(data)
    await sink.aclose()


async def main(command: list[str]) -> None:
    child = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None
    assert child.stdout is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, trio.lowlevel.FdStream(0), child.stdin)
        nursery.start_soon(pump, child.stdout, trio.lowlevel.FdStream(1))


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
