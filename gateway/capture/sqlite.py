"""Capture rows in the ledger's SQLite file (own connection, WAL shared with the ledger).

The ``capture`` table is part of the ledger's schema (migration 2 in :mod:`gateway.storage.sqlite`);
opening the store brings the file's schema up to date, so ``capture show`` works on a file the
gateway of this version has not opened yet."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway.capture.store import CaptureRow, CaptureStore
from gateway.storage.sqlite import BUSY_TIMEOUT_MS, migrate, values_statements

UPSERT = (
    "INSERT INTO capture (request_id, ts, expires_at, tenant, mode, record) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (request_id) DO UPDATE SET ts = excluded.ts, expires_at = excluded.expires_at,"
    " tenant = excluded.tenant, mode = excluded.mode, record = excluded.record"
)


class SqliteCaptureStore(CaptureStore):
    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(**options)
        self.path = str(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"sqlite:///{self.path}"

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the capture store is not open")
        return self._conn

    async def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(self.path)
        await self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                await migrate(self._conn, self.where)
            except BaseException:
                await self._conn.rollback()
                raise
            await self._conn.commit()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _write(self, rows: list[CaptureRow]) -> None:
        values = [(r.request_id, r.ts, r.expires_at, r.tenant, r.mode, r.record_json()) for r in rows]
        async with self._lock:
            for sql, params in values_statements(UPSERT, values):
                await self.conn.execute(sql, params)
            await self.conn.commit()

    async def get(self, request_id: str) -> CaptureRow | None:
        async with self._lock:
            found = await self.conn.execute_fetchall(
                "SELECT request_id, ts, expires_at, tenant, mode, record FROM capture WHERE request_id = ?",
                [request_id],
            )
        for rid, ts, expires_at, tenant, mode, record in found:
            return CaptureRow(rid, ts, expires_at, tenant, mode, orjson.loads(record))
        return None

    async def _purge(self, now: float) -> int:
        async with self._lock:
            cursor = await self.conn.execute("DELETE FROM capture WHERE expires_at < ?", [now])
            await self.conn.commit()
            return cursor.rowcount
