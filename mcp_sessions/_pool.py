"""One upstream's pool of client sessions: choice, queue, timeouts, breaker, restarts.

Theory of operation
===================

Every upstream session is a session of the gateway's own :class:`Supervisor`
(kind ``upstream``): INITIALIZING while its child starts and the client
connects, IDLE in the pool, ACTIVE while calls run in it (each call is a
``supervisor.request``), TERMINATING while its process group is stopped,
TERMINATED with a reason (``idle_timeout`` after ``idle_timeout`` unused,
``error`` when it died or broke, ``closed`` when its downstream session
ended, ``evicted`` to make room under the process cap, ``shutdown``). The
connection runs as the session's background task, so ending the session, for
any reason, cancels the client and stops the process; the supervisor owns
that task, as it owns every session's.

A call (:meth:`Pool.call`) goes:

1. the breaker: open means ``upstream_unavailable`` at once, nothing spawned;
   after the cooldown exactly one call goes through as the probe;
2. a member: shared isolation takes the least busy ready member with room
   (``concurrency`` calls each); if none has room, the call waits in a FIFO
   queue of at most ``queue_max`` for ``queue_timeout`` (``upstream_busy``
   otherwise), and a new member is started in the background when the pool is
   below ``max`` (and the restart backoff and the gateway's process cap allow):
   at once if none is up, else only if calls still wait ``_GROW_AFTER`` later.
   Session isolation takes the member bound to the caller's downstream
   session, starting it on first use; it ends when that session ends;
3. a member idle for ``ping_after`` is pinged first; a failed ping ends it
   (``error``) and the call takes another;
4. the call, bounded by ``call_timeout`` (``upstream_timeout``; the client
   cancels the request upstream). ``CONNECTION_CLOSED`` or the member's end
   under the call is ``upstream_error``, and the member ends with ``error``.

Its outcome goes to the breaker: a timeout, a dead upstream or a failed start
is a failure; an answer (a tool error too) a success. Failed starts back off
exponentially with jitter: until the next start is due, calls that need one
fail fast. Nothing restarts by itself except to keep ``min`` warm, and that
only while the breaker is closed and the backoff allows.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
from mcp.client.client import Client
from mcp.client.subscriptions import (
    ListenNotSupportedError,
    PromptsListChanged,
    ResourcesListChanged,
    SubscriptionLost,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, Implementation
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from . import __version__
from ._breaker import Backoff, Breaker, BreakerState
from ._errors import (
    SessionError,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._gateway_config import UpstreamConfig
from ._session import Session, SessionKind
from ._state import SessionState, TerminationReason
from ._upstream import UpstreamProcess, http_upstream, stdio_upstream

if TYPE_CHECKING:
    from mcp.client.session import IncomingMessage

    from ._gateway import Gateway, GatewayMetrics

__all__ = ["Member", "Pool"]

logger = logging.getLogger("mcp_sessions.gateway")

T = TypeVar("T")
#: The runtime's idle timeout for members: never (the pool's upkeep decides, keeping ``min``).
_FOREVER = 364 * 24 * 3600.0
#: How long calls must keep waiting for busy members before another member is started.
_GROW_AFTER = 0.1
#: The longest a ping before reuse may take (``call_timeout`` if shorter).
_PING_TIMEOUT = 5.0


@attrs.define(eq=False)
class Member:
    """One upstream session: the runtime session, its client once connected, its use."""

    session: Session
    #: The downstream session it belongs to (session isolation), else None.
    owner: str | None
    #: Started by the upkeep to keep ``min`` (no call waits for it: it reports its own failure).
    warm: bool
    process: UpstreamProcess | None
    client: Client | None = None
    in_use: int = 0
    last_used: float = 0.0
    #: Set once connected, or once the start failed (then ``error`` says why).
    ready: trio.Event = attrs.field(factory=trio.Event)
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.client is not None and self.session.live


@attrs.define(eq=False)
class _Waiter:
    woken: trio.Event = attrs.field(factory=trio.Event)
    member: Member | None = None
    error: SessionError | None = None


class Pool:
    """The members of one upstream and the calls waiting for them."""

    def __init__(self, gateway: Gateway, config: UpstreamConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.name = config.name
        self.members: list[Member] = []
        self._owned: dict[str, Member] = {}
        #: Owners whose member is being started (their other calls wait for it).
        self._owning: dict[str, trio.Event] = {}
        #: Owners that ended while their member was being started.
        self._orphaned: set[str] = set()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        #: Members asked for whose session does not exist yet.
        self._creating = 0
        b = config.breaker
        self.breaker = Breaker(failures=b.failures, window=b.window, cooldown=b.cooldown)
        self._backoff = Backoff(base=b.backoff_base, cap=b.backoff_max)
        self._next_start = -math.inf
        #: The upkeep's own restarts wait for this (a member that died backs it off).
        self._upkeep_after = -math.inf
        self._capped = False
        self._growing = False
        self._changed = trio.Event()
        self.restarts = 0
        self.started = 0
        self.last_error: str | None = None
        #: Listings, dropped when the upstream says they changed.
        self.listings: dict[str, Any] = {}
        #: Bumped on each change, so a listing that raced a change is not kept.
        self.generations: dict[str, int] = {}

    def bind_metrics(self, metrics: GatewayMetrics) -> None:
        """Take this upstream's series of the gateway's metrics (looked up once, not per call)."""
        self._metrics = metrics
        self._calls = metrics.calls.labels(self.name)
        self._waiting = metrics.waiting.labels(self.name)
        self._wait_seconds = metrics.wait_seconds.labels(self.name)

    def _error(self, exc: SessionError) -> None:
        self._metrics.errors.labels(self.name, exc.code).inc()

    # -- calls ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[Client], Awaitable[T]], *, owner: str | None = None) -> T:
        """Run ``fn(client)`` on a member; raise the ``upstream_*`` error that says why not."""
        self._calls.inc()
        now = trio.current_time()
        if not self.breaker.allow(now):
            error: SessionError = UpstreamUnavailable(
                self.name,
                f"circuit breaker open after repeated failures ({self.last_error or 'no detail'})",
                retry_in=self.breaker.retry_in(now),
            )
            self._error(error)
            raise error
        # True: answered; False: failed (a timeout: each is its own failure); None: neither
        # (a death or a failed start is one failure, counted once where it happens).
        outcome: bool | None = None
        try:
            member = await self._acquire(owner)
            try:
                result = await self._run(member, fn)
            finally:
                self._release(member)
            outcome = True
            self._backoff.reset()  # it served a call: it is up
            return result
        except UpstreamTimeout as exc:
            outcome = False
            self._error(exc)
            raise
        except (UpstreamUnavailable, UpstreamFailed) as exc:
            self._error(exc)
            raise
        except SessionError as exc:
            self._error(exc)
            raise
        except MCPError:  # the upstream answered, with a protocol error: its answer
            outcome = True
            raise
        finally:
            now = trio.current_time()
            if outcome is True:
                self.breaker.record_success(now)
            elif outcome is False:
                self.breaker.record_failure(now)
            else:
                self.breaker.release_probe(now)

    async def _run(self, member: Member, fn: Callable[[Client], Awaitable[T]]) -> T:
        client = member.client
        assert client is not None
        timeout = self.config.pool.call_timeout
        try:
            async with self.gateway.supervisor.request(member.session):
                with trio.move_on_after(timeout):
                    return await fn(client)
        except MCPError as exc:
            if exc.code != CONNECTION_CLOSED:
                raise
            why = member.process.why if member.process is not None else None
            self._fail(member, why or "the connection to the upstream closed")
            raise UpstreamFailed(self.name, member.error or "the upstream went away") from None
        except SessionError as exc:
            # The member ended under the call (its process died), or refused it.
            if member.error is None:
                raise UpstreamUnavailable(self.name, exc.message) from None
            raise UpstreamFailed(self.name, member.error) from None
        self.last_error = f"no answer within {timeout:g} s (call_timeout)"
        raise UpstreamTimeout(self.name, f"{self.last_error}; cancelled upstream")

    async def _acquire(self, owner: str | None) -> Member:
        while True:
            member = await self._choose(owner)
            try:
                fresh = await self._fresh(member)
            except BaseException:
                self._release(member)
                raise
            if fresh:
                return member
            self._release(member)

    async def _choose(self, owner: str | None) -> Member:
        if owner is not None:
            return await self._owned_member(owner)
        if not self._waiters:
            member = self._least_busy()
            if member is not None:
                self._take(member)
                return member
        self._grow(extra=1)
        if len(self._waiters) >= self.config.pool.queue_max:
            raise UpstreamBusy(self.name, f"all upstream sessions are busy and "
                               f"{len(self._waiters)} calls are waiting")  # fmt: skip
        if not self.members and not self._creating:
            raise self._cannot_start()
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._waiting.inc()
        start = trio.current_time()
        try:
            with trio.move_on_after(self.config.pool.queue_timeout):
                await waiter.woken.wait()
        except BaseException:
            if waiter.member is not None:  # handed a member, but the caller went away
                self._release(waiter.member)
            raise
        finally:
            self._waiting.dec()
            self._wait_seconds.observe(trio.current_time() - start)
            if not waiter.woken.is_set():
                self._waiters.remove(waiter)
        if waiter.member is not None:
            return waiter.member
        if waiter.error is not None:
            raise waiter.error
        raise UpstreamBusy(self.name, f"waited {self.config.pool.queue_timeout:g} s "
                           "(queue_timeout) for an upstream session")  # fmt: skip

    async def _owned_member(self, owner: str) -> Member:
        while True:
            member = self._owned.get(owner)
            if member is not None and member.session.live:
                break
            starting = self._owning.get(owner)
            if starting is not None:  # another call of this session starts it: wait for it
                await starting.wait()
                member = self._owned.get(owner)
                if member is None:
                    raise self._cannot_start()
                continue
            owned = sum(1 for m in self.members if m.owner is not None and m.session.live)
            if owned + len(self._owning) >= self.config.pool.max:
                raise UpstreamBusy(self.name, f"all {self.config.pool.max} upstream sessions "
                                   "are bound to other sessions")  # fmt: skip
            if trio.current_time() < self._next_start:
                raise self._cannot_start()
            self._owning[owner] = done = trio.Event()
            try:
                self._creating += 1
                started = await self._start(owner, False)
                if started is None:
                    raise self._cannot_start()
                if owner in self._orphaned:  # its session ended while this one started
                    self.gateway.supervisor.terminate(started.session, TerminationReason.CLOSED)
                    raise UpstreamUnavailable(self.name, "the session it was for has ended")
                self._owned[owner] = member = started
            finally:
                del self._owning[owner]
                self._orphaned.discard(owner)
                done.set()
            break
        await member.ready.wait()
        if not member.usable:
            raise UpstreamUnavailable(self.name, member.error or "the upstream did not start")
        self._take(member)
        return member

    async def _fresh(self, member: Member) -> bool:
        """Ping a member that has been idle a while; False (and it ends) if it does not answer."""
        idle = trio.current_time() - member.last_used
        if member.in_use > 1 or idle < self.config.pool.ping_after:
            return True
        client = member.client
        assert client is not None
        try:
            with trio.fail_after(min(_PING_TIMEOUT, self.config.pool.call_timeout)):
                if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    await client.session.send_discover(client.protocol_version)
                else:
                    await client.session.send_ping()
        except (MCPError, trio.TooSlowError) as exc:
            self._fail(member, f"did not answer a ping after {idle:.0f} s idle ({exc})")
            return False
        return True

    def _least_busy(self) -> Member | None:
        best: Member | None = None
        room = self.config.pool.concurrency
        for member in self.members:
            free = member.owner is None and member.usable and member.in_use < room
            if free and (best is None or member.in_use < best.in_use):
                best = member
        return best

    def _take(self, member: Member) -> None:
        member.in_use += 1

    def _release(self, member: Member) -> None:
        member.in_use -= 1
        member.last_used = trio.current_time()
        if member.in_use == 0:
            self._changed.set()
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free members to waiting calls, in order; fail them if nothing can come."""
        while self._waiters:
            member = self._least_busy()
            if member is None:
                break
            waiter = self._waiters.popleft()
            self._take(member)
            waiter.member = member
            waiter.woken.set()
        if self._waiters:
            if not self._capped:  # (at the cap, only a new call tries again: no spinning)
                self._grow()
            if not self._starting() and not any(m.usable for m in self.members):
                error = self._cannot_start()
                while self._waiters:
                    waiter = self._waiters.popleft()
                    waiter.error = error
                    waiter.woken.set()

    def _cannot_start(self) -> SessionError:
        now = trio.current_time()
        retry = max(0.0, self._next_start - now)
        if self.gateway.stopping:
            return UpstreamUnavailable(self.name, "the gateway is shutting down")
        if self._capped:
            return UpstreamBusy(self.name, f"the gateway runs its cap of "
                                f"{self.gateway.config.max_processes} child processes")  # fmt: skip
        why = self.last_error or "it could not be started"
        return UpstreamUnavailable(self.name, f"{why}; next start in {retry:.1f} s",
                                   retry_in=retry)  # fmt: skip

    # -- members -------------------------------------------------------------------------

    def _live_count(self) -> int:
        """Members alive or on their way (the cap ``max`` counts these)."""
        return self._creating + sum(1 for m in self.members if m.session.live)

    def _starting(self) -> int:
        return self._creating + sum(1 for m in self.members if not m.ready.is_set())

    def _grow(self, extra: int = 0) -> None:
        """Start one more shared member in the background if the waiting calls (and
        ``extra`` about to wait) need more than what is starting, and the pool may."""
        if self._least_busy() is not None or self.gateway.stopping:
            return
        demand = len(self._waiters) + extra
        if demand <= self._starting() * self.config.pool.concurrency:
            return
        if self._live_count() >= self.config.pool.max or trio.current_time() < self._next_start:
            return
        if any(m.usable for m in self.members):
            # Busy members free up within milliseconds for quick tools: add a process
            # only if the queue is still there a moment later (more processes than
            # cores only slow everyone down).
            if not self._growing:
                self._growing = True
                self.gateway.start_soon(self._grow_later)
            return
        self._creating += 1  # counted now: the next call sees it coming
        self.gateway.start_soon(self._start, None, False)

    async def _grow_later(self) -> None:
        try:
            await trio.sleep(_GROW_AFTER)
        finally:
            self._growing = False
        still_waiting = self._waiters and self._least_busy() is None
        if (
            still_waiting
            and not self.gateway.stopping
            and self._live_count() < self.config.pool.max
            and not self._starting()
            and trio.current_time() >= self._next_start  # (a start failed meanwhile)
        ):
            self._creating += 1
            await self._start(None, False)

    def _fail(self, member: Member, why: str) -> None:
        """A member died or broke: end it; one failure for the breaker, and the upkeep
        waits a backoff before it replaces it (a call may start a new one at once)."""
        if member.error is None:
            member.error = why
            self.last_error = why
            self.restarts += 1
            now = trio.current_time()
            self.breaker.record_failure(now)
            self._upkeep_after = now + self._backoff.next_delay()
            logger.warning("upstream %s: session %s ended: %s", self.name, member.session.id,
                           why)  # fmt: skip
        self.gateway.supervisor.terminate(member.session, TerminationReason.ERROR)

    async def _start(self, owner: str | None, warm: bool) -> Member | None:
        """Start a member; return it once its task runs (not yet ready), or None if refused.

        The caller has counted it in ``_creating``; this uncounts it, whatever happens
        (a cancelled caller too). A warm start (nobody waiting) never evicts another.
        """
        creating = True
        reserved = self.gateway.reserve(self, evict=not warm)  # before any await: no race
        try:
            self._capped = not reserved
            if not reserved:
                return None
            session = await self.gateway.supervisor.create_session(
                kind=SessionKind.UPSTREAM,
                principal=f"upstream:{self.name}",
                metadata={"upstream": self.name, **({"owner": owner} if owner else {})},
                idle_timeout=_FOREVER,  # the pool ends idle members itself (see upkeep)
                ready=False,
            )
            process = UpstreamProcess(self.config.command or "") if self.config.is_stdio else None
            member = Member(session=session, owner=owner, warm=warm, process=process,
                            last_used=trio.current_time())  # fmt: skip
            self.members.append(member)  # counted as live from here on
            self._creating -= 1
            creating = False
            self.gateway.release(self)
            reserved = False
            self.started += 1
            try:
                self.gateway.supervisor.start_background(
                    session, self._connect, member, name=f"upstream {self.name} {session.id}"
                )
            except SessionError:  # ended already (the gateway is stopping)
                member.ready.set()
                self._forget(member)
                return None
            return member
        except SessionError as exc:
            self.last_error = exc.message
            return None
        finally:
            if reserved:
                self.gateway.release(self)
            if creating:
                self._creating -= 1
                self._dispatch()

    def _transport(self, member: Member) -> AbstractAsyncContextManager[Any]:
        config = self.config
        if config.command is not None:
            return stdio_upstream(
                config.command,
                config.args,
                env=config.env,
                cwd=config.cwd,
                process=member.process,
            )
        assert config.url is not None
        return http_upstream(config.url, config.headers, read_timeout=config.pool.call_timeout)

    async def _connect(self, member: Member) -> None:
        """The member's life: connect, serve calls until it ends, stop the upstream."""
        supervisor = self.gateway.supervisor
        connected = False
        try:
            deadline = trio.current_time() + self.config.pool.start_timeout
            with trio.CancelScope(deadline=deadline) as starting:
                client = Client(
                    self._transport(member),
                    mode="auto",
                    cache=None,
                    message_handler=self._on_message,
                    client_info=Implementation(name="mcp-sessions-gateway", version=__version__),
                )
                async with client:
                    starting.deadline = math.inf
                    connected = True
                    member.client = client
                    if not member.session.live:  # ended while it connected
                        return
                    supervisor.mark_ready(member.session)
                    member.ready.set()
                    self._backoff.reset()
                    if member.owner is None:
                        self._dispatch()
                    try:
                        async with trio.open_nursery() as watching:
                            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                                watching.start_soon(self._listen, client)
                            if member.process is not None:
                                await member.process.exited.wait()
                                self._fail(member, member.process.why or "the upstream exited")
                            await trio.sleep_forever()
                    finally:
                        member.client = None
            if not connected:
                raise trio.TooSlowError
        except Exception as exc:
            if connected:
                raise
            self._start_failed(member, exc)
        finally:
            member.ready.set()
            self._forget(member)

    def _start_failed(self, member: Member, exc: BaseException) -> None:
        why = _describe(exc)
        if member.process is not None and member.process.why is not None:
            why = f"{why} ({member.process.why})"
        delay = self._backoff.next_delay()
        self._next_start = trio.current_time() + delay
        self.restarts += 1
        member.error = why
        self.last_error = f"start failed: {why}"
        logger.warning("upstream %s did not start: %s; next try not before %.1f s",
                       self.name, why, delay)  # fmt: skip
        self.breaker.record_failure(trio.current_time())  # once, whoever waited for it
        self.gateway.supervisor.terminate(member.session, TerminationReason.ERROR)
        if not any(m.usable for m in self.members):
            # The calls waiting for it hear now; none of them starts another.
            error = UpstreamUnavailable(self.name, self.last_error, retry_in=delay)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = error
                waiter.woken.set()

    def _forget(self, member: Member) -> None:
        self._changed.set()
        if member in self.members:
            self.members.remove(member)
        if member.owner is not None and self._owned.get(member.owner) is member:
            del self._owned[member.owner]
        self._dispatch()

    def changed(self, kind: str) -> None:
        """The upstream's ``kind`` (tools, resources, prompts) changed: list it afresh
        (resources: their templates too)."""
        for listed in (kind, "resource_templates") if kind == "resources" else (kind,):
            self.listings.pop(listed, None)
            self.generations[listed] = self.generations.get(listed, 0) + 1
        self.gateway.announce(kind)

    async def _listen(self, client: Client) -> None:
        """2026-07-28: list changes come on a ``subscriptions/listen`` stream."""
        kinds = {ToolsListChanged: "tools", PromptsListChanged: "prompts",
                 ResourcesListChanged: "resources"}  # fmt: skip
        try:
            async with client.listen(
                tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True
            ) as subscription:
                async for event in subscription:
                    kind = kinds.get(type(event))
                    if kind is not None:
                        logger.info("upstream %s: %s changed", self.name, kind)
                        self.changed(kind)
        except (MCPError, SubscriptionLost, ListenNotSupportedError, TimeoutError) as exc:
            # Listings are then kept until this session ends (a new one lists afresh).
            logger.info("upstream %s: no list-change events (%s)", self.name, exc)

    async def _on_message(self, message: IncomingMessage) -> None:
        method = getattr(message, "method", None)
        if isinstance(method, str) and method.endswith("/list_changed"):
            kind = method.split("/")[1]  # tools, resources, prompts
            logger.info("upstream %s: %s changed", self.name, kind)
            self.changed(kind)
        await trio.lowlevel.checkpoint()

    # -- ownership and upkeep ------------------------------------------------------------

    def end_owner(self, owner: str) -> None:
        """The downstream session ``owner`` ended: so does its upstream session."""
        if owner in self._owning:
            self._orphaned.add(owner)
        member = self._owned.pop(owner, None)
        if member is not None:
            self.gateway.supervisor.terminate(member.session, TerminationReason.CLOSED)

    def evictable(self) -> Member | None:
        """The longest-idle shared member nobody uses (to make room under the process cap)."""
        idle = [m for m in self.members if m.owner is None and m.in_use == 0 and m.usable]
        return min(idle, key=lambda m: m.last_used, default=None)

    async def upkeep(self) -> None:
        """Keep ``min`` members while the breaker is closed, and end those idle past
        ``idle_timeout`` beyond ``min``; the gateway runs this for each pool."""
        pool = self.config.pool
        while True:
            now = trio.current_time()
            idle = sorted(
                (m for m in self.members
                 if m.owner is None and m.usable and m.in_use == 0),
                key=lambda m: m.last_used,
            )  # fmt: skip
            spare = self._live_count() - pool.min
            for member in idle[: max(0, spare)]:
                if now - member.last_used >= pool.idle_timeout:
                    self.gateway.supervisor.terminate(
                        member.session, TerminationReason.IDLE_TIMEOUT
                    )
            due = max(self._next_start, self._upkeep_after) - now
            if (
                self._live_count() < pool.min
                and not self._starting()
                and due <= 0
                and self.breaker.state(now) is BreakerState.CLOSED
            ):
                self._creating += 1
                if await self._start(None, True) is not None:
                    continue
                due = 1.0  # no room (the process cap): look again later, or when woken
            # Look again when the oldest idle member is due, a backoff or a cooldown
            # ends, or a member ends or is released.
            wake = [1.0]
            if idle and spare > 0:
                wake.append(idle[0].last_used + pool.idle_timeout - now)
            if due > 0:
                wake.append(due)
            self._changed = trio.Event()
            with trio.move_on_after(max(0.01, min(wake))):
                await self._changed.wait()

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        states = collections.Counter(m.session.state.value for m in self.members)
        return {
            "transport": "stdio" if self.config.is_stdio else "http",
            "sessions": {s.value: states.get(s.value, 0) for s in SessionState},
            "in_use": sum(m.in_use for m in self.members),
            "waiting": len(self._waiters),
            "breaker": self.breaker.state(now).value,
            "retry_in_s": round(self.breaker.retry_in(now), 3),
            "started": self.started,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "pids": [m.process.pid for m in self.members if m.process and m.process.pid],
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "did not connect in time"
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions[0] if exc.exceptions else exc
        return _describe(inner)
    if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
        return "the upstream closed the connection while starting"
    if isinstance(exc, OSError):
        return f"cannot run it: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__
