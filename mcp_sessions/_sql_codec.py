"""Rows of the ``sessions`` table to :class:`~mcp_sessions._store.SessionRecord` and back.

Theory of operation
===================

A row is data from outside this process: another process, an older or newer
version, or a person with a SQL shell may have written it. :class:`RowCodec`
turns JSON text into JSON values where the dialect stores text, then hands the
row to this module's one private :class:`cattrs.Converter`, whose hooks accept
exactly the types a record holds (text is text, numbers are numbers and never
booleans, JSON columns are objects) and never coerce. A row that fails is
logged on the ``mcp_sessions.store`` logger with cattrs' readable account of
every bad field, and is treated as absent: it is never raised to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import cattrs
import cattrs.gen
import cattrs.v

from ._sql_dialect import Dialect
from ._sql_schema import COLUMNS, INSTANCE_COLUMNS, JSON_COLUMNS
from ._store import RECORD_STATES, InstanceRecord, SessionRecord

__all__ = ["RowCodec", "Undecodable"]

logger = logging.getLogger("mcp_sessions.store")


class Undecodable(Exception):
    """A value read from the store is not what the schema promises."""


def _text(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _number(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _integer(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _flag(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _json_object(value: Any, _: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _state(value: Any, _: type) -> str:
    state = _text(value, str)
    if state not in RECORD_STATES:
        raise ValueError(f"unknown state {state!r}")
    return state


def _why(exc: BaseException, type_: type | None) -> str:
    # Our hooks say what was wrong; cattrs' own failures (a missing key) keep its wording.
    if isinstance(exc, TypeError | ValueError) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(str, _text)
_converter.register_structure_hook(float, _number)
_converter.register_structure_hook(int, _integer)
_converter.register_structure_hook(bool, _flag)
_converter.register_structure_hook_func(lambda t: t == Mapping[str, Any], _json_object)
_converter.register_structure_hook(
    InstanceRecord,
    cattrs.gen.make_dict_structure_fn(InstanceRecord, _converter, _cattrs_forbid_extra_keys=True),
)
_converter.register_structure_hook(
    SessionRecord,
    cattrs.gen.make_dict_structure_fn(
        SessionRecord,
        _converter,
        state=cattrs.gen.override(struct_hook=_state),
        _cattrs_forbid_extra_keys=True,
    ),
)


class RowCodec:
    """Decodes rows of :data:`~mcp_sessions._sql_schema.COLUMNS`; encodes records as rows."""

    def __init__(self, dialect: Dialect, backend: str) -> None:
        self._json_text = dialect.json_text
        self._json_param = dialect.json_param
        self._backend = backend

    def _json(self, value: Any, column: str) -> Any:
        if not self._json_text:
            return value
        if not isinstance(value, str | bytes):
            raise Undecodable(f"{column} is not JSON text")
        try:
            return json.loads(value)
        except ValueError as exc:
            raise Undecodable(f"{column} is not valid JSON: {exc}") from None

    def record(self, row: Sequence[Any] | None) -> SessionRecord | None:
        """The record a row holds, or None for no row or a bad one (logged).

        A NULL ``doc`` means the statement left the document out (the caller
        knew its version): the record then has ``doc_loaded=False``.
        """
        if row is None:
            return None
        raw = dict(zip(COLUMNS, row, strict=True))
        try:
            for column in JSON_COLUMNS:
                if column != "doc" or raw["doc"] is not None:
                    raw[column] = self._json(raw[column], column)
            raw["doc_loaded"] = raw["doc"] is not None
            if raw["doc"] is None:
                raw["doc"] = {}
            return _converter.structure(raw, SessionRecord)
        except Undecodable as exc:
            why = str(exc)
        except cattrs.ClassValidationError as exc:
            why = "; ".join(cattrs.transform_error(exc, format_exception=_why))
        logger.error(
            "%s store: skipping undecodable session row %r: %s", self._backend, raw.get("id"), why
        )
        return None

    def records(self, rows: Sequence[Sequence[Any]]) -> list[SessionRecord]:
        """The decodable records among ``rows``, in order."""
        return [r for r in map(self.record, rows) if r is not None]

    def document(self, value: Any) -> dict[str, Any]:
        """A state document read on its own; raises :class:`Undecodable`."""
        value = self._json(value, "doc")
        if not isinstance(value, dict):
            raise Undecodable("doc is not a JSON object")
        return value

    def instances(self, rows: Sequence[Sequence[Any]]) -> list[InstanceRecord]:
        """The decodable instance records among ``rows`` (a bad one is logged and skipped)."""
        found = []
        for row in rows:
            raw = dict(zip(INSTANCE_COLUMNS, row, strict=True))
            try:
                found.append(_converter.structure(raw, InstanceRecord))
            except cattrs.ClassValidationError as exc:
                why = "; ".join(cattrs.transform_error(exc, format_exception=_why))
                logger.error("%s store: skipping undecodable instance row %r: %s",
                             self._backend, raw.get("id"), why)  # fmt: skip
        return found

    def decode_session(self, row: Sequence[Any]) -> SessionRecord | str:
        """The record a whole row of COLUMNS holds (document included), or why it holds none.

        Logs nothing: for :meth:`~mcp_sessions._store.SessionStore.check`, which
        reports what it finds.
        """
        raw = dict(zip(COLUMNS, row, strict=True))
        try:
            for column in JSON_COLUMNS:
                raw[column] = self._json(raw[column], column)
            return _converter.structure(raw, SessionRecord)
        except Undecodable as exc:
            return str(exc)
        except cattrs.ClassValidationError as exc:
            return "; ".join(cattrs.transform_error(exc, format_exception=_why))

    def decode_instance(self, row: Sequence[Any]) -> InstanceRecord | str:
        """The instance a row of INSTANCE_COLUMNS holds, or why it holds none (logs nothing)."""
        raw = dict(zip(INSTANCE_COLUMNS, row, strict=True))
        try:
            return _converter.structure(raw, InstanceRecord)
        except cattrs.ClassValidationError as exc:
            return "; ".join(cattrs.transform_error(exc, format_exception=_why))

    def instance_row(self, instance: InstanceRecord) -> list[Any]:
        plain = _converter.unstructure(instance)
        return [plain[c] for c in INSTANCE_COLUMNS]

    def row(self, record: SessionRecord) -> list[Any]:
        """``record`` as the values of :data:`~mcp_sessions._sql_schema.COLUMNS`."""
        plain = _converter.unstructure(record)
        return [self._json_param(plain[c]) if c in JSON_COLUMNS else plain[c] for c in COLUMNS]

    def json_param(self, value: Any) -> Any:
        """``value`` bound for a JSON column."""
        return self._json_param(value)
