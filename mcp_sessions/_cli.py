"""``mcp-sessions serve``: the built-in session server over stdio.

Every option has an ``MCP_SESSIONS_*`` environment variable; the command line
wins over the environment, which wins over the defaults. Logs go to stderr;
stdout carries nothing but MCP messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from ._errors import SettingsError
from ._settings import DEFAULT_MAX_MESSAGE_SIZE, Settings
from ._store import StoreError, StoreUnavailable

# No MCP SDK imported here: the admin commands never need it (it takes most of a second).

__all__ = ["build_parser", "build_server", "main"]

_ENV = "MCP_SESSIONS_"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", "-"),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


_TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [session=%(session_id)s request=%(request_id)s] %(message)s"
)


def configure_logging(level: str, fmt: str) -> None:
    """Log to stderr, every line carrying the session id and request id."""
    from ._context import CorrelationFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mcp_sessions").setLevel(level.upper())


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(_ENV + name, default)


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _check_environment_choices(args: argparse.Namespace) -> None:
    """Environment defaults bypass argparse's ``choices``: check what came from there."""
    for dest, name, choices in (
        ("log_level", "LOG_LEVEL", _LOG_LEVELS),
        ("log_format", "LOG_FORMAT", _LOG_FORMATS),
        ("transport", "TRANSPORT", ("stdio", "http")),
    ):
        value = getattr(args, dest)
        if value not in choices:
            raise SettingsError(
                [f"{_ENV}{name}: invalid choice {value!r} (choose from {', '.join(choices)})"]
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-sessions",
        description="Session management for MCP servers, on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the built-in session server (stdio, or Streamable HTTP)",
        description="Run the built-in MCP session server over stdio (the default) or MCP "
        "Streamable HTTP at http://HOST:PORT/mcp. Every option can also be "
        "set with the MCP_SESSIONS_<OPTION> environment variable (e.g. "
        "MCP_SESSIONS_IDLE_TIMEOUT=600).",
    )
    _add_serve_options(serve)
    gateway = commands.add_parser(
        "gateway",
        help="run a gateway in front of the MCP servers a config file names",
        description="Run an MCP server (stdio, or Streamable HTTP) in front of the upstream MCP "
        'servers named in FILE ({"mcpServers": {...}}, the shape desktop clients use), '
        "with pooled upstream sessions. Takes serve's options too.",
    )
    gateway.add_argument("--config", required=_env("GATEWAY_CONFIG") is None,
                         default=_env("GATEWAY_CONFIG"), metavar="FILE",
                         help="the upstream servers (env MCP_SESSIONS_GATEWAY_CONFIG)")  # fmt: skip
    _add_serve_options(gateway)

    status = commands.add_parser(
        "status",
        help="sessions in a store by state and kind, the most recently active, the server "
        "instances and their leases",
        description="Show a store's sessions by state and kind, the most recently active, "
        "the server instances and their leases. Opens the store as a server does: an older "
        "schema is upgraded (and a missing one created); `check` changes nothing.",
    )
    status.add_argument("--store", default=_env("STORE"), help="store URL (as for serve)")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    check = commands.add_parser(
        "check",
        help="check a store: integrity, schema version, undecodable rows, orphaned sessions "
        "and lapsed instances",
        description="Check a store without changing anything in it: the database's integrity "
        "(SQLite), the schema version, rows that cannot be decoded, live sessions of server "
        "instances that are gone, and instances whose lease lapsed. Prints one line per "
        "problem and exits 1 when there is any, 0 when there is none. An older schema is "
        "reported, not upgraded (`status` or a server upgrades it).",
    )
    check.add_argument("--store", default=_env("STORE"), help="store URL (as for serve)")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")

    sessions = commands.add_parser("sessions", help="list or close sessions in a store")
    sessions_commands = sessions.add_subparsers(dest="action", required=True)
    listing = sessions_commands.add_parser("list", help="list sessions (public ids, no handles)")
    listing.add_argument("--store", default=_env("STORE"), help="store URL (as for serve)")
    listing.add_argument("--principal", help="only this principal's sessions")
    listing.add_argument("--all", action="store_true", help="include terminated sessions")
    listing.add_argument("--limit", type=_non_negative_int, default=50,
                         help="most sessions shown, the most recently active; 0 for all "
                              "(default 50)")  # fmt: skip
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    closing = sessions_commands.add_parser("close", help="terminate a session by its public id")
    closing.add_argument("id", help="the session's public id (s_...)")
    closing.add_argument("--store", default=_env("STORE"), help="store URL (as for serve)")
    return parser


def _add_serve_options(command: argparse.ArgumentParser) -> None:
    """The options of ``serve`` (and of ``gateway``, which serves too)."""
    opt = command.add_argument
    opt("--transport", default=_env("TRANSPORT", "stdio"), choices=("stdio", "http"),
        type=str.lower, help="stdio (default) or http (env MCP_SESSIONS_TRANSPORT)")  # fmt: skip
    opt("--host", default=_env("HOST", "127.0.0.1"),
        help="HTTP: address to listen on (default 127.0.0.1)")  # fmt: skip
    opt("--port", default=_env("PORT", "8000"),
        help="HTTP: port to listen on (default 8000; 0 picks a free one)")  # fmt: skip
    opt("--bearer-tokens", default=_env("BEARER_TOKENS"),
        help='HTTP: file of {"<principal>": ["sha256:<hex of token>", ...]}; requests then '
             "need 'Authorization: Bearer <token>' and act as that principal")  # fmt: skip
    opt("--allow-anonymous", action="store_true",
        default=_env("ALLOW_ANONYMOUS", "") in ("1", "true", "yes"),
        help="HTTP: serve a non-loopback address without --bearer-tokens")  # fmt: skip
    opt("--store", default=_env("STORE"),
        help="session store: 'memory', 'sqlite:///path.db' or 'postgresql://...' "
             "(default: SQLite at $XDG_STATE_HOME/mcp-sessions/sessions.db; "
             "env MCP_SESSIONS_STORE)")  # fmt: skip
    opt("--idle-timeout", default=_env("IDLE_TIMEOUT"),
        help="seconds an idle session lives (default 1800)")  # fmt: skip
    opt("--max-lifetime", default=_env("MAX_LIFETIME"),
        help="absolute session lifetime in seconds (default 28800)")  # fmt: skip
    opt("--max-sessions", default=_env("MAX_SESSIONS"),
        help="most live sessions (default 10000)")  # fmt: skip
    opt("--max-sessions-per-principal", default=_env("MAX_SESSIONS_PER_PRINCIPAL"),
        help="most live sessions per principal (default 100)")  # fmt: skip
    opt("--cleanup-interval", default=_env("CLEANUP_INTERVAL"),
        help="cleanup scanner tick in seconds (default 1)")  # fmt: skip
    opt("--touch-interval", default=_env("TOUCH_INTERVAL"),
        help="seconds between coalesced activity writes to the store; idle expiry with a "
             "shared store allows this much grace (default 5)")  # fmt: skip
    opt("--sweep-interval", default=_env("SWEEP_INTERVAL"),
        help="seconds between sweeps of the store for sessions whose deadline passed; one "
             "process sweeps per interval (default 60)")  # fmt: skip
    opt("--instance-lease", default=_env("INSTANCE_LEASE"),
        help="seconds within which the connection sessions of a server process that died "
             "are ended by the others sharing the store (default 30)")  # fmt: skip
    opt("--max-state-bytes", default=_env("MAX_STATE_BYTES"),
        help="largest session state document in bytes of JSON (default 1048576)")  # fmt: skip
    opt("--max-metadata-bytes", default=_env("MAX_METADATA_BYTES"),
        help="largest session metadata in bytes of JSON (default 65536)")  # fmt: skip
    opt("--shutdown-grace", default=_env("SHUTDOWN_GRACE"),
        help="seconds in-flight requests get at shutdown (default 10)")  # fmt: skip
    opt("--max-message-size", default=_env("MAX_MESSAGE_SIZE"),
        help=f"longest accepted message in bytes (default {DEFAULT_MAX_MESSAGE_SIZE})")  # fmt: skip
    opt("--principal", default=_env("PRINCIPAL"),
        help="principal owning this connection's sessions (default: the OS user)")  # fmt: skip
    opt("--log-level", default=_env("LOG_LEVEL", "info"), choices=_LOG_LEVELS, type=str.lower,
        help="log level for stderr (default info)")  # fmt: skip
    opt("--log-format", default=_env("LOG_FORMAT", "text"), choices=_LOG_FORMATS, type=str.lower,
        help="log line format on stderr (default text)")  # fmt: skip


def _store_url(value: str | None) -> str:
    if value:
        return value
    from ._store_sqlite import default_sqlite_path

    return f"sqlite:///{default_sqlite_path()}"


#: Settings fields set by ``serve`` options: field -> (flag, number kind).
_SETTING_OPTIONS: dict[str, tuple[str, type]] = {
    "idle_timeout": ("--idle-timeout", float),
    "max_lifetime": ("--max-lifetime", float),
    "max_sessions": ("--max-sessions", int),
    "max_sessions_per_principal": ("--max-sessions-per-principal", int),
    "cleanup_interval": ("--cleanup-interval", float),
    "shutdown_grace": ("--shutdown-grace", float),
    "touch_interval": ("--touch-interval", float),
    "sweep_interval": ("--sweep-interval", float),
    "instance_lease": ("--instance-lease", float),
    "max_state_bytes": ("--max-state-bytes", int),
    "max_metadata_bytes": ("--max-metadata-bytes", int),
}


def _label(flag: str, given: frozenset[str]) -> str:
    """How the user set an option: the flag they typed, else its environment variable."""
    if flag in given:
        return flag
    return _ENV + flag.removeprefix("--").replace("-", "_").upper()


def _given_flags(argv: Sequence[str]) -> frozenset[str]:
    return frozenset(a.split("=", 1)[0] for a in argv if a.startswith("--"))


def _number(value: str, kind: type, label: str) -> float | int:
    try:
        number: float | int = int(value) if kind is int else float(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError([f"{label} must be {what}, got {value!r}"]) from None
    return number


def settings_from_args(args: argparse.Namespace, given: frozenset[str] = frozenset()) -> Settings:
    """The runtime :class:`Settings` the options ask for (unset options keep defaults).

    Problems name the option as the user set it: ``--idle-timeout`` or
    ``MCP_SESSIONS_IDLE_TIMEOUT`` (see ``given``, the flags on the command line).
    """
    data: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems: list[str] = []
    for key, (flag, kind) in _SETTING_OPTIONS.items():
        value = getattr(args, key)
        if value is None:
            continue
        labels[key] = label = _label(flag, given)
        try:
            data[key] = _number(str(value), kind, label)
        except SettingsError as exc:
            problems += exc.problems
    if problems:
        raise SettingsError(problems)
    try:
        return Settings.from_mapping(data)
    except SettingsError as exc:
        raise SettingsError([_relabel(p, labels) for p in exc.problems]) from None


def _relabel(problem: str, labels: dict[str, str]) -> str:
    """``idle_timeout must be ... @ settings`` -> ``--idle-timeout must be ...``."""
    problem = problem.removesuffix(" @ settings")
    field, _, rest = problem.partition(" ")
    return f"{labels[field]} {rest}" if field in labels else problem


def build_server() -> Any:
    """The built-in server: only the session tools and resources."""
    from mcp.server.mcpserver import MCPServer

    return MCPServer(
        "mcp-sessions",
        version=__version__,
        instructions="Session tools: open a session with session_open and pass its handle as "
        "'session' to the other session_* tools.",
    )


def main(argv: Sequence[str] | None = None, *, server: Any = None) -> int:
    """Run the command line; ``server`` replaces the built-in server (for embedding)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command not in ("serve", "gateway"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from ._admin import run_admin

        return run_admin(args, _store_url(args.store))
    given = _given_flags(argv)
    try:
        _check_environment_choices(args)
        options = _serve_options(args, given)
    except SettingsError as exc:
        _usage_error(args.command, "; ".join(exc.problems))
    if args.command == "gateway":
        from ._gateway_config import GatewayConfigError, load_config

        try:
            args.gateway_config = load_config(args.config)
        except GatewayConfigError as exc:
            _usage_error("gateway", str(exc))
    configure_logging(args.log_level, args.log_format)
    from ._store_url import store_from_url

    url = _store_url(args.store)
    try:
        store = store_from_url(url)
    except ValueError as exc:
        _usage_error(args.command, f"{_label('--store', given)}: {exc}")
    if args.store is None and hasattr(store, "create_directory"):
        store.create_directory = True  # only the default state directory is created
    try:
        _serve(args, options, store, server)
    except BaseException as exc:
        failure = _store_failure(exc)
        if failure is not None:
            logging.getLogger("mcp_sessions").debug("the store failed", exc_info=exc)
            print(f"mcp-sessions: error: cannot use the session store: {failure}", file=sys.stderr)
            return 1
        unbound = _find(exc, OSError) if args.transport == "http" else None
        if not isinstance(unbound, OSError):
            raise
        logging.getLogger("mcp_sessions").debug("listening failed", exc_info=exc)
        why = unbound.strerror or unbound
        print(
            f"mcp-sessions: error: cannot listen on {args.host}:{args.port}: {why}", file=sys.stderr
        )
        return 1
    return 0


def _usage_error(command: str, message: str) -> NoReturn:
    """A usage error in one line (no usage dump, no traceback); exit code 2, as argparse."""
    print(f"mcp-sessions {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _store_failure(exc: BaseException) -> BaseException | None:
    """The store error inside ``exc`` (an exception group from the server's tasks)."""
    return _find(exc, StoreError, StoreUnavailable)


def _find(exc: BaseException, *kinds: type[BaseException]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or the exception groups it nests."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, *kinds)
            if found is not None:
                return found
    return None


def _serve_options(args: argparse.Namespace, given: frozenset[str]) -> argparse.Namespace:
    """Check and convert everything ``serve`` needs; raise SettingsError naming the option."""
    problems: list[str] = []
    try:
        args.settings = settings_from_args(args, given)
    except SettingsError as exc:
        problems += exc.problems
    label = _label("--max-message-size", given)
    try:
        size = (
            DEFAULT_MAX_MESSAGE_SIZE
            if args.max_message_size is None
            else _number(str(args.max_message_size), int, label)
        )
        if size <= 0:
            problems.append(f"{label} must be positive, got {size}")
        args.max_message_size = int(size)
    except SettingsError as exc:
        problems += exc.problems
    args.tokens = None
    if args.transport == "http":
        label = _label("--port", given)
        try:
            port = _number(str(args.port), int, label)
            if not 0 <= port <= 65535:
                problems.append(f"{label} must be in [0, 65535], got {port}")
            args.port = int(port)
        except SettingsError as exc:
            problems += exc.problems
        from ._http import load_bearer_tokens, loopback

        if args.bearer_tokens:
            try:
                args.tokens = load_bearer_tokens(args.bearer_tokens)
            except ValueError as exc:
                problems.append(f"{_label('--bearer-tokens', given)}: {exc}")
        elif not loopback(args.host) and not args.allow_anonymous:
            problems.append(
                f"{_label('--host', given)} {args.host} without --bearer-tokens would serve "
                "anyone: give --bearer-tokens, or --allow-anonymous to mean it"
            )
    if problems:
        raise SettingsError(problems)
    return args


def _serve(args: argparse.Namespace, options: argparse.Namespace, store: Any, server: Any) -> None:
    if args.command == "gateway":
        from ._gateway import run_gateway

        http = {
            "host": args.host,
            "port": options.port,
            "bearer_tokens": options.tokens,
            "allow_anonymous": args.allow_anonymous,
        }
        run_gateway(
            args.gateway_config,
            transport=args.transport,
            settings=options.settings,
            store=store,
            max_message_size=options.max_message_size,
            **(http if args.transport == "http" else {"principal": args.principal or None}),
        )
        return
    if args.transport == "http":
        from ._http import run_http

        run_http(
            server if server is not None else build_server(),
            host=args.host,
            port=options.port,
            settings=options.settings,
            store=store,
            bearer_tokens=options.tokens,
            allow_anonymous=args.allow_anonymous,
            max_message_size=options.max_message_size,
        )
        return
    from ._server import run_stdio

    run_stdio(
        server if server is not None else build_server(),
        settings=options.settings,
        principal=args.principal or None,
        max_message_size=options.max_message_size,
        store=store,
    )
