"""Choosing a session store from one string (settings, command line, environment).

Accepted forms:

- ``memory`` or ``memory:`` -> :class:`~mcp_sessions._store.MemoryStore`;
- ``sqlite:///abs/path.db``, ``sqlite://relative/path.db``, ``sqlite:path.db`` or a bare
  filesystem path (ending in ``.db``/``.sqlite``/``.sqlite3`` or containing a slash)
  -> :class:`~mcp_sessions._store_sqlite.SQLiteStore`; query options ``synchronous``
  (``normal``/``full``), ``busy_timeout`` and ``op_timeout`` (seconds);
- ``postgresql://...`` or ``postgres://...`` -> :class:`~mcp_sessions._store_pg.PostgresStore`
  (the URL is passed to libpq as is, except the options ``schema``, ``min_size``,
  ``max_size``, ``op_timeout`` and ``store_connect_timeout``, which the store takes).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._store import MemoryStore, SessionStore

__all__ = ["ACCEPTED_FORMS", "redact_url", "store_from_url"]

ACCEPTED_FORMS = (
    "'memory', 'sqlite:///absolute/path.db', 'sqlite://relative/path.db', "
    "a filesystem path ending in .db, 'postgresql://user@host:5432/dbname' (or 'postgres://')"
)

_PG_STORE_OPTIONS = ("schema", "min_size", "max_size", "op_timeout", "store_connect_timeout")
_SQLITE_OPTIONS = ("synchronous", "busy_timeout", "op_timeout")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and health reports).

    Handles ``scheme://user:password@host/...`` and libpq keyword strings
    (``password=...``) as well as a ``password`` query parameter.
    """
    if "://" in url:
        url = re.sub(r"(://[^/@:]*:)([^@/]*)@", r"\1***@", url)
        return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)
    return re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)


def _bad(url: str, why: str) -> ValueError:
    return ValueError(
        f"unsupported session store {redact_url(url)!r}: {why}; accepted forms: {ACCEPTED_FORMS}"
    )


def _float(url: str, name: str, value: str) -> float:
    try:
        result = float(value)
    except ValueError:
        raise _bad(url, f"option {name} must be a number of seconds, not {value!r}") from None
    if not result > 0:
        raise _bad(url, f"option {name} must be positive")
    return result


def _sqlite(url: str, path: str, query: str) -> SessionStore:
    from ._store_sqlite import SQLiteStore

    if not path:
        raise _bad(url, "no database path")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - set(_SQLITE_OPTIONS))
    if unknown:
        raise _bad(url, f"unknown sqlite option(s) {', '.join(unknown)}")
    sync = opts.get("synchronous", "normal").upper()
    if sync not in ("NORMAL", "FULL"):
        raise _bad(url, "synchronous must be 'normal' or 'full'")
    return SQLiteStore(
        path,
        synchronous="FULL" if sync == "FULL" else "NORMAL",
        busy_timeout=_float(url, "busy_timeout", opts["busy_timeout"])
        if "busy_timeout" in opts
        else 5.0,
        op_timeout=_float(url, "op_timeout", opts["op_timeout"]) if "op_timeout" in opts else 10.0,
    )


def _postgres(url: str) -> SessionStore:
    try:
        from ._store_pg import PostgresStore
    except ImportError as exc:
        raise ImportError(
            f"the PostgreSQL session store needs psycopg 3 and psycopg_pool ({exc}); "
            "install them with: pip install 'psycopg[binary]' psycopg_pool"
        ) from exc

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    opts = {k: v for k, v in query if k in _PG_STORE_OPTIONS}
    rest = [(k, v) for k, v in query if k not in _PG_STORE_OPTIONS]
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))

    def as_int(name: str, default: int) -> int:
        if name not in opts:
            return default
        try:
            return int(opts[name])
        except ValueError:
            raise _bad(url, f"option {name} must be an integer") from None

    try:
        return PostgresStore(
            dsn,
            schema=opts.get("schema") or None,
            min_size=as_int("min_size", 1),
            max_size=as_int("max_size", 4),
            op_timeout=_float(url, "op_timeout", opts["op_timeout"])
            if "op_timeout" in opts
            else 10.0,
            connect_timeout=_float(url, "store_connect_timeout", opts["store_connect_timeout"])
            if "store_connect_timeout" in opts
            else 5.0,
        )
    except ValueError as exc:
        raise _bad(url, str(exc)) from None


def store_from_url(url: str) -> SessionStore:
    """The (unopened) store that ``url`` names; raises ValueError for anything else."""
    text = url.strip()
    if not text:
        raise _bad(url, "empty")
    low = text.lower()
    if low in ("memory", "memory:", "memory://"):
        return MemoryStore()
    if low.startswith(("postgresql://", "postgres://")):
        return _postgres(text)
    if low.startswith("sqlite:"):
        rest = text[len("sqlite:") :]
        path, _, query = rest.partition("?")
        if path.startswith("//"):
            # sqlite:///abs -> /abs ; sqlite://rel -> rel (a host part makes no sense here)
            path = path[2:]
        return _sqlite(url, path, query)
    if "://" in text or (":" in text.split("/")[0] and not text.startswith("/")):
        scheme = text.split(":", 1)[0]
        raise _bad(url, f"unknown scheme {scheme!r}")
    if low.endswith((".db", ".sqlite", ".sqlite3")) or "/" in text:
        return _sqlite(url, text, "")
    raise _bad(url, "not a URL or a database file path")
