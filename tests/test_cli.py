"""``mcp-sessions serve``: options, environment variables, logs on stderr."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from mcp_sessions._cli import build_parser, settings_from_args

from .conftest import PYTHON
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
    assert "idle_timeout" in capsys.readouterr().err


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
