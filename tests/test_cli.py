"""``mcp-sessions serve``: options, environment variables, logs on stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import mcp_sessions
from mcp_sessions._cli import build_parser, main, settings_from_args
from mcp_sessions._state import TerminationReason
from mcp_sessions._store_sqlite import SQLiteStore

from .conftest import PYTHON
from .test_store_contract import T0, record
from .test_transport import INIT, INITIALIZED, call

OPTIONS = ["--store", "--idle-timeout", "--max-lifetime", "--max-sessions",
           "--max-sessions-per-principal", "--cleanup-interval", "--principal", "--log-level",
           "--log-format"]  # fmt: skip


async def test_help_lists_every_option() -> None:
    with trio.fail_after(20):
        result = await trio.run_process(
            [PYTHON, "-m", "mcp_sessions", "serve", "--help"], capture_stdout=True
        )
    help_text = result.stdout.decode()
    for option in OPTIONS:
        assert option in help_text


def test_environment_and_command_line_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_IDLE_TIMEOUT", "42")
    monkeypatch.setenv("MCP_SESSIONS_MAX_SESSIONS", "7")
    args = build_parser().parse_args(["serve", "--max-sessions", "9"])
    settings = settings_from_args(args)
    assert settings.idle_timeout == 42
    assert settings.max_sessions == 9  # the command line wins


def test_bad_option_values_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    from mcp_sessions._cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--store", "redis://localhost/0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", "--idle-timeout", "-1"])
    assert "--idle-timeout must be in (0, " in capsys.readouterr().err


async def test_serve_logs_json_with_correlation_to_stderr_only(tmp_path: Path) -> None:
    env = {**os.environ, "MCP_SESSIONS_LOG_FORMAT": "json", "MCP_SESSIONS_PRINCIPAL": "carol"}
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "mcp_sessions", "serve", "--store", "memory", "--log-level", "debug"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
        )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    async with proc.stdin, proc.stdout:
        with trio.fail_after(15):
            for message in (INIT, INITIALIZED, call(1, "session_open"), call(2, "session_info")):
                await proc.stdin.send_all(json.dumps(message).encode() + b"\n")
            await proc.stdin.aclose()
            out = b""
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            assert await proc.wait() == 0
    # Pipelined requests run concurrently: replies may come in any order.
    replies = {r["id"]: r for r in (json.loads(line) for line in out.splitlines())}
    assert sorted(replies) == [0, 1, 2]
    handle = replies[1]["result"]["structuredContent"]["session"]
    assert replies[2]["result"]["structuredContent"]["kind"] == "connection"
    logs = [json.loads(line) for line in stderr_path.read_text().splitlines()]
    assert logs
    assert all({"session_id", "request_id", "level", "message"} <= entry.keys() for entry in logs)
    assert any(e["session_id"].startswith("s_") and e["request_id"] != "-" for e in logs)
    assert handle not in stderr_path.read_text()


@pytest.mark.parametrize("redirect", ["</dev/null", "<&-", "<&- >&-"])
async def test_serve_exits_0_at_once_without_a_client(redirect: str, tmp_path: Path) -> None:
    """No stdin (CI, a misconfigured launcher): EOF at once, a clean exit 0, nothing on stdout."""
    script = f'exec "{PYTHON}" -m mcp_sessions serve --log-level warning {redirect}'
    with trio.fail_after(20):
        result = await trio.run_process(
            ["sh", "-c", script],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert (tmp_path / "mcp-sessions" / "sessions.db").exists()  # the default store


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``main`` points the root logger at (captured) stderr: put it back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("mcp_sessions")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mcp-sessions {mcp_sessions.__version__}"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MCP_SESSIONS_LOG_LEVEL", "trace"), ("MCP_SESSIONS_LOG_FORMAT", "xml")],
)
def test_bad_logging_environment_is_a_usage_error(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Environment defaults bypass ``choices``: checked all the same, naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--store", "memory"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mcp-sessions serve: error:")
    assert variable in last
    assert repr(value) in last
    assert "Traceback" not in err


def test_logging_environment_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SESSIONS_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MCP_SESSIONS_LOG_FORMAT", "JSON")
    args = build_parser().parse_args(["serve"])
    assert (args.log_level, args.log_format) == ("debug", "json")


def _seed(path: Path, *, live: int, ended: int) -> None:
    """``live`` live sessions, then ``ended`` closed ones, all more recently active."""

    async def seed() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            for i in range(live):
                await store.create(record(f"s_live{i:03d}", created=T0 + i))
            for i in range(ended):
                session_id = f"s_ended{i:03d}"
                await store.create(record(session_id, created=T0 + 1000 + i))
                await store.terminate(session_id, TerminationReason.CLOSED, T0 + 1000 + i)
        finally:
            await store.aclose()

    trio.run(seed)


def _listed(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(["sessions", "list", *argv, "--json"]) == 0
    return [r["id"] for r in json.loads(capsys.readouterr().out)]


def test_sessions_list_shows_the_newest_live_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ended sessions more recent than the live ones do not crowd them out of the limit."""
    db = tmp_path / "s.db"
    _seed(db, live=3, ended=120)
    store = ["--store", f"sqlite:///{db}"]
    assert _listed(capsys, *store) == ["s_live002", "s_live001", "s_live000"]
    assert _listed(capsys, *store, "--limit", "2") == ["s_live002", "s_live001"]
    assert _listed(capsys, *store, "--limit", "0") == ["s_live002", "s_live001", "s_live000"]
    assert len(_listed(capsys, *store, "--all")) == 50
    everything = _listed(capsys, *store, "--all", "--limit", "0")
    assert len(everything) == 123
    assert everything[0] == "s_ended119"
    assert main(["sessions", "list", *store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["s_live002", "s_live001", "s_live000"]
    assert _listed(capsys, *store, "--principal", "alice", "--limit", "0") == [
        "s_live000",
        "s_live001",
        "s_live002",
    ]


def test_sessions_list_says_when_there_is_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "s.db"
    _seed(db, live=0, ended=2)
    store = ["--store", f"sqlite:///{db}"]
    assert main(["sessions", "list", *store]) == 0
    assert capsys.readouterr().out.strip() == "(no live sessions)"
    assert main(["sessions", "list", *store, "--principal", "bob"]) == 0
    assert capsys.readouterr().out.strip() == "(no live sessions)"
    assert _listed(capsys, *store) == []


def test_sessions_list_rejects_a_negative_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sessions", "list", "--store", "memory", "--limit", "-1"])
    assert exc.value.code == 2
    assert "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "status"])
def test_a_mixed_case_postgres_schema_is_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # PostgreSQL folds unquoted names to lower case: "MySchema" was one schema in
    # search_path and another where quoted, and serve/status died with a traceback.
    url = "postgresql://postgres@127.0.0.1:5432/test?schema=MySchema"
    try:
        code: object = main([command, "--store", url])
    except SystemExit as exc:  # serve reports it as a usage error
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "lower-case" in err
    assert "Traceback" not in err
