"""Helper process of ``bench_store.py``: patches one session, sequentially, on request.

Opens the store named on the command line, prints ``ready``, then for each
line ``run SECONDS`` on stdin patches the session one patch after another
for that long and prints one JSON line ``{"latencies_ms": [...]}``; ``quit``
(or end of input) closes the store and exits.

    python bench_store_patcher.py sqlite PATH SESSION_ID
    python bench_store_patcher.py postgresql DSN SESSION_ID SCHEMA
"""

from __future__ import annotations

import json
import sys
import time

import trio

from mcp_sessions._store import SessionStore


def _open(argv: list[str]) -> tuple[SessionStore, str]:
    backend, target, session_id = argv[:3]
    if backend == "sqlite":
        from mcp_sessions._store_sqlite import SQLiteStore

        return SQLiteStore(target, synchronous="NORMAL"), session_id
    from mcp_sessions._store_pg import PostgresStore

    return PostgresStore(target, schema=argv[3]), session_id


async def main() -> None:
    store, session_id = _open(sys.argv[1:])
    await store.open()
    try:
        n = 0
        print("ready", flush=True)
        while True:
            line = (await trio.to_thread.run_sync(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            seconds = float(line[1])
            latencies: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                n += 1
                t = time.perf_counter()
                await store.patch_state(session_id, {"n": n}, if_version=None, at=time.time())
                latencies.append(round((time.perf_counter() - t) * 1000, 4))
            print(json.dumps({"latencies_ms": latencies}), flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    trio.run(main)
