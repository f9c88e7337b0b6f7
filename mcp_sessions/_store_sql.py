"""What the SQL stores share: every operation, on the worker, bounded in time.

Theory of operation
===================

:class:`SQLStoreBase` ties the parts, each in its own module:

- :mod:`._sql_dialect` -- how SQLite and PostgreSQL differ;
- :mod:`._sql_schema` -- the tables and their forward-only migrations;
- :mod:`._sql_statements` -- every statement, built once when the store is made;
- :mod:`._sql_codec` -- rows to records on one private cattrs converter;
- :mod:`._sql_ops` -- the body of each operation, a function of a cursor;
- :mod:`._sql_worker` -- group commit: worker threads running queued
  operations, many per transaction, each in its own savepoint.

A store method builds its operation's body, hands it to the worker, and waits
at most ``op_timeout`` for the answer (then it gives the operation up, which
is never committed after that, and raises
:class:`~mcp_sessions._store.StoreUnavailable`). A backend supplies its
:class:`~mcp_sessions._sql_worker.Transactions` (connections, begin/commit,
which driver errors are whose) and maps its driver's failures; SQLite also
answers reads directly on a read-only connection where that cannot block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, NoReturn, TypeVar

import trio

from ._errors import SessionError
from ._sql_codec import RowCodec
from ._sql_dialect import Dialect
from ._sql_ops import Operations
from ._sql_schema import LATEST_SCHEMA, found_schema_version, schema_too_old_message
from ._sql_statements import Statements
from ._sql_worker import COMMITTING, DONE, Counters, GroupCommit
from ._state import TerminationReason
from ._store import (
    InstanceRecord,
    Limits,
    SessionRecord,
    StoreError,
    StoreHealth,
    StoreStatistics,
    StoreUnavailable,
    Touch,
)

__all__ = ["MISS", "SQLStoreBase"]

T = TypeVar("T")

#: Returned by :meth:`SQLStoreBase._read_directly` when the read must go to the worker.
MISS: Any = object()


class SQLStoreBase:
    """The :class:`~mcp_sessions._store.SessionStore` operations of the SQL backends.

    Subclasses set :attr:`backend`, :attr:`dialect`, ``op_timeout`` and
    ``_where``, start a :class:`GroupCommit` in ``open`` (see :meth:`_started`)
    and stop it in ``aclose`` (see :meth:`_stop_worker`), and say which
    driver failures are outages (:meth:`_map_error`) and which a duplicate
    (:meth:`_is_duplicate`).
    """

    backend: str
    durable = True
    dialect: ClassVar[Dialect]
    op_timeout: float
    #: How the store names itself in errors and logs (no password).
    _where: str
    #: Names the admission lock where the dialect takes one (PostgreSQL: per schema).
    _lock_key = "mcp_sessions:admit"
    #: Rows of ``sessions`` that :meth:`check` reads and decodes per operation.
    check_chunk = 500
    #: After ``open(migrate=False)``: the schema version found at open (0: none at all),
    #: possibly older than this code's; None after an ordinary open, which brought it up
    #: to date. :meth:`check_as_found` refreshes it.
    found_schema: int | None = None
    #: After ``open(migrate=False)`` on PostgreSQL: the store's schema, if it does not exist.
    missing_schema: str | None = None

    def __init__(self) -> None:
        self._sql = Statements.build(self.dialect)
        self._codec = RowCodec(self.dialect, self.backend)
        self._ops = Operations(self._sql, self._codec, self.backend)
        self._worker: GroupCommit | None = None
        self._counters = Counters()
        self._calls: dict[str, int] = {}
        self._direct_reads = 0

    # -- what backends provide ----------------------------------------------

    def _map_error(self, exc: Exception) -> Exception | None:
        """The :class:`StoreUnavailable` a driver failure stands for, or None to let it through."""
        raise NotImplementedError

    def _is_duplicate(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _read_directly(self, fn: Callable[[Any], T]) -> T:
        """Run the read ``fn`` without a worker hop, or return :data:`MISS`."""
        return MISS  # type: ignore[no-any-return]

    def change_epoch(self) -> int | None:
        return None

    # -- plumbing ------------------------------------------------------------

    def _worker_for(self, transactions: Any, *, threads: int, **options: Any) -> GroupCommit:
        return GroupCommit(
            transactions,
            threads=threads,
            name=f"mcp-sessions-{self.backend}",
            counters=self._counters,
            **options,
        )

    async def _stop_worker(self) -> None:
        """Stop the worker after what is queued, and wait for its threads."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
            # Abandonable: a stop that cannot wait (the caller's deadline, a second
            # signal) leaves the daemon threads to finish or die with the process.
            await trio.to_thread.run_sync(worker.join, abandon_on_cancel=True)

    def _raise_mapped(self, exc: Exception) -> NoReturn:
        """Re-raise ``exc``: ours as they are, a driver failure as what it stands for."""
        if isinstance(exc, SessionError | StoreError):  # SchemaTooNew is a StoreError
            raise exc
        mapped = self._map_error(exc)
        if mapped is None:
            raise exc
        raise mapped from exc

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread, not abandoned (opening), mapping driver failures."""
        try:
            return await trio.to_thread.run_sync(fn)
        except Exception as exc:
            self._raise_mapped(exc)

    async def _run(
        self, name: str, fn: Callable[[Any], T], *, write: bool, key: str | None = None
    ) -> T:
        """Run ``fn(cursor)`` in a worker transaction; wait at most ``op_timeout``."""
        self._calls[name] = self._calls.get(name, 0) + 1
        worker = self._worker
        if worker is None:
            raise StoreUnavailable(f"{self._where} is not open")
        op = worker.submit(fn, write=write, key=key, where=self._where)
        try:
            with trio.fail_after(self.op_timeout):
                await op.done.wait()
        except trio.TooSlowError:
            state = worker.abandon(op)
            if state == COMMITTING:
                raise StoreUnavailable(
                    f"{self._where}: {name} did not finish within {self.op_timeout:g}s "
                    "(it was being committed: it may have been applied)"
                ) from None
            if state != DONE:
                raise StoreUnavailable(
                    f"{self._where}: {name} did not finish within {self.op_timeout:g}s"
                ) from None
        except BaseException:
            worker.abandon(op)
            raise
        try:
            return op.result()
        except Exception as exc:
            self._raise_mapped(exc)

    async def _read(self, name: str, fn: Callable[[Any], T]) -> T:
        """A read: directly where the backend can, else on the worker."""
        await trio.lowlevel.checkpoint_if_cancelled()
        result = self._read_directly(fn)
        if result is MISS:
            return await self._run(name, fn, write=False)
        self._calls[name] = self._calls.get(name, 0) + 1
        self._direct_reads += 1
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def statistics(self) -> StoreStatistics:
        c = self._counters
        worker = self._worker
        return StoreStatistics(
            operations=self._calls,
            transactions=c.transactions,
            write_transactions=c.write_transactions,
            failed_transactions=c.failed_transactions,
            largest_batch=c.largest_batch,
            direct_reads=self._direct_reads,
            queued=worker.queued() if worker is not None else 0,
        )

    # -- operations ------------------------------------------------------------

    async def health(self) -> StoreHealth:
        """Round trip to the schema table: reachability, latency, schema version."""
        start = time.perf_counter()
        try:
            version = await self._run("health", self._ops.schema_version, write=False)
        except Exception as exc:
            return StoreHealth(backend=self.backend, ok=False, error=str(exc))
        return StoreHealth(
            backend=self.backend,
            ok=True,
            latency_s=time.perf_counter() - start,
            schema_version=version,
        )

    async def create(self, record: SessionRecord, *, limits: Limits | None = None) -> list[str]:
        fn = partial(
            self._ops.create,
            row=self._codec.row(record),
            principal=record.principal,
            limits=limits,
            lock_key=self._lock_key,
        )
        # With limits, the create takes the admission lock (PostgreSQL): it sorts
        # first among the writes of its transaction (key ""), so that lock is always
        # taken before any row lock and two transactions can never wait on each other.
        key = "" if limits is not None else record.id
        try:
            return await self._run("create", fn, write=True, key=key)
        except Exception as exc:
            if self._is_duplicate(exc):
                raise StoreError(f"duplicate session {record.id}") from None
            raise

    async def check_room(self, principal: str, limits: Limits) -> None:
        fn = partial(self._ops.check_room, principal=principal, limits=limits)
        await self._read("check_room", fn)

    async def load(
        self, session_id: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        fn = partial(self._ops.load, key=session_id, by_hash=False, known_version=known_version)
        return await self._read("load", fn)

    async def load_by_hash(
        self, handle_hash: str, *, known_version: int | None = None
    ) -> SessionRecord | None:
        fn = partial(self._ops.load, key=handle_hash, by_hash=True, known_version=known_version)
        return await self._read("load_by_hash", fn)

    async def mark_ready(self, session_id: str, at: float) -> None:
        fn = partial(self._ops.mark_ready, session_id=session_id, at=at)
        await self._run("mark_ready", fn, write=True, key=session_id)

    async def terminate(
        self, session_id: str, reason: TerminationReason, at: float, touch: Touch | None = None
    ) -> TerminationReason | None:
        fn = partial(self._ops.terminate, session_id=session_id, reason=reason, at=at, touch=touch)
        return await self._run("terminate", fn, write=True, key=session_id)

    async def expire(
        self,
        session_id: str,
        now: float,
        *,
        grace: float = 0.0,
        unchanged_since: float | None = None,
    ) -> TerminationReason | None:
        fn = partial(
            self._ops.expire,
            session_id=session_id,
            now=now,
            grace=grace,
            unchanged_since=unchanged_since,
        )
        return await self._run("expire", fn, write=True, key=session_id)

    async def patch_state(
        self,
        session_id: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None,
        at: float,
        max_bytes: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        fn = partial(
            self._ops.patch_state,
            session_id=session_id,
            patch=dict(patch),
            if_version=if_version,
            at=at,
            max_bytes=max_bytes,
        )
        return await self._run("patch_state", fn, write=True, key=session_id)

    async def touch(self, touches: Sequence[Touch]) -> None:
        if not touches:
            await trio.lowlevel.checkpoint()
            return
        fn = partial(self._ops.touch, touches=list(touches))
        await self._run("touch", fn, write=True, key=min(t.id for t in touches))

    async def list_by_principal(
        self,
        principal: str,
        *,
        include_terminated: bool = False,
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[SessionRecord]:
        fn = partial(
            self._ops.list_by_principal,
            principal=principal,
            include_terminated=include_terminated,
            after=after,
            limit=limit,
        )
        return await self._read("list_by_principal", fn)

    async def list_recent(self, limit: int = 20) -> list[SessionRecord]:
        return await self._run(
            "list_recent", partial(self._ops.list_recent, limit=limit), write=False
        )

    async def counts(self) -> dict[tuple[str, str], int]:
        return await self._run("counts", self._ops.counts, write=False)

    async def sweep(
        self,
        now: float,
        limit: int = 1000,
        *,
        grace: float = 0.0,
        holder: str | None = None,
        lease: float = 0.0,
    ) -> list[tuple[str, TerminationReason]]:
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        # Read first (no write lock): most sweeps find nothing and end here.
        find = partial(self._ops.sweep_find, now=now, limit=limit, grace=grace)
        ids = await self._read("sweep_find", find)
        if not ids:
            return []
        fn = partial(
            self._ops.sweep,
            ids=ids,
            now=now,
            grace=grace,
            lease=("sweep", holder, now + lease) if holder is not None else None,
        )
        return await self._run("sweep", fn, write=True)

    async def purge(self, before: float) -> int:
        if not await self._read("purge_find", partial(self._ops.purge_find, before=before)):
            return 0
        return await self._run("purge", partial(self._ops.purge, before=before), write=True)

    async def register_instance(self, instance: InstanceRecord) -> None:
        fn = partial(self._ops.register_instance, instance=instance)
        await self._run("register_instance", fn, write=True)

    async def heartbeat(self, instance_id: str, at: float, lease_until: float) -> bool:
        fn = partial(self._ops.heartbeat, instance_id=instance_id, at=at, lease_until=lease_until)
        return await self._run("heartbeat", fn, write=True)

    async def remove_instance(self, instance_id: str, at: float) -> list[str]:
        fn = partial(self._ops.remove_instance, instance_id=instance_id, at=at)
        return await self._run("remove_instance", fn, write=True)

    async def list_instances(self) -> list[InstanceRecord]:
        return await self._read("list_instances", self._ops.list_instances)

    async def check(self, now: float) -> list[str]:
        """See :meth:`SessionStore.check`. Each part is its own read, bounded by ``op_timeout``;
        the sessions are decoded in chunks of :attr:`check_chunk` rows, by id."""
        ops = self._ops
        problems = await self._run("check_integrity", ops.check_integrity, write=False)
        version = await self._run("check_schema", ops.schema_version, write=False)
        if version != LATEST_SCHEMA:
            problems.append(f"schema version {version}, this code expects {LATEST_SCHEMA}")
            if version < LATEST_SCHEMA:
                return problems  # the columns and tables the other parts read may be missing
        after: tuple[Any] | None = None  # from the first; then where the last chunk ended
        while True:
            fn = partial(ops.check_sessions, after=after, limit=self.check_chunk)
            found, after = await self._run("check_sessions", fn, write=False)
            problems.extend(found)
            if after is None:
                break
        fn_instances = partial(ops.check_instances, now=now)
        problems.extend(await self._run("check_instances", fn_instances, write=False))
        fn_orphans = partial(ops.check_orphans, now=now)
        problems.extend(await self._run("check_orphans", fn_orphans, write=False))
        return problems

    async def open(self, *, migrate: bool = True) -> None:
        """Connect and, unless ``migrate`` is false, apply pending migrations.

        With ``migrate=False`` the store changes nothing in the database (it
        creates no file, schema or table, and refuses every write) and records
        what it found in :attr:`found_schema` and :attr:`missing_schema`; only
        :meth:`check_as_found` and reads of an up-to-date schema make sense then.
        A schema newer than this code is refused either way (``SchemaTooNew``).
        """
        raise NotImplementedError

    async def check_as_found(self, now: float) -> list[str]:
        """:meth:`check` for a store opened with ``migrate=False``, whatever its schema.

        A missing PostgreSQL schema is the one problem; no mcp-sessions schema,
        or an older one, is reported after SQLite's integrity check, without the
        checks that read what later versions added; an up-to-date schema gets
        the whole :meth:`check`.
        """
        if self.missing_schema is not None:
            return [f"schema {self.missing_schema} does not exist"]
        fn = partial(found_schema_version, dialect=self.dialect)
        found = await self._run("check_schema", fn, write=False)
        self.found_schema = found
        if found >= LATEST_SCHEMA:
            return await self.check(now)
        problems = await self._run("check_integrity", self._ops.check_integrity, write=False)
        problems.append("no mcp-sessions schema" if found == 0 else schema_too_old_message(found))
        return problems

    async def reap_instances(self, before: float, at: float) -> list[str]:
        lapsed = await self._read(
            "lapsed_instances", partial(self._ops.lapsed_instances, before=before)
        )
        if not lapsed:
            return []
        fn = partial(self._ops.reap_instances, instance_ids=lapsed, before=before, at=at)
        return await self._run("reap_instances", fn, write=True)
