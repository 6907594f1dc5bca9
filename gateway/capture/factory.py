"""Choosing a capture backend by URL. Separate from :mod:`gateway.capture.store` because the base store
must not know its implementations: the backends import it, and this module imports them (each only
when its URL is used)."""

from __future__ import annotations

from typing import Any

from gateway.capture.store import CaptureStore
from gateway.dburl import PostgresURL, SqliteURL, parse_database_url


def capture_store_from_url(url: str, **options: Any) -> CaptureStore:
    """An unopened capture store on the ledger's database: the same URL, parsed by the same rules
    (:mod:`gateway.dburl`), so the two always open the same file or schema."""
    match parse_database_url(url, label="capture store URL"):
        case SqliteURL(path):
            from gateway.capture.sqlite import SqliteCaptureStore

            return SqliteCaptureStore(path, **options)
        case PostgresURL(dsn, schema):
            from gateway.capture.postgres import PostgresCaptureStore

            return PostgresCaptureStore(dsn, schema=schema, **options)
