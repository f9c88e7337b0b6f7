"""Instances: each process that serves sessions from a shared store holds a lease on it.

Theory of operation
===================

A process registers an :class:`~mcp_sessions._store.InstanceRecord` when its
runtime opens the store, and its lease task renews it every
``instance_lease / 8`` seconds, each time until ``5/8`` of the lease ahead.
Connection sessions record their instance; handle sessions belong to nobody.

After each renewal the task reaps: every instance whose lease ended before
*this process's previous renewal* is gone (killed with ``-9``, or its host
died), so its live connection sessions end with ``disconnected`` and its
record is forgotten. Comparing with our own previous renewal rather than with
"now" is what keeps a sleeping laptop honest: when every process wakes at
once with every lease lapsed, nobody's lease ended before anybody's previous
renewal, so each renews before anyone reaps (and the cutoff is never later
than one interval ago, for a wall clock that stepped back). A process killed right after a
renewal at ``t`` has its lease end at ``t + 5/8 L``; every live process
renews within ``L/8`` after that and reaps on the renewal after, so its
sessions end by ``t + 7/8 L``: within the lease ``L``.

A process that finds its own record gone (it was paused past its lease, and
reaped) registers again and checks its connection sessions against the
store: those that were ended elsewhere end here too.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from ._clock import RuntimeClock
from ._store import InstanceRecord, SessionStore

if TYPE_CHECKING:
    from ._sync_expiry import Call

__all__ = ["InstanceLease"]

logger = logging.getLogger("mcp_sessions")
_T = TypeVar("_T")


class InstanceLease:
    """This process's instance record and the task that renews it and reaps lapsed ones."""

    def __init__(
        self,
        store: SessionStore,
        clock: RuntimeClock,
        lease: float,
        *,
        call: Call,
        reaped: Callable[[list[str]], None],
        lost: Callable[[], Awaitable[None]],
    ) -> None:
        self.id = "i_" + secrets.token_urlsafe(9)
        self.interval = lease / 8
        self._store = store
        self._clock = clock
        self._call = call
        self._reaped = reaped
        self._lost = lost
        self._started_at = 0.0
        #: Wall time of our last successful renewal: the reaping cutoff.
        self._renewed_at: float | None = None
        #: We were reaped: our connection sessions must be checked against the store.
        self._check_pending = False

    def _record(self, now: float) -> InstanceRecord:
        from . import __version__

        return InstanceRecord(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=self._started_at,
            heartbeat_at=now,
            lease_until=now + 5 * self.interval,
        )

    async def register(self) -> None:
        now = self._clock.wall()
        if self._renewed_at is None:
            self._started_at = now
        await self._call(self._store.register_instance(self._record(now)))
        self._renewed_at = now

    async def renew(self) -> None:
        """Renew the lease, then end what lapsed instances left behind."""
        store, now = self._store, self._clock.wall()
        if not await self._call(store.heartbeat(self.id, now, now + 5 * self.interval)):
            logger.warning("this instance's lease had lapsed and was reaped; registering again")
            await self.register()
            self._check_pending = True
        if self._check_pending:  # until it succeeds
            await self._lost()
            self._check_pending = False
        before, self._renewed_at = self._renewed_at, now
        if before is not None:
            # Never past one interval ago, read afresh: after the wall clock stepped
            # back (even while we renewed), our previous renewal is "in the future" of
            # leases renewed since.
            before = min(before, self._clock.wall() - self.interval)
            ended = await self._call(store.reap_instances(before, now))
            if ended:
                logger.info("ended %d connection sessions of lapsed instances", len(ended))
                self._reaped(ended)

    async def run(self) -> None:
        """The lease task (owned by the supervisor's nursery)."""
        while True:
            await trio.sleep(self.interval)
            try:
                await self.renew()
            except Exception as exc:
                logger.warning("could not renew this instance's lease: %s", exc)

    async def remove(self) -> None:
        """Forget this instance (a clean stop), ending any connection session of ours
        whose end could not be written, so none is left live without an instance."""
        await self._call(self._store.remove_instance(self.id, self._clock.wall()))
