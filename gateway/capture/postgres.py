"""Capture rows in the ledger's PostgreSQL database (in the ledger's schema if it has one).

The ``capture`` table is part of the ledger's schema (migration 2 in :mod:`gateway.storage.postgres`);
opening the store brings the schema up to date under the same advisory lock the ledger takes."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from gateway.capture.store import CaptureRow, CaptureStore
from gateway.storage.postgres import checked_schema, migrate

UPSERT = (
    "INSERT INTO capture (request_id, ts, expires_at, tenant, mode, record) VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
    " ON CONFLICT (request_id) DO UPDATE SET ts = excluded.ts, expires_at = excluded.expires_at,"
    " tenant = excluded.tenant, mode = excluded.mode, record = excluded.record"
)


class PostgresCaptureStore(CaptureStore):
    def __init__(self, dsn: str, *, schema: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.dsn = dsn
        self.schema = checked_schema(schema, "capture")
        self._pool: asyncpg.Pool | None = None

    @property
    def where(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.dsn)
        return f"postgresql://{parts.hostname or ''}{parts.path}" + (f" (schema {self.schema})" if self.schema else "")

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the capture store is not open")
        return self._pool

    async def _connect(self) -> None:
        settings = {"application_name": "kimi-gateway capture"}
        if self.schema:
            settings["search_path"] = f'"{self.schema}"'
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, server_settings=settings)
        async with self.pool.acquire() as conn:
            await migrate(conn, self.schema, self.where)

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _write(self, rows: list[CaptureRow]) -> None:
        values = [(r.request_id, r.ts, r.expires_at, r.tenant, r.mode, r.record_json()) for r in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(UPSERT, values)

    async def get(self, request_id: str) -> CaptureRow | None:
        found = await self.pool.fetchrow(
            "SELECT request_id, ts, expires_at, tenant, mode, record::text AS record FROM capture"
            " WHERE request_id = $1",
            request_id,
        )
        if found is None:
            return None
        return CaptureRow(
            found["request_id"], found["ts"], found["expires_at"], found["tenant"], found["mode"],
            orjson.loads(found["record"]),
        )  # fmt: skip

    async def _purge(self, now: float) -> int:
        status = await self.pool.execute("DELETE FROM capture WHERE expires_at < $1", now)
        return int(status.rsplit(" ", 1)[-1])
