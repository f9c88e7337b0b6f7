"""The gateway's config file: what it accepts, and a one-line error for each mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcp_sessions import GatewayConfigError, load_gateway_config, parse_gateway_config
from mcp_sessions._gateway_config import BreakerConfig, PoolConfig, UpstreamConfig

FULL = {
    "mcpServers": {
        "notes": {
            "command": "python",
            "args": ["notes.py"],
            "env": {"A": "1"},
            "cwd": "/srv",
            "pool": {
                "min": 1,
                "max": 4,
                "isolation": "session",
                "idle_timeout": 300,
                "queue_max": 100,
                "queue_timeout": 30,
                "call_timeout": 60,
            },
            "breaker": {"failures": 5, "window": 60, "cooldown": 30},
        },
        "search": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer x"}},
        "off": {"command": "x", "disabled": True, "type": "stdio", "autoApprove": []},
    },
    "gateway": {"max_processes": 8},
}


def test_the_desktop_shape_is_read_whole() -> None:
    config = parse_gateway_config(FULL)
    assert config.max_processes == 8
    notes, search = config.upstreams  # "off" is disabled
    assert notes == UpstreamConfig(
        name="notes",
        command="python",
        args=("notes.py",),
        env={"A": "1"},
        cwd="/srv",
        pool=PoolConfig(
            min=1,
            max=4,
            isolation="session",
            idle_timeout=300.0,
            queue_max=100,
            queue_timeout=30.0,
            call_timeout=60.0,
        ),
        breaker=BreakerConfig(failures=5, window=60.0, cooldown=30.0),
    )
    assert notes.is_stdio
    assert not search.is_stdio
    assert search.url == "https://example.com/mcp"
    assert dict(search.headers) == {"Authorization": "Bearer x"}
    assert search.pool == PoolConfig()


def test_defaults() -> None:
    config = parse_gateway_config({"mcpServers": {"a": {"command": "a"}}})
    assert config.max_processes == 64
    (a,) = config.upstreams
    assert (a.pool, a.breaker, a.args, dict(a.env)) == (PoolConfig(), BreakerConfig(), (), {})


def _with(path: str, value: Any) -> dict[str, Any]:
    """FULL with one value replaced (or added) at a dotted path."""
    data: dict[str, Any] = json.loads(json.dumps(FULL))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "config: must be a JSON object, got a list"),
        ({}, "mcpServers: must be a JSON object, got null"),
        ({"mcpServers": {}}, "mcpServers: names no servers"),
        (_with("extra", 1), "extra: unknown field"),
        (_with("mcpServers.notes.pool.max", "four"),
         "mcpServers.notes.pool.max: must be a whole number >= 1, got 'four'"),
        (_with("mcpServers.notes.pool.max", True),
         "mcpServers.notes.pool.max: must be a whole number >= 1, got true"),
        (_with("mcpServers.notes.pool.min", 5),
         "mcpServers.notes.pool.min: must be at most max (4), got 5"),
        (_with("mcpServers.notes.pool.colour", "red"),
         "mcpServers.notes.pool.colour: unknown field"),
        (_with("mcpServers.notes.pool.isolation", "tab"),
         "mcpServers.notes.pool.isolation: must be 'shared' or 'session', got 'tab'"),
        (_with("mcpServers.notes.pool.call_timeout", 0),
         "mcpServers.notes.pool.call_timeout: must be a number of seconds > 0"),
        (_with("mcpServers.notes.breaker.failures", 0),
         "mcpServers.notes.breaker.failures: must be a whole number >= 1, got 0"),
        (_with("mcpServers.search.command", "x"),
         "mcpServers.search: give either 'command' or 'url', not both"),
        (_with("mcpServers.bad", {"args": []}),
         "mcpServers.bad: give 'command' (a stdio server) or 'url' (HTTP)"),
        (_with("mcpServers.search.url", "ftp://x"),
         "mcpServers.search.url: must be an http:// or https:// URL, got 'ftp://x'"),
        (_with("mcpServers.notes.args", "notes.py"),
         "mcpServers.notes.args: must be a list of strings"),
        (_with("mcpServers.notes.env", {"A": 1}),
         "mcpServers.notes.env.A: must be a string, got a number"),
        (_with("mcpServers.a__b", {"command": "x"}), "mcpServers.a__b: a server name is"),
        (_with("mcpServers.up_", {"command": "x"}), "mcpServers.up_: a server name is"),
        (_with("gateway.max_processes", 0),
         "gateway.max_processes: must be a whole number >= 1, got 0"),
    ],
)  # fmt: skip
def test_each_mistake_is_one_line_naming_the_server_and_field(data: Any, message: str) -> None:
    with pytest.raises(GatewayConfigError) as caught:
        parse_gateway_config(data)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_files(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(FULL))
    assert len(load_gateway_config(good).upstreams) == 2
    broken = tmp_path / "broken.json"
    broken.write_text('{"mcpServers": {\n  "a": }')
    with pytest.raises(GatewayConfigError, match=r"broken.json: not JSON \(.* line 2 column 8\)"):
        load_gateway_config(broken)
    with pytest.raises(GatewayConfigError, match=r"absent.json: cannot read it"):
        load_gateway_config(tmp_path / "absent.json")
