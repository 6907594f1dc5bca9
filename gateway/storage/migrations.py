"""Schema migrations of the database the ledger and capture share, and the rule for which to apply.

Each dialect lists its own migrations (:mod:`gateway.storage.sqlite`, :mod:`gateway.storage.postgres`)
with the same version numbers; the statements that read the same in both are defined here once.
Whichever store opens the database first brings it up to date, so a store never meets a schema
older than its code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("gateway.storage")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


# The same statements in both dialects. A report of some days grouped by day scanned the whole day
# index; by ts it reads the range.
REPORTS_BY_TIME_RANGE = Migration(
    3,
    "reports by time range",
    ("DROP INDEX IF EXISTS ledger_day", "CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)"),
)


# Which API the client spoke, as a stored column in both dialects; rows written before it are chat
# completions (the only endpoint there was). A NOT NULL column with a constant default is added
# without rewriting the table in SQLite and PostgreSQL alike, and older code still inserts.
ENDPOINT_COLUMN = Migration(
    4,
    "endpoint",
    (
        "ALTER TABLE ledger ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat/completions'",
        "ALTER TABLE open_reservations ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat/completions'",
    ),
)


# The label of the upstream pool key that served the request (``spend report --group-by
# upstream_key``); NULL for upstreams with one key and for rows written before it.
UPSTREAM_KEY_COLUMN = Migration(5, "upstream key", ("ALTER TABLE ledger ADD COLUMN upstream_key TEXT",))


def pending_migrations(migrations: Sequence[Migration], applied: Iterable[int], where: str) -> list[Migration]:
    """The migrations still to apply, in order; warns when the database is newer than this code
    (a rollback during a deploy) rather than refusing to start: migrations only add tables and columns
    or swap an index, so older code still works on the newer schema."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise RuntimeError(f"ledger migrations must have unique, increasing versions: {versions}")
    done = set(applied)
    unknown = sorted(done - set(versions))
    if unknown:
        log.warning("ledger schema at %s has migrations %s this gateway does not know; continuing", where, unknown)
    return [m for m in migrations if m.version not in done]
