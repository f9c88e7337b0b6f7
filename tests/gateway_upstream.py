"""A test upstream for the gateway: an MCP server over stdio that can misbehave on request.

    python tests/gateway_upstream.py [--fail-start] [--fail-start-if PATH] [--start-delay S]
                                     [--fail-list KIND] [--shadow]

Tools: ``echo``, ``add``, ``pid`` (this process's), ``remember``/``recall`` (state kept
per process), ``slow(seconds)``, ``hang`` (never answers), ``crash`` (exits mid-call),
``spawn_grandchild`` (starts ``sleep 1000`` and returns its pid), ``fail`` (a tool error),
``add_tool(name)`` (adds a tool and announces the change, in both eras), ``steps(n)``
(reports progress n times, then returns whether the caller asked for progress). A resource
``test://info``, a template ``test://notes/{key}`` (what ``remember`` kept) and a prompt
``greet``. ``--fail-start`` exits 1 at once;
``--fail-start-if PATH`` does while PATH exists; ``--start-delay`` sleeps first;
``--fail-list KIND`` makes listing ``tools``, ``resources`` or ``prompts`` an internal error;
``--shadow`` adds a template ``gateway://{name}`` (the gateway's own scheme).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("gateway-test-upstream")
memory: dict[str, str] = {}


@server.tool()
async def echo(text: str) -> str:
    return text


@server.tool()
async def add(a: int, b: int) -> int:
    return a + b


@server.tool()
async def pid() -> int:
    return os.getpid()


@server.tool()
async def remember(key: str, value: str) -> str:
    memory[key] = value
    return value


@server.tool()
async def recall(key: str) -> str:
    return memory.get(key, "")


@server.tool()
async def slow(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "done"


@server.tool()
async def steps(n: int, ctx: Context) -> str:
    for i in range(1, n + 1):
        await ctx.report_progress(i, n, f"step {i}")
    meta = ctx.request_context.meta
    return "asked" if meta is not None and meta.get("progress_token") is not None else "not asked"


@server.tool()
async def hang() -> str:
    await anyio.sleep_forever()
    return "never"


@server.tool()
async def crash() -> str:
    os._exit(3)


@server.tool()
async def spawn_grandchild() -> int:
    # Not waited for, on purpose: the orphan the gateway must not leave behind.
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)  # noqa: ASYNC220
    return child.pid


@server.tool()
async def fail() -> str:
    raise ToolError("failed on purpose")


@server.tool()
async def add_tool(name: str, ctx: Context) -> str:
    async def new_tool() -> str:
        return "new"

    server.add_tool(new_tool, name=name)
    if ctx.protocol_version == "2026-07-28":
        await ctx.notify_tools_changed()
    else:
        await ctx.session.send_tool_list_changed()
    return name


@server.resource("test://info", name="info")
def info() -> str:
    return "upstream info"


@server.resource("test://notes/{key}", name="note")
def note(key: str) -> str:
    return f"note {key}: {memory.get(key, '')}"


@server.prompt()
def greet(name: str) -> str:
    return f"Hello, {name}!"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--fail-start-if")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--fail-list", choices=["tools", "resources", "prompts"])
    parser.add_argument("--shadow", action="store_true")
    args = parser.parse_args()
    if args.fail_start or (args.fail_start_if and os.path.exists(args.fail_start_if)):
        print("gateway_upstream: failing to start, as asked", file=sys.stderr)
        sys.exit(1)
    if args.start_delay:
        time.sleep(args.start_delay)
    if args.fail_list:

        async def broken() -> list[object]:
            raise RuntimeError(f"listing {args.fail_list} fails, as asked")

        setattr(server, f"list_{args.fail_list}", broken)
    if args.shadow:

        @server.resource("gateway://{name}", name="shadow")
        def shadow(name: str) -> str:
            return f"the upstream's {name}"

    server.run()


if __name__ == "__main__":
    main()
