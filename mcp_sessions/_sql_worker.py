"""Group commit: worker threads that run the store's operations, many per transaction.

Theory of operation
===================

Trio tasks never touch a database connection. A task turns its operation into
an :class:`Op` (a synchronous function of a DB-API cursor), puts it on the
:class:`GroupCommit` queue and waits for its :class:`trio.Event`. Worker
threads (one for SQLite, whose writers are serialised anyway; one per pooled
connection for PostgreSQL) each take *everything* queued, up to
``max_batch``, and run it as at most two transactions, one for the reads and
one for the writes. So while one transaction is in flight, the operations
arriving meanwhile wait and then share the next one: 50 concurrent patches
cost a handful of transactions, not 50.

Inside a write transaction every operation runs in its own ``SAVEPOINT``: an
operation that fails on its own account (a version conflict, an ended or
unknown session, a duplicate, a bad value) is rolled back to its savepoint
and raises to its own caller only. A failure of the transaction itself (the
database locked past its busy timeout, the connection lost, the disk full)
fails every operation in it with :class:`~mcp_sessions._store.StoreUnavailable`.
A lone operation needs no savepoint: the transaction is its savepoint.

Results go back to trio with one ``run_sync_soon`` per transaction (not one
thread hop per operation), through the token of the run each caller waits in.

Giving up. A caller bounds its wait by ``op_timeout`` (and may be cancelled);
then it *abandons* its op, which is a state change under the worker's lock
(:meth:`GroupCommit.abandon`): an op abandoned while queued is never run; one
abandoned after it ran but before its transaction commits is never committed
(the transaction is rolled back and the others run again without it, since
they may have seen its writes); and the worker marks every op of a
transaction ``COMMITTING`` under the same lock just before ``COMMIT``, so the
caller learns when it is too late to take the op back (the outcome of a
``COMMIT`` in flight is unknowable, and the caller is told so).

:class:`Transactions` is what a backend supplies: a connection per hop, how
to begin and end a transaction, and which of its driver's exceptions concern
one operation and which the whole transaction.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from typing import Any, Generic, Protocol, TypeVar

import trio

from ._store import StoreUnavailable

__all__ = ["ABANDONED", "COMMITTING", "DONE", "Counters", "GroupCommit", "Op", "Transactions"]

T = TypeVar("T")

logger = logging.getLogger("mcp_sessions.store")

# Op states. Only the worker's lock changes them.
QUEUED = 0
RUNNING = 1
COMMITTING = 2
DONE = 3
ABANDONED = 4


class Transactions(Protocol):
    """The backend's side of the worker: connections, transactions and its driver's errors."""

    def connection(self) -> AbstractContextManager[Any]:
        """A connection for one hop (used by one worker thread at a time)."""

    def begin(self, conn: Any, cur: Any, write: bool) -> None:
        """Start a transaction (a write transaction takes the write lock where there is one)."""

    def commit(self, conn: Any, cur: Any, write: bool) -> None:
        """Commit the transaction."""

    def rollback(self, conn: Any) -> None:
        """Roll the transaction back, if one is open."""

    def usable(self, conn: Any) -> bool:
        """True when the transaction is still open and can run more statements."""

    def op_failed(self, exc: Exception) -> bool:
        """True when ``exc`` concerns the operation that raised it, not the transaction."""

    def retryable(self, exc: Exception) -> bool:
        """True when the whole transaction may simply be run again (deadlock, serialisation)."""

    def failure(self, exc: BaseException) -> Exception:
        """A fresh :class:`StoreUnavailable` for the failed transaction (one per caller)."""


class Counters:
    """What the workers of one store did, summed over its life (written under a worker's lock)."""

    __slots__ = ("failed_transactions", "largest_batch", "transactions", "write_transactions")

    def __init__(self) -> None:
        self.transactions = 0
        self.write_transactions = 0
        self.failed_transactions = 0
        self.largest_batch = 0


class _Batch:
    """The ops of one transaction in flight; ``live`` counts those not abandoned."""

    __slots__ = ("live",)

    def __init__(self, live: int) -> None:
        self.live = live


class Op(Generic[T]):
    """One store operation on its way through the worker."""

    __slots__ = ("batch", "done", "error", "fn", "key", "state", "token", "value", "write")

    def __init__(
        self, fn: Callable[[Any], T], write: bool, key: str | None, token: trio.lowlevel.TrioToken
    ) -> None:
        self.fn = fn
        self.write = write
        #: Sorts writes where the backend wants a stable lock order.
        self.key = key
        self.token = token
        self.state = QUEUED
        self.batch: _Batch | None = None
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def result(self) -> T:
        """The operation's return value, or raise its exception."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.value  # type: ignore[return-value]


def _deliver(ops: list[Op[Any]]) -> None:
    for op in ops:
        op.done.set()


class _Failed(Exception):
    """The transaction failed; ``retry`` says whether running it again may help."""

    def __init__(self, exc: BaseException, retry: bool) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.retry = retry


class GroupCommit:
    """A queue of operations drained by worker threads, one transaction per hop."""

    def __init__(
        self,
        transactions: Transactions,
        *,
        threads: int,
        name: str,
        counters: Counters,
        max_batch: int = 128,
        sort_writes: bool = False,
        multi_statement: bool = False,
        retries: int = 2,
    ) -> None:
        self._tx = transactions
        self._multi_statement = multi_statement
        self._max_batch = max_batch
        self._sort_writes = sort_writes
        self._retries = retries
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Op[Any]] = deque()
        self._stopping = False
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        self._counters = counters

    # -- the trio side ------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(
        self, fn: Callable[[Any], T], *, write: bool, key: str | None = None, where: str
    ) -> Op[T]:
        """Queue ``fn`` to run in a transaction; wait on the returned op's ``done``."""
        op = Op(fn, write, key, trio.lowlevel.current_trio_token())
        with self._cond:
            if self._stopping:
                raise StoreUnavailable(f"{where} is closed")
            self._queue.append(op)
            self._cond.notify()
        return op

    def abandon(self, op: Op[Any]) -> int:
        """The caller gave up: drop ``op`` unless it is committing or done; return its state."""
        with self._cond:
            state = op.state
            if state in (QUEUED, RUNNING):
                op.state = ABANDONED
                if op.batch is not None:
                    op.batch.live -= 1
            return state

    def queued(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        """Take no more operations; the workers finish what is queued, then exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self) -> None:
        """Wait (blocking: call it from a thread) until every worker has exited."""
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()

    # -- the worker threads -----------------------------------------------

    def all_abandoned(self) -> bool:
        """In a worker thread: has every caller of the running transaction given up?"""
        batch: _Batch | None = getattr(self._local, "batch", None)
        return batch is not None and batch.live <= 0

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                ops: list[Op[Any]] = []
                while self._queue and len(ops) < self._max_batch:
                    op = self._queue.popleft()
                    if op.state == QUEUED:
                        op.state = RUNNING
                        ops.append(op)
            reads = [op for op in ops if not op.write]
            writes = [op for op in ops if op.write]
            if self._sort_writes:
                writes.sort(key=lambda op: (op.key is None, op.key or ""))
            for group, write in ((reads, False), (writes, True)):
                if not group:
                    continue
                try:
                    self._transaction(group, write=write)
                except Exception as exc:  # a bug here: fail the ops rather than hang them
                    logger.exception("store worker failed")
                    self._finish([(op, None, exc) for op in group], write, failed=True)

    def _transaction(self, ops: list[Op[Any]], *, write: bool) -> None:
        for attempt in itertools.count():
            with self._cond:
                ops = [op for op in ops if op.state == RUNNING]
                batch = _Batch(len(ops))
                for op in ops:
                    op.batch = batch
            if not ops:
                return
            self._local.batch = batch
            try:
                ran = self._attempt(ops, write)
            except _Failed as failed:
                with self._cond:
                    committing = any(op.state == COMMITTING for op in ops)
                if failed.retry and not committing and attempt < self._retries:
                    continue
                outcomes = [(op, None, self._tx.failure(failed.exc)) for op in ops]
                self._finish(outcomes, write, failed=True)
                return
            finally:
                self._local.batch = None
            if ran:
                self._finish(ran, write)
            return

    def _attempt(
        self, ops: list[Op[Any]], write: bool
    ) -> list[tuple[Op[Any], Any, BaseException | None]]:
        tx = self._tx
        try:
            with tx.connection() as conn:
                cur = conn.cursor()
                try:
                    while True:
                        tx.begin(conn, cur, write)
                        ran, alive = self._run_ops(conn, cur, ops, write)
                        if not write:
                            break
                        with self._cond:
                            late = any(
                                op.state == ABANDONED and error is None for op, _, error in ran
                            )
                            if not late:
                                for op, _, _ in ran:
                                    if op.state == RUNNING:
                                        op.state = COMMITTING
                                break
                        # A caller gave up after its op ran: undo them all, run the rest again
                        # (they may have read what it wrote).
                        tx.rollback(conn)
                        ops = [op for op in ops if op.state != ABANDONED]
                        if not ops:
                            return []
                    if alive:
                        tx.commit(conn, cur, write)
                    return ran
                except BaseException:
                    with suppress(Exception):
                        tx.rollback(conn)
                    raise
                finally:
                    with suppress(Exception):
                        cur.close()
        except _Failed:
            raise
        except Exception as exc:
            raise _Failed(exc, tx.retryable(exc)) from exc

    def _run_ops(
        self, conn: Any, cur: Any, ops: list[Op[Any]], write: bool
    ) -> tuple[list[tuple[Op[Any], Any, BaseException | None]], bool]:
        """Run each op; return (op, value, error) for those that ran, and whether to commit."""
        tx = self._tx
        ran: list[tuple[Op[Any], Any, BaseException | None]] = []
        savepoints = write and len(ops) > 1
        release: str | None = None  # a savepoint to release before the next one
        alive = True
        for i, op in enumerate(ops):
            if op.state == ABANDONED:  # read without the lock: rechecked before COMMIT
                continue
            if not alive:  # a lone write failed and was rolled back
                tx.begin(conn, cur, write)
                alive = True
            savepoint = f"op{i}"
            if savepoints:
                self._savepoint(cur, savepoint, release)
                release = None
            try:
                value = op.fn(cur)
            except Exception as exc:
                if not tx.op_failed(exc):
                    raise _Failed(exc, tx.retryable(exc)) from exc
                ran.append((op, None, exc))
                if savepoints:
                    cur.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                    release = savepoint
                    if not tx.usable(conn):
                        raise _Failed(exc, False) from exc
                elif write or not tx.usable(conn):
                    tx.rollback(conn)
                    alive = False
            else:
                ran.append((op, value, None))
                if savepoints:
                    release = savepoint
        return ran, alive

    def _savepoint(self, cur: Any, name: str, release: str | None) -> None:
        if release is None:
            cur.execute(f"SAVEPOINT {name}")
        elif self._multi_statement:
            cur.execute(f"RELEASE SAVEPOINT {release}; SAVEPOINT {name}")
        else:
            cur.execute(f"RELEASE SAVEPOINT {release}")
            cur.execute(f"SAVEPOINT {name}")

    def _finish(
        self,
        ran: Sequence[tuple[Op[Any], Any, BaseException | None]],
        write: bool,
        *,
        failed: bool = False,
    ) -> None:
        """Record outcomes and statistics; wake the callers, one ``run_sync_soon`` per run.

        ``ran`` holds the ops of a committed transaction, or every op of a
        failed one (each with its own :class:`StoreUnavailable`).
        """
        by_token: dict[trio.lowlevel.TrioToken, list[Op[Any]]] = {}
        with self._cond:
            for op, value, error in ran:
                op.value, op.error = value, error
                if op.state != ABANDONED:
                    op.state = DONE
                op.batch = None
                by_token.setdefault(op.token, []).append(op)
            counters = self._counters
            if failed:
                counters.failed_transactions += 1
            else:
                counters.transactions += 1
                counters.write_transactions += write
                counters.largest_batch = max(counters.largest_batch, len(ran))
        for token, ops in by_token.items():
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(_deliver, ops)
