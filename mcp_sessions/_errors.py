"""Errors raised by the session runtime.

Every error a caller can act on carries a stable ``code``: the stdio server
turns these into tool execution errors (``isError: true``) with
``{"error": {"code": ..., "message": ...}}``. The split follows trio's "you
closed it" vs "it broke": :class:`SessionClosed` means someone ended the
session on purpose, :class:`SessionExpired` that a timeout did.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ._state import InvalidTransition, TerminationReason

__all__ = [
    "InvalidArguments",
    "InvalidTransition",
    "LimitExceeded",
    "MetadataTooLarge",
    "SessionClosed",
    "SessionError",
    "SessionExpired",
    "SessionGone",
    "SessionNotFound",
    "SessionRequired",
    "SessionSetupFailed",
    "SettingsError",
    "ShuttingDown",
    "StateTooLarge",
    "TooLarge",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamFailed",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "VersionConflict",
]


class SessionError(Exception):
    """Base class of the runtime's errors; ``code`` is stable and machine-readable."""

    code: ClassVar[str] = "session_error"

    @property
    def message(self) -> str:
        return str(self)

    def details(self) -> dict[str, Any]:
        """Machine-readable facts beyond the code and message (sent with a tool error)."""
        return {}


class SessionNotFound(SessionError):
    """No such session for this principal.

    Deliberately says nothing more: an unknown handle, a malformed one and
    another principal's handle must be indistinguishable.
    """

    code = "session_not_found"

    def __init__(self, message: str = "no such session") -> None:
        super().__init__(message)


class SessionRequired(SessionError):
    """The call needs a ``session`` handle and none was given (modern era)."""

    code = "session_required"

    def __init__(
        self,
        message: str = "this call needs a 'session' handle; open one with session_open",
    ) -> None:
        super().__init__(message)


class SessionGone(SessionError):
    """The session existed but has ended; ``reason`` says why."""

    def __init__(self, session_id: str, reason: TerminationReason | None, message: str) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reason = reason


_EXPIRY_REASONS = frozenset({TerminationReason.IDLE_TIMEOUT, TerminationReason.LIFETIME_EXCEEDED})


class SessionExpired(SessionGone):
    """The session ended because it idled out or outlived its absolute lifetime."""

    code = "session_expired"


class SessionClosed(SessionGone):
    """The session was ended on purpose (closed, evicted, disconnected, shut down, failed)."""

    code = "session_closed"


def gone(session_id: str, reason: TerminationReason | None) -> SessionGone:
    """The right :class:`SessionGone` subclass for a session that ended for ``reason``."""
    why = reason.value if reason is not None else "unknown"
    if reason in _EXPIRY_REASONS:
        return SessionExpired(session_id, reason, f"session {session_id} has expired ({why})")
    return SessionClosed(session_id, reason, f"session {session_id} is closed ({why})")


class LimitExceeded(SessionError):
    """Opening another session would exceed a configured limit."""

    code = "limit_exceeded"

    def __init__(self, message: str, *, limit: int, scope: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.scope = scope

    @classmethod
    def at(cls, scope: str, limit: int, *, evicting: bool) -> LimitExceeded:
        """The error for a full ``scope`` ("global" or "principal 'x'")."""
        detail = (
            "and no session in that scope is idle to evict" if evicting else "close a session first"
        )
        return cls(
            f"session limit reached for {scope}: {limit} live sessions; {detail}",
            limit=limit,
            scope=scope,
        )

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit, "scope": self.scope}


class TooLarge(SessionError):
    """A value would exceed its size limit; nothing was written."""

    what: ClassVar[str] = "the value"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"{self.what} would be {size} bytes as JSON, over the limit of {limit} bytes; "
            "nothing was written"
        )
        self.size = size
        self.limit = limit

    def details(self) -> dict[str, Any]:
        return {"limit_bytes": self.limit, "size_bytes": self.size}


class StateTooLarge(TooLarge):
    """A patch would make the state document larger than ``max_state_bytes``."""

    code = "state_too_large"
    what = "the state document"


class MetadataTooLarge(TooLarge):
    """A session's metadata is larger than ``max_metadata_bytes``."""

    code = "metadata_too_large"
    what = "the session metadata"


class VersionConflict(SessionError):
    """A state patch named an ``if_version`` that is not the current one."""

    code = "version_conflict"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"state version conflict: expected version {expected}, current version is {current}"
        )
        self.expected = expected
        self.current = current

    def details(self) -> dict[str, Any]:
        return {"current_version": self.current}


class InvalidArguments(SessionError):
    """A built-in tool was called with arguments that do not fit its input schema.

    ``arguments`` names the offending arguments (never their values: they are
    the caller's data).
    """

    code = "invalid_arguments"

    def __init__(self, message: str, *, arguments: list[str]) -> None:
        super().__init__(message)
        self.arguments = arguments

    def details(self) -> dict[str, Any]:
        return {"arguments": self.arguments}


class ShuttingDown(SessionError):
    """The runtime is shutting down and admits no new sessions or requests."""

    code = "shutting_down"

    def __init__(self, message: str = "the session runtime is shutting down") -> None:
        super().__init__(message)


class SessionSetupFailed(SessionError):
    """The ``setup`` hook failed or timed out; the session ended with reason ``error``."""

    code = "session_setup_failed"


class UpstreamError(SessionError):
    """The gateway could not get an answer from an upstream server; ``upstream`` names it."""

    def __init__(self, upstream: str, message: str, *, retry_in: float | None = None) -> None:
        super().__init__(f"{upstream}: {message}")
        self.upstream = upstream
        self.retry_in = retry_in

    def details(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"upstream": self.upstream}
        if self.retry_in is not None:
            facts["retry_in_s"] = round(self.retry_in, 3)
        return facts


class UpstreamBusy(UpstreamError):
    """Every upstream session is busy and the queue is full, or the call waited past its bound."""

    code = "upstream_busy"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within ``call_timeout``; the call was cancelled there."""

    code = "upstream_timeout"


class UpstreamFailed(UpstreamError):
    """The upstream died or broke the protocol during the call; that upstream session ended."""

    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """The upstream cannot be started or reached, or its circuit breaker is open."""

    code = "upstream_unavailable"


class SettingsError(ValueError):
    """Settings that cannot be used; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))
        self.problems = problems
