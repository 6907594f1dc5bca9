"""How a ledger entry looks in SQLite: the column order, the statements, and the encoders between
entries and column values. Kept apart from the backend (:mod:`gateway.metering.ledger_sqlite`, which
owns connections, transactions and the writer threads) so that each reads as one concern: here, what
a row is on disk; there, how it gets written.

Money is INTEGER nanodollars: SQLite has no exact decimal type, and integer sums are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite
import orjson

from gateway.metering.ledger_query import GROUPS
from gateway.metering.ledger_rows import LedgerRow, OpenReservation, dump_json, encode_all, utc_day_month
from gateway.metering.money import from_nanos, to_nanos
from gateway.storage.sqlite import MAX_ROWS_PER_STATEMENT, values_statements
from gateway.storage.text import clean_text, opt_text

ROW_COLUMNS = (
    "request_id", "ts", "day", "month", "tenant", "key_id", "app", "end_user", "tags", "virtual_model",
    "upstream", "upstream_model", "stream", "prompt_tokens", "cached_tokens", "completion_tokens",
    "reasoning_tokens", "tool_calls_billed", "cost_nanos", "cache_savings_nanos", "price_version",
    "ttft_ms", "latency_ms", "status", "outcome", "estimated", "estimate_reason", "route_reason", "endpoint",
    "upstream_key",
)  # fmt: skip
RES_COLUMNS = (
    "request_id", "ts", "tenant", "key_id", "app", "virtual_model", "upstream", "upstream_model",
    "amount_nanos", "prompt_tokens_estimate", "windows", "endpoint",
)  # fmt: skip

INSERT_ROW = f"INSERT INTO ledger ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
INSERT_NEW_ROW = INSERT_ROW + " ON CONFLICT (request_id) DO NOTHING"
UPSERT_RES = (
    f"INSERT INTO open_reservations ({', '.join(RES_COLUMNS)}) VALUES ({', '.join('?' * len(RES_COLUMNS))})"
    " ON CONFLICT (request_id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in RES_COLUMNS[1:])
)
SELECT_ROW = f"SELECT {', '.join(ROW_COLUMNS)} FROM ledger"
SELECT_RES = f"SELECT {', '.join(RES_COLUMNS)} FROM open_reservations"
DELETE_ROWS = "DELETE FROM ledger WHERE request_id IN (SELECT value FROM json_each(?))"
DELETE_RESERVATIONS = "DELETE FROM open_reservations WHERE request_id IN (SELECT value FROM json_each(?))"


def encode_row(r: LedgerRow) -> tuple[Any, ...]:
    """The row's column values: exact ints, floats and str (flags as 0/1), None for NULL; money is whole
    nanodollars, taken from the row when the meter computed them, converted exactly otherwise (a
    float amount is refused here, before the database)."""
    day, month = utc_day_month(r.ts)
    texts: tuple[str | None, ...] = (
        r.tenant, r.key_id, r.app, r.user, dump_json(r.tags), r.virtual_model, r.upstream, r.upstream_model,
        r.price_version, r.outcome, r.estimate_reason, r.route_reason, r.upstream_key,
    )  # fmt: skip
    # one look at all the text: nearly always ASCII without NUL, and then nothing needs cleaning
    joined = "".join(filter(None, texts))
    if not joined.isascii() or "\x00" in joined:
        texts = tuple(map(opt_text, texts))
    tenant, key_id, app, user, tags, vmodel, upstream, umodel, price_version, outcome, reason, route, key = texts
    cost = r.cost_nanos if r.cost_nanos is not None else to_nanos(r.cost_usd)
    savings = r.savings_nanos if r.savings_nanos is not None else to_nanos(r.cache_savings_usd)
    return (
        r.request_id, r.ts, day, month, tenant, key_id, app, user, tags, vmodel, upstream, umodel,
        1 if r.stream else 0, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.reasoning_tokens,
        r.tool_calls_billed, cost, savings, price_version, r.ttft_ms, r.latency_ms, r.status, outcome,
        1 if r.estimated else 0, reason, route, r.endpoint, key,
    )  # fmt: skip


def decode_row(v: Sequence[Any]) -> LedgerRow:
    (rid, ts, _day, _month, tenant, key_id, app, user, tags, vmodel, upstream, umodel, stream, prompt, cached,
     completion, reasoning, tools, cost, savings, price_version, ttft, latency, status, outcome, estimated,
     reason, route, endpoint, upstream_key) = v  # fmt: skip
    return LedgerRow(
        rid, ts, tenant, key_id, app, user, orjson.loads(tags), vmodel, upstream, umodel, bool(stream), prompt,
        cached, completion, reasoning, tools, from_nanos(cost), from_nanos(savings), price_version, ttft, latency,
        status, outcome, bool(estimated), reason, route, endpoint=endpoint,
        upstream_key=upstream_key,
    )  # fmt: skip


def encode_res(r: OpenReservation) -> tuple[Any, ...]:
    return (
        r.request_id, float(r.ts), clean_text(r.tenant), clean_text(r.key_id), opt_text(r.app),
        clean_text(r.virtual_model), opt_text(r.upstream), opt_text(r.upstream_model), to_nanos(r.amount_usd),
        int(r.prompt_tokens_estimate), clean_text(dump_json(list(r.windows))), clean_text(r.endpoint),
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
        from_nanos(amount),
        prompt,
        orjson.loads(windows),
        endpoint,
    )


async def insert_rows(conn: aiosqlite.Connection, sql: str, rows: Sequence[LedgerRow]) -> None:
    """``rows`` in statements of at most :data:`MAX_ROWS_PER_STATEMENT`, each encoded just before it
    goes: the event loop is never held for a whole batch's encoding, nor the GIL for a whole batch's
    parameters (sqlite3 binds them holding it), so requests in flight see no pause of a millisecond."""
    for i in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
        for statement, params in values_statements(sql, encode_all(encode_row, rows[i : i + MAX_ROWS_PER_STATEMENT])):
            await conn.execute(statement, params)


assert set(GROUPS.values()) <= set(ROW_COLUMNS), "every report group must be a stored column"
