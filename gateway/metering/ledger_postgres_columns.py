"""How a ledger entry looks in PostgreSQL: the column order, the statements, and the encoders between
entries and column values. Kept apart from the backend (:mod:`gateway.metering.ledger_postgres`, which
owns the pool and transactions), as its SQLite counterpart is.

Money is NUMERIC(20,9), rounded by us (half-to-even, to the nanodollar, as SQLite stores it) before it
is sent, so both backends hold the same amounts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.metering.ledger_query import GROUPS
from gateway.metering.ledger_rows import LedgerRow, OpenReservation, dump_json, utc_day_month
from gateway.metering.money import quantize_usd
from gateway.storage.text import clean_text, opt_text

ROW_COLUMNS = (
    "request_id", "ts", "day", "month", "tenant", "key_id", "app", "end_user", "tags", "virtual_model",
    "upstream", "upstream_model", "stream", "prompt_tokens", "cached_tokens", "completion_tokens",
    "reasoning_tokens", "tool_calls_billed", "cost_usd", "cache_savings_usd", "price_version",
    "ttft_ms", "latency_ms", "status", "outcome", "estimated", "estimate_reason", "route_reason", "endpoint",
    "upstream_key",
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
    "SELECT request_id, (outcome IN ('crashed', 'interrupted') AND estimated) AS replaceable"
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
        clean_text(r.route_reason), r.endpoint, opt_text(r.upstream_key),
    )  # fmt: skip


def decode_row(v: Sequence[Any]) -> LedgerRow:
    (rid, ts, _day, _month, tenant, key_id, app, user, tags, vmodel, upstream, umodel, stream, prompt, cached,
     completion, reasoning, tools, cost, savings, price_version, ttft, latency, status, outcome, estimated,
     reason, route, endpoint, upstream_key) = v  # fmt: skip
    return LedgerRow(
        rid, ts, tenant, key_id, app, user, orjson.loads(tags), vmodel, upstream, umodel, stream, prompt, cached,
        completion, reasoning, tools, quantize_usd(cost), quantize_usd(savings), price_version, ttft, latency, status,
        outcome, estimated, reason, route, endpoint=endpoint,
        upstream_key=upstream_key,
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


assert set(GROUPS.values()) <= set(ROW_COLUMNS), "every report group must be a stored column"
