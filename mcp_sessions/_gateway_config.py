"""The gateway's config file: ``{"mcpServers": {...}}``, as desktop clients write it.

Every mistake is one :class:`GatewayConfigError` line that names where it is
(``mcpServers.notes.pool.max: must be a whole number >= 1, got 'four'``).
Keys desktop clients add for themselves (``type``, ``disabled``,
``autoApprove``, ...) are accepted and ignored (``"disabled": true`` skips the
server); any other unknown key is a mistake, since a typo would otherwise
silently mean a default.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

import attrs

__all__ = [
    "BreakerConfig",
    "GatewayConfig",
    "GatewayConfigError",
    "PoolConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

_YEAR = 365 * 24 * 3600.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SERVER_FIELDS = frozenset({"command", "args", "env", "cwd", "url", "headers", "pool", "breaker"})
#: Keys desktop clients keep in a server's entry for their own use.
_IGNORED = frozenset(
    {"type", "disabled", "autoApprove", "alwaysAllow", "description", "timeout", "transport"}
)


class GatewayConfigError(ValueError):
    """A mistake in the gateway's config; ``str()`` is one line naming the place."""


@attrs.frozen
class PoolConfig:
    min: int = 0
    max: int = 4
    isolation: Literal["shared", "session"] = "shared"
    idle_timeout: float = 300.0
    queue_max: int = 100
    queue_timeout: float = 30.0
    call_timeout: float = 60.0
    #: How long an upstream may take to start and connect.
    start_timeout: float = 30.0
    #: Calls at once on one upstream session.
    concurrency: int = 32
    #: A pooled session idle this long is pinged before it is reused.
    ping_after: float = 30.0


@attrs.frozen
class BreakerConfig:
    failures: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@attrs.frozen
class UpstreamConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    pool: PoolConfig = PoolConfig()
    breaker: BreakerConfig = BreakerConfig()

    @property
    def is_stdio(self) -> bool:
        return self.command is not None


@attrs.frozen
class GatewayConfig:
    upstreams: tuple[UpstreamConfig, ...]
    #: Live child processes across all upstreams.
    max_processes: int = 64


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and check a config file; :class:`GatewayConfigError` names any mistake."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise GatewayConfigError(
            f"{os.fspath(path)}: cannot read it: {exc.strerror or exc}"
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = (
            f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        )
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise GatewayConfigError(f"{os.fspath(path)}: not JSON ({why} at {where})") from None
    return parse_config(data)


def parse_config(data: object) -> GatewayConfig:
    """Check a parsed config document; :class:`GatewayConfigError` names any mistake."""
    top = _object(data, "config")
    _known(top, {"mcpServers", "gateway"}, "")
    servers = _object(top.get("mcpServers"), "mcpServers")
    upstreams = []
    for name, entry in servers.items():
        upstream = _upstream(name, entry)
        if upstream is not None:
            upstreams.append(upstream)
    if not servers:
        raise GatewayConfigError("mcpServers: names no servers")
    gateway = _object(top.get("gateway", {}), "gateway")
    _known(gateway, {"max_processes"}, "gateway")
    max_processes = _int(gateway, "max_processes", 64, 1, "gateway")
    return GatewayConfig(upstreams=tuple(upstreams), max_processes=max_processes)


def _upstream(name: str, entry: object) -> UpstreamConfig | None:
    where = f"mcpServers.{name}"
    if not _NAME.fullmatch(name) or "__" in name or name.endswith("_"):
        raise GatewayConfigError(
            f"{where}: a server name is 1-64 letters, digits, '-' or '_', without '__' "
            "and not ending in '_' (tools are named <server>__<tool>)"
        )
    fields = _object(entry, where)
    _known(fields, _SERVER_FIELDS | _IGNORED, where)
    if fields.get("disabled") is True:
        return None
    command, url = fields.get("command"), fields.get("url")
    if command is not None and url is not None:
        raise GatewayConfigError(f"{where}: give either 'command' or 'url', not both")
    if command is None and url is None:
        raise GatewayConfigError(f"{where}: give 'command' (a stdio server) or 'url' (HTTP)")
    if command is not None and (not isinstance(command, str) or not command):
        raise GatewayConfigError(f"{where}.command: must be a non-empty string, got {command!r}")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise GatewayConfigError(f"{where}.url: must be an http:// or https:// URL, got {url!r}")
    if command is None:
        for stdio_only in ("args", "env", "cwd"):
            if stdio_only in fields:
                raise GatewayConfigError(f"{where}.{stdio_only}: only for a 'command' server")
    elif "headers" in fields:
        raise GatewayConfigError(f"{where}.headers: only for a 'url' server")
    args = fields.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise GatewayConfigError(f"{where}.args: must be a list of strings")
    cwd = fields.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise GatewayConfigError(f"{where}.cwd: must be a string, got {cwd!r}")
    return UpstreamConfig(
        name=name,
        command=command,
        args=tuple(args),
        env=_strings(fields.get("env", {}), f"{where}.env"),
        cwd=cwd,
        url=url,
        headers=_strings(fields.get("headers", {}), f"{where}.headers"),
        pool=_pool(fields.get("pool", {}), f"{where}.pool"),
        breaker=_breaker(fields.get("breaker", {}), f"{where}.breaker"),
    )


def _pool(value: object, where: str) -> PoolConfig:
    fields = _object(value, where)
    _known(fields, {f.name for f in attrs.fields(PoolConfig)}, where)
    d = PoolConfig()
    isolation = fields.get("isolation", d.isolation)
    if isolation not in ("shared", "session"):
        raise GatewayConfigError(f"{where}.isolation: must be 'shared' or 'session', "
                                 f"got {isolation!r}")  # fmt: skip
    pool = PoolConfig(
        min=_int(fields, "min", d.min, 0, where),
        max=_int(fields, "max", d.max, 1, where),
        isolation=isolation,
        idle_timeout=_seconds(fields, "idle_timeout", d.idle_timeout, where),
        queue_max=_int(fields, "queue_max", d.queue_max, 0, where),
        queue_timeout=_seconds(fields, "queue_timeout", d.queue_timeout, where),
        call_timeout=_seconds(fields, "call_timeout", d.call_timeout, where),
        start_timeout=_seconds(fields, "start_timeout", d.start_timeout, where),
        concurrency=_int(fields, "concurrency", d.concurrency, 1, where),
        ping_after=_seconds(fields, "ping_after", d.ping_after, where, zero=True),
    )
    if pool.min > pool.max:
        raise GatewayConfigError(f"{where}.min: must be at most max ({pool.max}), got {pool.min}")
    return pool


def _breaker(value: object, where: str) -> BreakerConfig:
    fields = _object(value, where)
    _known(fields, {f.name for f in attrs.fields(BreakerConfig)}, where)
    d = BreakerConfig()
    breaker = BreakerConfig(
        failures=_int(fields, "failures", d.failures, 1, where),
        window=_seconds(fields, "window", d.window, where),
        cooldown=_seconds(fields, "cooldown", d.cooldown, where),
        backoff_base=_seconds(fields, "backoff_base", d.backoff_base, where),
        backoff_max=_seconds(fields, "backoff_max", d.backoff_max, where),
    )
    if breaker.backoff_base > breaker.backoff_max:
        raise GatewayConfigError(f"{where}.backoff_base: must be at most backoff_max "
                                 f"({breaker.backoff_max:g})")  # fmt: skip
    return breaker


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GatewayConfigError(f"{where}: must be a JSON object, got {_kind(value)}")
    return value


def _known(fields: Mapping[str, Any], known: set[str] | frozenset[str], where: str) -> None:
    for key in fields:
        if key not in known:
            raise GatewayConfigError(f"{where + '.' if where else ''}{key}: unknown field")


def _strings(value: object, where: str) -> dict[str, str]:
    fields = _object(value, where)
    for key, item in fields.items():
        if not isinstance(item, str):
            raise GatewayConfigError(f"{where}.{key}: must be a string, got {_kind(item)}")
    return fields


def _int(fields: Mapping[str, Any], key: str, default: int, least: int, where: str) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise GatewayConfigError(
            f"{where}.{key}: must be a whole number >= {least}, got {_shown(value)}"
        )
    return value


def _seconds(
    fields: Mapping[str, Any], key: str, default: float, where: str, *, zero: bool = False
) -> float:
    value = fields.get(key, default)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
        and value <= _YEAR
    )
    if not ok:
        least = ">= 0" if zero else "> 0"
        raise GatewayConfigError(
            f"{where}.{key}: must be a number of seconds {least} and at most a year, "
            f"got {_shown(value)}"
        )
    return float(value)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")  # fmt: skip


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)
