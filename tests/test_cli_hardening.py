"""The command line names what the user typed, says one line, creates nothing it should not,
and its admin commands do not load the MCP SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_sessions._cli import main


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--idle-timeout", "-1"], {}, "--idle-timeout must be in (0, 31536000] seconds, got -1.0"),
        ([], {"MCP_SESSIONS_IDLE_TIMEOUT": "-1"}, "MCP_SESSIONS_IDLE_TIMEOUT must be in (0, "),
        ([], {"MCP_SESSIONS_IDLE_TIMEOUT": "soon"}, "MCP_SESSIONS_IDLE_TIMEOUT must be a number"),
        (["--max-sessions", "2.5"], {}, "--max-sessions must be a whole number, got '2.5'"),
        (["--max-lifetime", "inf"], {}, "--max-lifetime must be in (0, 31536000] seconds, got inf"),
        ([], {"MCP_SESSIONS_PORT": "http"}, "MCP_SESSIONS_PORT must be a whole number"),
        (["--port", "70000"], {}, "--port must be in [0, 65535], got 70000"),
        (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 without --bearer-tokens would serve anyone"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_or_variable_as_typed(
    argv: list[str],
    env: dict[str, str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    transport = ["--transport", "http"] if "PORT" in str(env) or "--port" in argv else []
    if "--host" in argv:
        transport = ["--transport", "http"]
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--store", "memory", *transport, *argv])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith("mcp-sessions serve: error: ")
    assert expected in line


def test_a_bad_bearer_token_file_names_the_option_and_the_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice": ["md5:abc"]}))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--transport", "http", "--bearer-tokens", str(tokens)])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "--bearer-tokens" in line
    assert "'alice'" in line
    assert "md5:abc" in line


@pytest.mark.parametrize(
    "command",
    [["status"], ["check"], ["sessions", "list"], ["sessions", "close", "s_nope"]],
    ids=["status", "check", "list", "close"],
)
def test_admin_commands_never_create_a_store(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.db"
    assert main([*command, "--store", f"sqlite:///{path}"]) == 1
    assert "no store at" in one_error_line(capsys)
    assert not path.exists()


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_a_store_that_cannot_be_used_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    # A process is the point: the exit code and all that reaches stderr.
    missing = tmp_path / "no" / "such" / "dir" / "s.db"
    bad_pg = "postgresql://postgres@127.0.0.1:1/x?store_connect_timeout=0.3"
    for url, expected in [(f"sqlite:///{missing}", "does not exist"), (bad_pg, "unavailable")]:
        done = run("-m", "mcp_sessions", "serve", "--store", url, MCP_SESSIONS_LOG_LEVEL="error")
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        ours = [x for x in done.stderr.splitlines() if x.startswith("mcp-sessions:")]
        assert len(ours) == 1, done.stderr
        assert "cannot use the session store" in ours[0]
        assert expected in ours[0]
        assert done.stdout == ""
    assert not (tmp_path / "no").exists()


def test_admin_commands_do_not_import_the_sdk(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    url = f"sqlite:///{store}"
    code = (
        "import sys\n"
        "from mcp_sessions._cli import main\n"
        f"codes = [main(['status', '--store', {url!r}]), main(['check', '--store', {url!r}])]\n"
        "sdk = ('mcp', 'mcp_types', 'pydantic', 'anycorn')\n"
        "print(codes, sorted(m for m in sdk if m in sys.modules), file=sys.stderr)\n"
    )
    from mcp_sessions import SQLiteStore  # a store to look at (made here, in the test process)

    async def make() -> None:
        s = SQLiteStore(store)
        await s.open()
        await s.aclose()

    import trio

    trio.run(make)
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[0, 0] []"


def test_status_does_not_create_a_missing_postgres_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from .test_store_contract import PG_DSN, pg_exec

    if PG_DSN is None:
        pytest.skip("PostgreSQL tests need MCP_SESSIONS_TEST_PG_DSN (set by .ci/run)")
    schema = "mcpst_absent_" + os.urandom(4).hex()
    url = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"
    assert main(["status", "--store", url]) == 1
    assert f"schema {schema} does not exist" in one_error_line(capsys)
    found = pg_exec(
        "public",
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s",
        (schema,),
    )
    assert found == [(0,)]
