"""The shared ledger: PostgreSQL through an asyncpg pool, for several gateway replicas.

Money is NUMERIC(20,9): exact, summed exactly by SQL, and rounded by us (half-to-even, to the
nanodollar, as SQLite stores it) before it is sent, so both backends hold the same amounts. Batches go
in with binary COPY inside one transaction. Migrations (in :mod:`gateway.storage.postgres`, shared
with the capture store) take a transaction-scoped advisory lock, so replicas starting together apply
each migration once and never see a half-built schema. A ``schema`` keeps the tables apart from
anything else in the database (and keeps tests apart from each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from gateway.metering.ledger import (
    Batch,
    Ledger,
    LedgerRow,
    OpenReservation,
    build_spend_query,
    dump_json,
    encode_all,
    split_existing,
    utc_day_month,
)
from gateway.metering.money import quantize_usd
from gateway.storage.postgres import checked_schema, migrate
from gateway.storage.text import clean_text, opt_text

ROW_COLUMNS = (
    "request_id", "ts", "day", "month", "tenant", "key_id", "app", "end_user", "tags", "virtual_model",
    "upstream", "upstream_model", "stream", "prompt_tokens", "cached_tokens", "completion_tokens",
    "reasoning_tokens", "tool_calls_billed", "cost_usd", "cache_savings_usd", "price_version",
    "ttft_ms", "latency_ms", "status", "outcome", "estimated", "estimate_reason", "route_reason", "endpoint",
)  # fmt: skip
RES_COLUMNS = (
    "request_id", "ts", "tenant", "key_id", "app", "virtual_model", "upstream", "upstream_model",
    "amount_usd", "prompt_tokens_estimate", "windows", "endpoint",
)  # fmt: skip

UPSERT_RES = (
    f"INSERT INTO open_reservations ({', '.join(RES_COLUMNS)})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(RES_COLUMNS) + 1))})"
    " ON CONFLICT (request_id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in RES_COLUMNS[1:])
)
SELECT_ROW = f"SELECT {', '.join(ROW_COLUMNS)} FROM ledger"
SELECT_RES = f"SELECT {', '.join(RES_COLUMNS)} FROM open_reservations"
EXISTING = (
    "SELECT request_id, (outcome = 'crashed' AND estimated AND status = 0) AS replaceable"
    " FROM ledger WHERE request_id = ANY($1::text[])"
)


def encode_row(r: LedgerRow) -> tuple[Any, ...]:
    day, month = utc_day_month(r.ts)
    return (
        r.request_id, float(r.ts), day, month, clean_text(r.tenant), clean_text(r.key_id), opt_text(r.app),
        opt_text(r.user), dump_json(r.tags), clean_text(r.virtual_model), opt_text(r.upstream),
        opt_text(r.upstream_model), bool(r.stream), int(r.prompt_tokens), int(r.cached_tokens),
        int(r.completion_tokens), int(r.reasoning_tokens), int(r.tool_calls_billed), quantize_usd(r.cost_usd),
        quantize_usd(r.cache_savings_usd), opt_text(r.price_version), None if r.ttft_ms is None else float(r.ttft_ms),
        float(r.latency_ms), int(r.status), clean_text(r.outcome), bool(r.estimated), opt_text(r.estimate_reason),
        clean_text(r.route_reason), r.endpoint,
    )  # fmt: skip


def decode_row(v: Sequence[Any]) -> LedgerRow:
    (rid, ts, _day, _month, tenant, key_id, app, user, tags, vmodel, upstream, umodel, stream, prompt, cached,
     completion, reasoning, tools, cost, savings, price_version, ttft, latency, status, outcome, estimated,
     reason, route, endpoint) = v  # fmt: skip
    return LedgerRow(
        rid, ts, tenant, key_id, app, user, orjson.loads(tags), vmodel, upstream, umodel, stream, prompt, cached,
        completion, reasoning, tools, quantize_usd(cost), quantize_usd(savings), price_version, ttft, latency, status,
        outcome, estimated, reason, route, endpoint=endpoint,
    )  # fmt: skip


def encode_res(r: OpenReservation) -> tuple[Any, ...]:
    return (
        r.request_id, float(r.ts), clean_text(r.tenant), clean_text(r.key_id), opt_text(r.app),
        clean_text(r.virtual_model), opt_text(r.upstream), opt_text(r.upstream_model), quantize_usd(r.amount_usd),
        int(r.prompt_tokens_estimate), dump_json(list(r.windows)), clean_text(r.endpoint),
    )  # fmt: skip


def decode_res(v: Sequence[Any]) -> OpenReservation:
    rid, ts, tenant, key_id, app, vmodel, upstream, umodel, amount, prompt, windows, endpoint = v
    return OpenReservation(
        rid,
        ts,
        tenant,
        key_id,
        app,
        vmodel,
        upstream,
        umodel,
        quantize_usd(amount),
        prompt,
        orjson.loads(windows),
        endpoint,
    )


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
                insert, replace = split_existing(batch.rows, {r["request_id"]: r["replaceable"] for r in found})
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
