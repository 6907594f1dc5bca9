"""The database URL, parsed once for every store that opens it (the ledger and, beside it, capture).

Both read the same configured URL; two parsers that disagree would send them to different places.
The forms:

* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (as in SQLAlchemy),
  ``sqlite:///:memory:``; a query string is ignored and the path is taken as written (a ``#`` is part
  of the file name, nothing is percent-decoded);
* ``postgresql://user@host:port/db`` or ``postgres://…``; a ``schema=name`` query parameter puts the
  tables in that schema, other parameters go to asyncpg. A fragment is refused: a PostgreSQL URL has
  no use for one, and a ``#`` there is nearly always an unescaped character of a password that cut
  the URL short, so it would connect somewhere else than meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class SqliteURL:
    path: str  # as given: relative to the working directory, absolute, or ":memory:"


@dataclass(frozen=True, slots=True)
class PostgresURL:
    dsn: str  # for asyncpg: always postgresql://, without the schema parameter
    schema: str | None


def parse_database_url(url: str, *, label: str = "database URL") -> SqliteURL | PostgresURL:
    """``url`` parsed, or ValueError saying what is wrong with it (``label`` names the setting)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"{label} {url!r} needs a scheme: sqlite:///path.db or postgresql://host/db")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                f"{label} {url!r}: write sqlite:///relative.db, sqlite:////abs/path.db or sqlite:///:memory:"
            )
        return SqliteURL(rest[1:].split("?", 1)[0])
    if scheme in ("postgresql", "postgres"):
        if "#" in url:
            raise ValueError(
                f"{label}: a '#' in a PostgreSQL URL must be percent-encoded as %23 (in a password, say);"
                " unescaped, it ends the URL there"
            )
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), None)
        rest_query = urlencode([(k, v) for k, v in query if k != "schema"])
        return PostgresURL(urlunsplit(("postgresql", parts.netloc, parts.path, rest_query, "")), schema)
    raise ValueError(f"{label} {url!r}: unknown scheme {scheme!r}; use sqlite:/// or postgresql://")
