"""A session, what it is called, and what it looks like from outside.

Theory of operation
===================

:class:`Session` is a record with read-only properties. It holds no logic of
its own beyond reading; every field has exactly one writer, named next to
it in ``__slots__``:

- identity (id, kind, principal, client, metadata, handle hash, idle
  timeout, lifetime end): set once, at construction;
- ``_state``, ``_reason``, ``_ready``, ``_done``: the lifecycle
  (:mod:`mcp_sessions._lifecycle`), through ``_state.apply``;
- ``_in_flight``, ``_last_active``, ``_idle_since``, ``_requests``,
  ``_errors``, ``_scopes``: request accounting (:mod:`mcp_sessions._requests`);
- ``_nursery``, ``_parked``, ``_pending``, ``_background``, ``_torn_down``:
  the session's own task (:mod:`mcp_sessions._tasks`);
- ``_doc``, ``_version``, ``_sync``: store synchronisation
  (:mod:`mcp_sessions._sync`).

The few things a session can *do* (patch its state, start background work,
describe itself) go to its supervisor's public methods; a session has no
path into the supervisor's internals.

Times named ``*_time`` or ``idle_since``/``lifetime_end`` are on trio's clock
(so ``MockClock`` drives them); a :class:`SessionSnapshot` carries wall-clock
times for people and stores.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._errors import gone
from ._state import SessionState, TerminationReason

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = [
    "LIVE_STATES",
    "ClientInfo",
    "Session",
    "SessionKind",
    "SessionSnapshot",
    "hash_handle",
    "new_session_id",
    "snapshot_of",
]

_S = SessionState
#: States in which a session accepts requests.
LIVE_STATES = frozenset({_S.INITIALIZING, _S.ACTIVE, _S.IDLE})


class SessionKind(enum.Enum):
    """How a session came to be."""

    #: Handshake era: one per connection, from open to EOF.
    CONNECTION = "connection"
    #: Any era: opened explicitly, referenced by a secret handle.
    HANDLE = "handle"
    #: The gateway's side: a client session to an upstream server (a child process or a URL).
    UPSTREAM = "upstream"


@attrs.frozen
class ClientInfo:
    """What the client said about itself."""

    name: str | None = None
    version: str | None = None
    protocol_version: str | None = None
    capabilities: Mapping[str, Any] = attrs.field(factory=dict, converter=MappingProxyType)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "protocol_version": self.protocol_version,
            "capabilities": dict(self.capabilities),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientInfo:
        caps = data.get("capabilities")
        return cls(
            name=_str_or_none(data.get("name")),
            version=_str_or_none(data.get("version")),
            protocol_version=_str_or_none(data.get("protocol_version")),
            capabilities=dict(caps) if isinstance(caps, Mapping) else {},
        )


NO_CLIENT = ClientInfo()
NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def hash_handle(handle: str) -> str:
    """The SHA-256 hex digest under which a handle is stored. Handles never are."""
    return hashlib.sha256(handle.encode("utf-8", "surrogatepass")).hexdigest()


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


@attrs.frozen(kw_only=True)
class SessionSnapshot:
    """A session at one moment. Wall-clock times are seconds since the epoch."""

    #: Public, non-secret id: fine for logs, metrics and listings.
    id: str
    kind: SessionKind
    principal: str
    state: SessionState
    #: Why it ended; ``None`` while live.
    reason: TerminationReason | None
    client: ClientInfo
    metadata: Mapping[str, Any]
    created_at: float
    last_active: float
    idle_timeout: float
    #: When its ``max_lifetime`` runs out, however much it is used.
    lifetime_ends_at: float
    #: When it idles out if nothing happens (``None`` unless IDLE); never after
    #: ``lifetime_ends_at``.
    idle_expires_at: float | None
    requests: int
    errors: int
    in_flight: int
    background_tasks: int
    #: Version of the state document; starts at 0, +1 per patch.
    version: int


class Session:
    """One session. Read it through its properties and :meth:`snapshot`; change
    it through the supervisor.

    ``__slots__`` keeps a live session small: the runtime holds tens of
    thousands of them.
    """

    __slots__ = (  # noqa: RUF023 (grouped by writer, not sorted)
        # identity: set once, here
        "_owner",
        "client",
        "created_at",
        "handle_hash",
        "id",
        "idle_timeout",
        "kind",
        "lifetime_end",
        "metadata",
        "principal",
        "resumed",
        # lifecycle (the only writer of state and reason)
        "_done",
        "_ready",
        "_reason",
        "_state",
        # request accounting
        "_errors",
        "_idle_since",
        "_in_flight",
        "_last_active",
        "_requests",
        "_scopes",
        # the session's own task
        "_background",
        "_nursery",
        "_parked",
        "_pending",
        "_torn_down",
        # store synchronisation
        "_doc",
        "_sync",
        "_version",
        "__weakref__",  # so users (and tests) can see a session is gone
    )

    def __init__(
        self,
        owner: Supervisor,
        *,
        session_id: str,
        kind: SessionKind,
        principal: str,
        client: ClientInfo,
        metadata: Mapping[str, Any],
        idle_timeout: float,
        handle_hash: str | None,
        created_at: float,
        now: float,
        lifetime_end: float,
        resumed: bool = False,
    ) -> None:
        self._owner = owner
        self.id = session_id
        self.kind = kind
        self.principal = principal
        self.client = client
        self.metadata = metadata
        self.idle_timeout = idle_timeout
        self.handle_hash = handle_hash
        #: Wall-clock creation time.
        self.created_at = created_at
        #: When the absolute lifetime runs out, on trio's clock.
        self.lifetime_end = lifetime_end
        #: Brought back from the store (after a restart, or opened by another
        #: process) rather than created here.
        self.resumed = resumed
        self._state = _S.INITIALIZING
        self._reason: TerminationReason | None = None
        self._ready: trio.Event | None = None
        self._done: trio.Event | None = None
        self._in_flight = 0
        self._last_active = now
        self._idle_since = now
        self._requests = 0
        self._errors = 0
        self._scopes: set[trio.CancelScope] | None = None
        self._background = 0
        self._nursery: trio.Nursery | None = None
        self._parked: trio.lowlevel.Task | None = None
        self._pending: (
            list[tuple[Callable[..., Awaitable[object]], tuple[object, ...], str]] | None
        ) = None
        self._torn_down = False
        self._doc: dict[str, Any] | None = None
        self._version = 0
        self._sync: object = None

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.kind.value} {self._state.value}>"

    # -- reading -----------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def reason(self) -> TerminationReason | None:
        """Why it ended (set on entering TERMINATING); ``None`` while live."""
        return self._reason

    @property
    def live(self) -> bool:
        """True while the session accepts requests (not TERMINATING or TERMINATED)."""
        return self._state in LIVE_STATES

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def last_active_time(self) -> float:
        """When a request last started or finished here, on trio's clock."""
        return self._last_active

    @property
    def idle_since(self) -> float | None:
        """When it last became IDLE, on trio's clock; ``None`` unless IDLE."""
        return self._idle_since if self._state is _S.IDLE else None

    @property
    def version(self) -> int:
        return self._version

    @property
    def background_tasks(self) -> int:
        return self._background

    @property
    def task_done(self) -> bool:
        """True once the session's own task (and so its nursery) has finished."""
        return self._torn_down and self._state is _S.TERMINATED

    def state_document(self) -> dict[str, Any]:
        """A copy of the session's JSON state document."""
        return copy.deepcopy(self._doc) if self._doc else {}

    def snapshot(self) -> SessionSnapshot:
        return self._owner.snapshot(self)

    # -- changing (through the supervisor) ----------------------------------------

    async def patch_state(self, patch: Mapping[str, Any], *, if_version: int | None = None) -> int:
        """Apply an RFC 7386 JSON Merge Patch to the state document; return the new version.

        With ``if_version``, the patch applies only if the document is still at
        that version; otherwise :class:`VersionConflict`. With a store, the
        patch is committed there (serialised against every other process)
        before this returns.
        """
        return await self._owner.patch_state(self, patch, if_version=if_version)

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Run ``fn(*args)`` as background work owned by this session.

        It is cancelled when the session ends. If it raises, the error is
        logged and counted and the session ends with reason ``error``; nothing
        else is affected.
        """
        self._owner.start_background(self, fn, *args, name=name)

    def check_live(self) -> None:
        """Raise :class:`SessionClosed`/:class:`SessionExpired` if it has ended."""
        if self._state not in LIVE_STATES:
            raise gone(self.id, self._reason)


def snapshot_of(session: Session, wall_at: Callable[[float], float]) -> SessionSnapshot:
    """``session`` now, its trio-clock times mapped to wall-clock ones by ``wall_at``."""
    idle_since = session.idle_since
    idle_expires = None
    if idle_since is not None:
        idle_expires = wall_at(min(idle_since + session.idle_timeout, session.lifetime_end))
    return SessionSnapshot(
        id=session.id,
        kind=session.kind,
        principal=session.principal,
        state=session.state,
        reason=session.reason,
        client=session.client,
        metadata=session.metadata,
        created_at=session.created_at,
        last_active=wall_at(session.last_active_time),
        idle_timeout=session.idle_timeout,
        lifetime_ends_at=wall_at(session.lifetime_end),
        idle_expires_at=idle_expires,
        requests=session.requests,
        errors=session.errors,
        in_flight=session.in_flight,
        background_tasks=session.background_tasks,
        version=session.version,
    )
