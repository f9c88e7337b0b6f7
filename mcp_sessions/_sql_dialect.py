"""How the SQL databases we support differ from the SQL written in this package.

The statements (:mod:`._sql_statements`) and the schema (:mod:`._sql_schema`)
are written once, with ``%s`` placeholders; a :class:`Dialect` is the list of
places where SQLite and PostgreSQL disagree. The two instances live with their
backends (``_store_sqlite``, ``_store_pg``), so importing this module never
imports a database driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["Dialect"]


@attrs.frozen(kw_only=True)
class Dialect:
    """How one SQL database differs from the SQL written here."""

    #: ``sqlite`` or ``postgresql``.
    name: str
    #: Placeholder that replaces ``%s``.
    param: str
    #: True when JSON columns come back as text to be parsed.
    json_text: bool
    #: Wraps a Python JSON value for binding to a JSON column.
    json_param: Callable[[Any], Any]
    #: Type of JSON columns in DDL.
    json_type: str
    #: Appended to ``SELECT`` in a read-modify-write (row lock), or "".
    for_update: str
    #: Name of the two-argument maximum function.
    greatest: str
    #: Appended to the ``id`` column type (a bytewise collation, so ordering matches Python's).
    id_collation: str
    #: True when one ``execute`` without parameters may hold several statements.
    multi_statement: bool

    def q(self, sql: str) -> str:
        """``sql`` with this database's placeholders."""
        return sql if self.param == "%s" else sql.replace("%s", self.param)
