"""Choosing a ledger backend by URL. Separate from :mod:`gateway.metering.ledger` because the base
writer must not know its implementations: the backends import it, and this module imports them (each
only when its URL is used, so a SQLite gateway never loads the PostgreSQL driver)."""

from __future__ import annotations

from typing import Any

from gateway.dburl import PostgresURL, SqliteURL, parse_database_url
from gateway.metering.ledger import Ledger


def ledger_from_url(url: str, **options: Any) -> Ledger:
    """An unopened ledger for ``url`` (the forms are in :mod:`gateway.dburl`):

    * ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (as in SQLAlchemy),
      ``sqlite:///:memory:`` (one process only, gone at close);
    * ``postgresql://user@host:port/db`` or ``postgres://…``; a ``schema=name`` query parameter puts
      the tables in that schema (created if missing); other parameters go to asyncpg.

    ``options`` are :class:`Ledger` settings (``batch_size``, ``max_delay``, ...).
    """
    match parse_database_url(url, label="ledger URL"):
        case SqliteURL(path):
            from gateway.metering.ledger_sqlite import SqliteLedger

            return SqliteLedger(path, **options)
        case PostgresURL(dsn, schema):
            from gateway.metering.ledger_postgres import PostgresLedger

            return PostgresLedger(dsn, schema=schema, **options)


async def open_ledger(url: str, **options: Any) -> Ledger:
    """:func:`ledger_from_url`, opened (connected, migrated, writer running)."""
    ledger = ledger_from_url(url, **options)
    await ledger.open()
    return ledger
