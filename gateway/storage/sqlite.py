"""The SQLite side of the database the ledger and capture share: its schema, how it is migrated, and
the statement shapes both stores write with.

Both stores keep their own connection to the same file; whichever opens it first applies the
migrations under a write lock, so the other finds them done.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, cast

import aiosqlite
import orjson

from gateway.storage.migrations import (
    ENDPOINT_COLUMN,
    REPORTS_BY_TIME_RANGE,
    UPSTREAM_KEY_COLUMN,
    Migration,
    pending_migrations,
)

BUSY_TIMEOUT_MS = 10_000

# sqlite3 binds exact int, float, str and bytes directly; any other parameter, None included, goes
# through its adaptation protocol, which without a registered adapter looks up ``__adapt__`` and
# ``__conform__`` and builds and clears an AttributeError for each: ~3,300 instructions per None,
# a fifth of a ledger row's insert (several of its columns are usually NULL). A registered adapter is
# one dict lookup and one call; ``{}.get`` returns None for None without a Python frame, and None
# is then bound as NULL exactly as before. Process-wide, and the same result for every sqlite3 user.
sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "ledger and open reservations",
        (
            """CREATE TABLE ledger (
                id INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL UNIQUE,
                ts REAL NOT NULL,
                day TEXT NOT NULL,
                month TEXT NOT NULL,
                tenant TEXT NOT NULL,
                key_id TEXT NOT NULL,
                app TEXT,
                end_user TEXT,
                tags TEXT NOT NULL,
                virtual_model TEXT NOT NULL,
                upstream TEXT,
                upstream_model TEXT,
                stream INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                cached_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                reasoning_tokens INTEGER NOT NULL,
                tool_calls_billed INTEGER NOT NULL,
                cost_nanos INTEGER NOT NULL,
                cache_savings_nanos INTEGER NOT NULL,
                price_version TEXT,
                ttft_ms REAL,
                latency_ms REAL NOT NULL,
                status INTEGER NOT NULL,
                outcome TEXT NOT NULL,
                estimated INTEGER NOT NULL,
                estimate_reason TEXT,
                route_reason TEXT NOT NULL
            )""",
            "CREATE INDEX ledger_tenant_ts ON ledger (tenant, ts)",
            "CREATE INDEX ledger_day ON ledger (day)",
            """CREATE TABLE open_reservations (
                request_id TEXT PRIMARY KEY,
                ts REAL NOT NULL,
                tenant TEXT NOT NULL,
                key_id TEXT NOT NULL,
                app TEXT,
                virtual_model TEXT NOT NULL,
                upstream TEXT,
                upstream_model TEXT,
                amount_nanos INTEGER NOT NULL,
                prompt_tokens_estimate INTEGER NOT NULL,
                windows TEXT NOT NULL
            )""",
            "CREATE INDEX open_reservations_ts ON open_reservations (ts)",
        ),
    ),
    Migration(
        2,
        "capture",
        (
            # IF NOT EXISTS: gateways before this migration created the table themselves at start-up
            """CREATE TABLE IF NOT EXISTS capture (
                request_id TEXT PRIMARY KEY,
                ts REAL NOT NULL,
                expires_at REAL NOT NULL,
                tenant TEXT NOT NULL,
                mode TEXT NOT NULL,
                record TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS capture_expires_at ON capture (expires_at)",
        ),
    ),
    REPORTS_BY_TIME_RANGE,
    ENDPOINT_COLUMN,
    UPSTREAM_KEY_COLUMN,
)

# Rows per statement: powers of two up to this, so a connection prepares at most seven statement texts
# per kind (SQLite keeps prepared statements cached; one text per batch size would pile up megabytes).
# 64 rows bind 1,792 parameters, a fraction of a millisecond with the GIL held; 512 held it for about
# 3 ms, which showed as p99 latency at one connection (1.74 against 1.46 ms, bench/RESULTS.md).
MAX_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=64)
def _values_sql(sql: str, n: int) -> str:
    head, sep, rest = sql.partition(" VALUES (")
    assert sep, sql
    group, _, tail = rest.partition(")")
    return f"{head} VALUES {', '.join([f'({group})'] * n)}{tail}"


def values_statements(sql: str, rows: Sequence[Sequence[Any]]) -> list[tuple[str, list[Any]]]:
    """``sql`` (an ``INSERT ... VALUES (?, ...) [ON CONFLICT ...]`` for one row) as a few multi-row
    statements covering ``rows`` in order, each with its flattened parameters.

    Why not ``executemany``: sqlite3 releases the GIL around every row's step and takes it back
    after, and while the event loop keeps the GIL busy each take-back waits a switch interval
    (5 ms); a 500-row batch took seconds under load and the ledger fell behind. A multi-row
    statement steps once. Rows are applied in order, as ``executemany`` would apply them.
    """
    out: list[tuple[str, list[Any]]] = []
    i, n = 0, len(rows)
    while i < n:
        size = min(MAX_ROWS_PER_STATEMENT, 1 << ((n - i).bit_length() - 1))
        part = rows[i : i + size]
        out.append((_values_sql(sql, size), list(chain.from_iterable(part))))  # 5x a nested comprehension
        i += size
    return out


def json_param(ids: Sequence[str]) -> str:
    """The single parameter of ``IN (SELECT value FROM json_each(?))``: one statement text whatever
    the number of ids (see :func:`values_statements` for why the text must not vary)."""
    return orjson.dumps(ids).decode()


async def migrate(conn: aiosqlite.Connection, where: str) -> None:
    """Bring the file's schema up to date; the caller holds a write transaction (``BEGIN
    IMMEDIATE``), so processes opening the file together apply each migration once. The ledger and
    the capture store beside it both call this when they open."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = [v for (v,) in await conn.execute_fetchall("SELECT version FROM schema_migrations")]
    for m in pending_migrations(MIGRATIONS, applied, where):
        for statement in m.statements:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (m.version, m.name, time.time()),
        )
