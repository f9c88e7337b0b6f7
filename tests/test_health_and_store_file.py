"""Health tells the truth about writes, and a SQLite file deleted or replaced under a
running server is noticed (real SQLite files, a real second connection holding the lock)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from mcp_sessions import Settings, SQLiteStore, StoreUnavailable, open_supervisor
from mcp_sessions._resources import health


async def test_health_is_degraded_while_writes_fail_and_ok_after_one_succeeds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, busy_timeout=0.2, op_timeout=5.0)
    async with open_supervisor(Settings(), store=store) as supervisor:
        session, _ = await supervisor.open_handle_session(principal="a")
        assert (await health(supervisor))["status"] == "ok"
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StoreUnavailable, match="locked"):
                await supervisor.patch_state(session, {"a": 1})
            doc = await health(supervisor)  # reads still work (WAL): writes do not
            assert doc["status"] == "degraded"
            assert doc["store"]["healthy"] is False
            assert "last write failed at" in doc["store"]["error"]
            assert "locked" in doc["store"]["error"]
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert await supervisor.patch_state(session, {"a": 1}) == 1
        assert (await health(supervisor))["status"] == "ok"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_store_file_deleted_or_replaced_under_the_server_takes_no_writes(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "s.db"
    async with open_supervisor(Settings(), store=SQLiteStore(path)) as supervisor:
        session, _ = await supervisor.open_handle_session(principal="a")
        assert await supervisor.patch_state(session, {"before": 1}) == 1
        if how == "deleted":
            path.unlink()
        else:
            other = tmp_path / "other.db"
            sqlite3.connect(other).close()
            os.replace(other, path)
        with pytest.raises(StoreUnavailable, match=f"was {how}"):
            await supervisor.patch_state(session, {"after": 1})
        assert session.version == 1  # nothing acknowledged that is not in the file
        doc = await health(supervisor)
        assert doc["status"] == "degraded"
        assert f"was {how}" in doc["store"]["error"]
