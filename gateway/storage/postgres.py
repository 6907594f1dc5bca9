"""The PostgreSQL side of the database the ledger and capture share: its schema, how it is migrated,
and the rule for schema names.

Both stores keep their own pool on the same database (or ``schema``); migrations run under one
transaction-scoped advisory lock, so replicas and stores starting together apply each migration once
and never see a half-built schema.
"""

from __future__ import annotations

import re

import asyncpg

from gateway.storage.migrations import (
    ENDPOINT_COLUMN,
    REPORTS_BY_TIME_RANGE,
    UPSTREAM_KEY_COLUMN,
    Migration,
    pending_migrations,
)

SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def checked_schema(schema: str | None, label: str) -> str | None:
    """``schema`` when it is a plain identifier (it is quoted into DDL and the search path), else
    ValueError; ``label`` names whose schema it is."""
    if schema is not None and not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"{label} schema {schema!r} must be a plain identifier (letters, digits, _)")
    return schema


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "ledger and open reservations",
        (
            """CREATE TABLE ledger (
                id BIGSERIAL PRIMARY KEY,
                request_id TEXT NOT NULL UNIQUE,
                ts DOUBLE PRECISION NOT NULL,
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
                stream BOOLEAN NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                cached_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                reasoning_tokens INTEGER NOT NULL,
                tool_calls_billed INTEGER NOT NULL,
                cost_usd NUMERIC(20, 9) NOT NULL,
                cache_savings_usd NUMERIC(20, 9) NOT NULL,
                price_version TEXT,
                ttft_ms DOUBLE PRECISION,
                latency_ms DOUBLE PRECISION NOT NULL,
                status INTEGER NOT NULL,
                outcome TEXT NOT NULL,
                estimated BOOLEAN NOT NULL,
                estimate_reason TEXT,
                route_reason TEXT NOT NULL
            )""",
            "CREATE INDEX ledger_tenant_ts ON ledger (tenant, ts)",
            "CREATE INDEX ledger_day ON ledger (day)",
            """CREATE TABLE open_reservations (
                request_id TEXT PRIMARY KEY,
                ts DOUBLE PRECISION NOT NULL,
                tenant TEXT NOT NULL,
                key_id TEXT NOT NULL,
                app TEXT,
                virtual_model TEXT NOT NULL,
                upstream TEXT,
                upstream_model TEXT,
                amount_usd NUMERIC(20, 9) NOT NULL,
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
                ts DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                tenant TEXT NOT NULL,
                mode TEXT NOT NULL,
                record JSONB NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS capture_expires_at ON capture (expires_at)",
        ),
    ),
    REPORTS_BY_TIME_RANGE,
    ENDPOINT_COLUMN,
    UPSTREAM_KEY_COLUMN,
)


async def migrate(conn: asyncpg.Connection, schema: str | None, where: str) -> None:
    """Bring the database's (or ``schema``'s) tables up to date, in one transaction. The ledger and
    the capture store beside it both call this when they open; the caller's connection has the
    schema on its search path."""
    async with conn.transaction():
        # Held until commit: a second replica waits here, then finds everything applied. Every release
        # and both stores take this same key, so none migrates beside another.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"kimi-gateway ledger migrations {schema or ''}"
        )
        if schema:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        applied = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        for m in pending_migrations(MIGRATIONS, applied, where):
            for statement in m.statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
