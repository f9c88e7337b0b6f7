"""Runtime settings: one attrs class, loadable from a mapping with readable errors."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from attrs import validators as v
from cattrs.errors import ClassValidationError

from ._errors import SettingsError

__all__ = ["LimitPolicy", "Settings"]


class LimitPolicy(enum.Enum):
    """What to do when opening a session would exceed a limit."""

    #: Refuse with :class:`~mcp_sessions.LimitExceeded`.
    REJECT = "reject"
    #: Evict the longest-idle session in the full scope (reason ``evicted``);
    #: refuse only if no session in that scope is idle.
    EVICT_IDLE = "evict_idle"


_positive = v.gt(0.0)
_positive_int = v.gt(0)


@attrs.frozen(kw_only=True)
class Settings:
    """How the session runtime behaves. Times are in seconds."""

    #: A session that stays IDLE this long ends with ``idle_timeout``. Counted
    #: from entering IDLE; a session with requests in flight never idles out.
    idle_timeout: float = attrs.field(default=30 * 60.0, validator=_positive)
    #: Absolute lifetime: a session ends with ``lifetime_exceeded`` this long
    #: after creation, busy or not.
    max_lifetime: float = attrs.field(default=8 * 3600.0, validator=_positive)
    #: Most live sessions at once: in this runtime, and with a store in the
    #: whole store (every process sharing it), counted when a session opens.
    max_sessions: int = attrs.field(default=10_000, validator=_positive_int)
    #: Most live sessions one principal holds at once (in the whole store, with one).
    #: Limits are about opening: bringing in an existing session is never refused.
    max_sessions_per_principal: int = attrs.field(default=100, validator=_positive_int)
    #: What happens at a limit.
    limit_policy: LimitPolicy = LimitPolicy.REJECT
    #: How long a terminated session is remembered, so late use says
    #: "expired"/"closed" rather than "unknown".
    tombstone_retention: float = attrs.field(default=24 * 3600.0, validator=v.ge(0.0))
    #: How often the cleanup scanner looks at its deadline schedule. An expired
    #: session ends within one interval of its deadline.
    cleanup_interval: float = attrs.field(default=1.0, validator=_positive)
    #: Time allowed for the ``setup`` hook; past it the session ends with ``error``.
    setup_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for the ``teardown`` hook, which runs shielded from cancellation.
    teardown_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: On shutdown, how long in-flight requests may run before they are cancelled.
    shutdown_grace: float = attrs.field(default=10.0, validator=v.ge(0.0))
    #: Capacity of the observer event queue; events beyond it are dropped and counted.
    observer_queue_size: int = attrs.field(default=1024, validator=_positive_int)
    #: With a store: how often activity (last active, counters) is written, at
    #: most once per session per interval, never once per request (a session
    #: whose idle timeout is under four intervals is written every quarter of
    #: it). Idle expiry allows ``min(touch_interval, idle_timeout / 4)`` for
    #: use elsewhere not written yet.
    touch_interval: float = attrs.field(default=5.0, validator=_positive)
    #: With a store: how often the store is swept for sessions whose deadline
    #: passed (whoever opened them) and old tombstones are purged.
    sweep_interval: float = attrs.field(default=60.0, validator=_positive)
    #: With a store: a process that stops renewing its lease (killed, host
    #: down) has its connection sessions ended (``disconnected``) by the
    #: others within this long. Renewed every eighth of it.
    instance_lease: float = attrs.field(default=30.0, validator=_positive)
    #: Largest state document, in bytes of compact JSON; a patch past it is
    #: refused with ``state_too_large`` and nothing is written.
    max_state_bytes: int = attrs.field(default=1024 * 1024, validator=_positive_int)
    #: Largest session metadata, in bytes of compact JSON (``metadata_too_large``).
    max_metadata_bytes: int = attrs.field(default=64 * 1024, validator=_positive_int)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping (config file, environment).

        Unknown keys and bad values raise :class:`~mcp_sessions.SettingsError`
        whose message lists every problem with the key it concerns.
        """
        try:
            return _converter.structure(dict(data), cls)
        except ClassValidationError as exc:
            problems = cattrs.transform_error(exc, path="settings", format_exception=_describe)
            raise SettingsError(problems) from None

    def to_mapping(self) -> dict[str, Any]:
        """The settings as plain data (the inverse of :meth:`from_mapping`)."""
        result: dict[str, Any] = _converter.unstructure(self)
        return result


def _describe(exc: BaseException, type_: type | None) -> str:
    """One readable line for a structuring failure (used by ``transform_error``)."""
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        allowed = ", ".join(repr(member.value) for member in type_)
        return f"expected one of {allowed}"
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown setting(s): {', '.join(sorted(exc.extra_fields))}"
    # Our own number hook and attrs validators already say what is wrong.
    return str(exc)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def structure_number(value: Any, type_: type) -> Any:
        # Reject bool (an int subclass) and strings: "10" is a config typo, not a number.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        if type_ is int and not float(value).is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return type_(value)

    converter.register_structure_hook(int, structure_number)
    converter.register_structure_hook(float, structure_number)
    return converter


_converter = _make_converter()
