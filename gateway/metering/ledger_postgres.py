"""The shared ledger: PostgreSQL through an asyncpg pool, for several gateway replicas.

Money is NUMERIC(20,9): exact, summed exactly by SQL, and rounded before it is sent (the columns and
encoders are in :mod:`gateway.metering.ledger_postgres_columns`; the schema and its migrations, shared
with capture, in :mod:`gateway.storage.postgres`). Batches go in with binary COPY inside one
transaction. Migrations take a transaction-scoped advisory lock, so replicas starting together apply
each migration once and never see a half-built schema. A ``schema`` keeps the tables apart from
anything else in the database (and keeps tests apart from each other).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.metering.ledger import Ledger
from gateway.metering.ledger_batch import Batch, split_existing
from gateway.metering.ledger_postgres_columns import (
    EXISTING,
    RES_COLUMNS,
    ROW_COLUMNS,
    SELECT_RES,
    SELECT_ROW,
    UPSERT_RES,
    decode_res,
    decode_row,
    encode_res,
    encode_row,
)
from gateway.metering.ledger_query import build_spend_query
from gateway.metering.ledger_rows import LedgerRow, OpenReservation, encode_all
from gateway.metering.money import quantize_usd
from gateway.storage.postgres import checked_schema, migrate


class PostgresLedger(Ledger):
    """The ledger in PostgreSQL (``dsn`` as asyncpg takes it; ``schema`` defaults to the search path)."""

    def __init__(
        self, dsn: str, *, schema: str | None = None, pool_min: int = 1, pool_max: int = 4, **options: Any
    ) -> None:
        super().__init__(**options)
        self.dsn = dsn
        self.schema = checked_schema(schema, "ledger")
        self.pool_min = pool_min
        self.pool_max = pool_max
        self._pool: asyncpg.Pool | None = None

    @property
    def where(self) -> str:
        parts = urlsplit(self.dsn)
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port:
            netloc += f":{parts.port}"
        shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        return shown + (f" (schema {self.schema})" if self.schema else "")

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the ledger is not open")
        return self._pool

    async def _connect(self) -> None:
        settings = {"application_name": "kimi-gateway ledger"}
        if self.schema:
            settings["search_path"] = f'"{self.schema}"'
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.pool_min, max_size=self.pool_max, server_settings=settings
        )
        try:
            await self._migrate()
        except BaseException:
            await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn:
            await migrate(conn, self.schema, self.where)

    def _is_data_error(self, exc: BaseException) -> bool:
        # Connection loss, shutdowns, lock timeouts, missing tables ... are outages and are retried.
        # OverflowError is asyncpg refusing, client-side, an int that does not fit the column.
        return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, OverflowError))

    async def _write(self, batch: Batch) -> None:
        encoded = dict(zip(map(id, batch.rows), encode_all(encode_row, batch.rows), strict=True))
        reservations = encode_all(encode_res, batch.reservations)
        async with self.pool.acquire() as conn, conn.transaction():
            if batch.rows:
                found = await conn.fetch(EXISTING, [r.request_id for r in batch.rows])
                insert, replace = split_existing(
                    batch.rows, {r["request_id"]: r["replaceable"] for r in found}, replay=batch.replay
                )
                if replace:
                    await conn.execute("DELETE FROM ledger WHERE request_id = ANY($1::text[])", replace)
                if insert:
                    await conn.copy_records_to_table(
                        "ledger", records=[encoded[id(r)] for r in insert], columns=ROW_COLUMNS, schema_name=self.schema
                    )
            if batch.settled:
                await conn.execute("DELETE FROM open_reservations WHERE request_id = ANY($1::text[])", batch.settled)
            if reservations:
                await conn.executemany(UPSERT_RES, reservations)

    async def _reconcile(
        self, opened_before: float | None, make_row: Callable[[OpenReservation], LedgerRow]
    ) -> list[LedgerRow]:
        where, params = ("WHERE ts < $1", [float(opened_before)]) if opened_before is not None else ("", [])
        async with self.pool.acquire() as conn, conn.transaction():
            # DELETE ... RETURNING takes each reservation exactly once, even if replicas race here.
            found = await conn.fetch(
                f"DELETE FROM open_reservations o {where} RETURNING {', '.join('o.' + c for c in RES_COLUMNS)},"
                " EXISTS (SELECT 1 FROM ledger l WHERE l.request_id = o.request_id) AS recorded",
                *params,
            )
            found = sorted(found, key=lambda r: (r["ts"], r["request_id"]))
            rows = [make_row(decode_res(tuple(r.values())[:-1])) for r in found if not r["recorded"]]
            if rows:
                await conn.copy_records_to_table(
                    "ledger", records=[encode_row(r) for r in rows], columns=ROW_COLUMNS, schema_name=self.schema
                )
        return rows

    async def _spend(
        self, group_by: list[str], since: float | None, until: float | None, tenant: str | None
    ) -> list[dict[str, Any]]:
        sql, params = build_spend_query(
            group_by,
            since=since,
            until=until,
            tenant=tenant,
            cost_col="cost_usd",
            savings_col="cache_savings_usd",
            placeholder=lambda i: f"${i}",
            collate=' COLLATE "C"',
        )
        out = []
        for record in await self.pool.fetch(sql, *params):
            row = dict(record)
            row["cost_usd"] = quantize_usd(row["cost_usd"])
            row["cache_savings_usd"] = quantize_usd(row["cache_savings_usd"])
            out.append(row)
        return out

    async def window_spend(self, tenant: str, app: str | None, since: float) -> Decimal:
        sql = "SELECT COALESCE(SUM(cost_usd), 0) FROM ledger WHERE tenant = $1 AND ts >= $2"
        params: list[Any] = [tenant, float(since)]
        if app is not None:
            sql += " AND app = $3"
            params.append(app)
        return quantize_usd(await self.pool.fetchval(sql, *params))

    async def get(self, request_id: str) -> LedgerRow | None:
        found = await self.pool.fetchrow(SELECT_ROW + " WHERE request_id = $1", request_id)
        return None if found is None else decode_row(tuple(found.values()))

    async def open_reservations(self) -> list[OpenReservation]:
        found = await self.pool.fetch(SELECT_RES + " ORDER BY ts, request_id")
        return [decode_res(tuple(r.values())) for r in found]

    async def applied_migrations(self) -> list[int]:
        return [r["version"] for r in await self.pool.fetch("SELECT version FROM schema_migrations ORDER BY version")]
