"""Runtime settings: one attrs class, loadable from a mapping with readable errors."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
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


#: Longest accepted stdio message, in bytes, newline excluded.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_DAY = 86_400.0
_YEAR = 365 * _DAY


def _within(low: float, high: float, *, zero: bool = False, unit: str = "seconds") -> Any:
    """A validator for a finite number in ``(low, high]`` (``[low, high]`` with ``zero``).

    NaN and infinities are refused: every setting has a finite, documented range.
    """
    opening = "[" if zero else "("

    def check(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        above = value >= low if zero else value > low
        if not (above and value <= high):  # (also False for NaN)
            unit_ = f" {unit}" if unit else ""
            raise ValueError(
                f"{attribute.name} must be in {opening}{_n(low)}, {_n(high)}]{unit_}, got {value!r}"
            )

    return check


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_positive = _within(0.0, _YEAR)
_short = _within(0.0, 3600.0)
_positive_int = _within(0, 10_000_000, unit="")


@attrs.frozen(kw_only=True)
class Settings:
    """How the session runtime behaves. Times are in seconds.

    Every setting has a finite range: durations up to a year (scanner, touch,
    hook and grace times up to an hour; sweep and lease up to a day), counts up
    to ten million; NaN and infinity are refused.
    """

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
    tombstone_retention: float = attrs.field(
        default=24 * 3600.0, validator=_within(0.0, _YEAR, zero=True)
    )
    #: How often the cleanup scanner looks at its deadline schedule. An expired
    #: session ends within one interval of its deadline.
    cleanup_interval: float = attrs.field(default=1.0, validator=_short)
    #: Time allowed for the ``setup`` hook; past it the session ends with ``error``.
    setup_timeout: float = attrs.field(default=10.0, validator=_short)
    #: Time allowed for the ``teardown`` hook, which runs shielded from cancellation.
    teardown_timeout: float = attrs.field(default=10.0, validator=_short)
    #: On shutdown, how long in-flight requests may run before they are cancelled.
    shutdown_grace: float = attrs.field(default=10.0, validator=_within(0.0, 3600.0, zero=True))
    #: Capacity of the observer event queue; events beyond it are dropped and counted.
    observer_queue_size: int = attrs.field(default=1024, validator=_positive_int)
    #: With a store: how often activity (last active, counters) is written, at
    #: most once per session per interval, never once per request (a session
    #: whose idle timeout is under four intervals is written every quarter of
    #: it). Idle expiry allows ``min(touch_interval, idle_timeout / 4)`` for
    #: use elsewhere not written yet.
    touch_interval: float = attrs.field(default=5.0, validator=_short)
    #: With a store: how often the store is swept for sessions whose deadline
    #: passed (whoever opened them) and old tombstones are purged.
    sweep_interval: float = attrs.field(default=60.0, validator=_within(0.0, _DAY))
    #: With a store: a process that stops renewing its lease (killed, host
    #: down) has its connection sessions ended (``disconnected``) by the
    #: others within this long. Renewed every eighth of it.
    instance_lease: float = attrs.field(default=30.0, validator=_within(0.0, _DAY))
    #: Largest state document, in bytes of compact JSON; a patch past it is
    #: refused with ``state_too_large`` and nothing is written.
    max_state_bytes: int = attrs.field(
        default=1024 * 1024, validator=_within(0, 1024**3, unit="bytes")
    )
    #: Largest session metadata, in bytes of compact JSON (``metadata_too_large``).
    max_metadata_bytes: int = attrs.field(
        default=64 * 1024, validator=_within(0, 16 * 1024**2, unit="bytes")
    )

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
