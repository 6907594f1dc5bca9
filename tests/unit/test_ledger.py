"""The spend ledger: the same suite runs against SQLite (a temporary file) and PostgreSQL (a private
schema per test; skipped loudly, or failed under KIMI_GATEWAY_REQUIRE_SERVICES=1, when no server)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import sqlite3
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.metering.ledger import Ledger
from gateway.metering.ledger_batch import plan_batch
from gateway.metering.ledger_factory import ledger_from_url
from gateway.metering.ledger_postgres import PostgresLedger
from gateway.metering.ledger_query import GROUPS, build_spend_query
from gateway.metering.ledger_rows import LedgerRow, OpenReservation
from gateway.metering.ledger_sqlite import WRITER_NICE, SqliteLedger
from gateway.metering.ledger_sqlite_columns import ROW_COLUMNS, encode_row
from gateway.metering.money import _CTX, NANO, fmt_usd, from_nanos, quantize_usd, to_nanos, usd_text
from tests.conftest import ROOT


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def make_row(i: int, **changes: Any) -> LedgerRow:
    row = LedgerRow(
        request_id=f"req-{i:05d}",
        ts=utc("2026-11-01T10:00:00") + i,
        tenant="acme",
        key_id="0123456789ab",
        app="checkout",
        user="user-7",
        tags={"app": "checkout", "team": "payments"},
        virtual_model="kimi-k2-thinking",
        upstream="moonshot",
        upstream_model="kimi-k2-thinking",
        stream=True,
        prompt_tokens=1000 + i,
        cached_tokens=200,
        completion_tokens=300,
        reasoning_tokens=120,
        tool_calls_billed=1,
        cost_usd=Decimal("0.000123456") + Decimal(i) * NANO,
        cache_savings_usd=Decimal("0.000010001"),
        price_version="moonshot/kimi-k2-thinking@2025-11-06",
        ttft_ms=412.25,
        latency_ms=2310.5,
        status=200,
        outcome="ok",
        estimated=False,
        estimate_reason=None,
        route_reason="primary",
    )
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def make_res(i: int, **changes: Any) -> OpenReservation:
    res = OpenReservation(
        request_id=f"req-{i:05d}",
        ts=utc("2026-11-01T10:00:00") + i,
        tenant="acme",
        key_id="0123456789ab",
        app="checkout",
        virtual_model="kimi-k2-thinking",
        upstream="moonshot",
        upstream_model="kimi-k2-thinking",
        amount_usd=Decimal("0.012500000"),
        prompt_tokens_estimate=1500,
        windows=["acme:day:2026-11-01", "acme:month:2026-11"],
    )
    for name, value in changes.items():
        setattr(res, name, value)
    return res


# --------------------------------------------------------------------------------------------------
# Fixtures: one URL per backend, and a factory that closes every ledger it made


Factory = Callable[..., Ledger]


@pytest.fixture()
async def make(ledger_url: str) -> AsyncIterator[Factory]:
    """``make(**options)``: an unopened ledger on this test's database, closed after the test."""
    made: list[Ledger] = []

    def factory(**options: Any) -> Ledger:
        ledger = ledger_from_url(ledger_url, **options)
        made.append(ledger)
        return ledger

    yield factory
    for ledger in made:
        ledger.close_timeout = 2.0
        with contextlib.suppress(Exception):
            await ledger.close()


@pytest.fixture()
async def ledger(make: Factory) -> Ledger:
    opened = make()
    await opened.open()
    return opened


async def count(ledger: Ledger, **filters: Any) -> int:
    rows = await ledger.spend(group_by=[], **filters)
    return rows[0]["requests"] if rows else 0


# --------------------------------------------------------------------------------------------------
# Money


def test_money_rounds_half_even_to_the_nanodollar() -> None:
    assert to_nanos(Decimal("0.000123456")) == 123_456
    assert to_nanos(Decimal("0.0000000005")) == 0
    assert to_nanos(Decimal("0.0000000015")) == 2
    assert to_nanos(Decimal("-0.0000000025")) == -2
    assert to_nanos(12) == 12_000_000_000
    assert from_nanos(123_456) == Decimal("0.000123456")
    assert quantize_usd(Decimal("1e15")) == Decimal("1000000000000000")
    assert fmt_usd(Decimal("0.0001235")) == "0.000124"
    assert fmt_usd(Decimal("-0.0000001")) == "0.000000"
    assert fmt_usd(Decimal("1234.5"), places=2) == "1234.50"


@given(
    st.decimals(allow_nan=False, allow_infinity=False)
    | st.builds(lambda n, e: Decimal(n).scaleb(e), st.integers(-(10**40), 10**40), st.integers(-60, 45))
)
def test_nanodollars_of_any_amount_match_quantizing_it(amount: Decimal) -> None:
    """The exact-ratio shortcut for amounts already whole in nanodollars never changes a result."""
    try:
        expected = int(amount.quantize(NANO, context=_CTX).scaleb(9, context=_CTX))
    except InvalidOperation:  # beyond the 60-digit context: the shortcut must not accept it either
        with pytest.raises(InvalidOperation):
            to_nanos(amount)
        return
    assert to_nanos(amount) == expected


def test_a_row_carrying_nanodollars_encodes_as_one_converted_from_its_decimals() -> None:
    row = make_row(3)
    carried = make_row(3, cost_nanos=to_nanos(row.cost_usd), savings_nanos=to_nanos(row.cache_savings_usd))
    assert carried == row  # the carried amounts are a cache, not part of the row's identity
    assert encode_row(carried) == encode_row(row)
    assert encode_row(row)[ROW_COLUMNS.index("cost_nanos")] == 123_459


def test_row_parameters_take_sqlite3s_direct_binding_path() -> None:
    """sqlite3 binds exact int/float/str at once and sends anything else (bool, None) through its
    adaptation protocol: a fifth of a row's insert cost when None had no registered adapter."""
    for row in (make_row(1), make_row(2, app=None, user=None, ttft_ms=None, estimated=True, estimate_reason="x")):
        values = encode_row(row)
        assert {type(v) for v in values} <= {int, float, str, type(None)}, values
    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT ? IS NULL, typeof(?)", (None, None)).fetchone() == (1, "null")


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_usd_text_prints_nanodollars_as_the_decimal_would(nanos: int) -> None:
    assert usd_text(nanos) == f"{from_nanos(nanos):f}"


def test_money_refuses_floats_and_non_finite_amounts() -> None:
    with pytest.raises(TypeError, match="not float"):
        to_nanos(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        to_nanos(Decimal("NaN"))
    with pytest.raises(TypeError):
        from_nanos(1.0)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**55), max_value=10**55))
def test_from_nanos_is_the_scaled_integer_digit_for_digit(n: int) -> None:
    """One multiplication by NANO gives what scaling the integer by 1e-9 gives: value, sign and
    exponent (so str() and the cost header print the same nine places)."""
    assert from_nanos(n).as_tuple() == Decimal(n).scaleb(-9, context=_CTX).as_tuple()
    assert from_nanos(n).as_tuple().exponent == -9


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_nanos_round_trip_exactly(n: int) -> None:
    assert to_nanos(from_nanos(n)) == n


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**12), max_value=10**12))
def test_quantize_never_moves_more_than_half_a_nanodollar(d: Decimal) -> None:
    assert abs(quantize_usd(d) - d) <= NANO / 2


# --------------------------------------------------------------------------------------------------
# URLs and batch planning (no database)


def test_url_selects_the_backend() -> None:
    rel = ledger_from_url("sqlite:///data/ledger.db")
    assert isinstance(rel, SqliteLedger) and rel.path == "data/ledger.db"
    absolute = ledger_from_url("sqlite:////var/lib/kimi/ledger.db", batch_size=10)
    assert isinstance(absolute, SqliteLedger) and absolute.path == "/var/lib/kimi/ledger.db"
    assert absolute.batch_size == 10
    assert ledger_from_url("sqlite:///:memory:").path == ":memory:"  # type: ignore[attr-defined]
    pg = ledger_from_url("postgres://gw:secret@db:5433/spend?schema=ledger&sslmode=disable")
    assert isinstance(pg, PostgresLedger)
    assert pg.schema == "ledger"
    assert pg.dsn == "postgresql://gw:secret@db:5433/spend?sslmode=disable"
    assert "secret" not in pg.where
    assert isinstance(ledger_from_url("postgresql://u@h/db"), PostgresLedger)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ledger.db", "needs a scheme"),
        ("mysql://h/db", "unknown scheme 'mysql'"),
        ("sqlite://ledger.db", "sqlite:///relative.db"),
        ("postgresql://h/db?schema=x;drop", "plain identifier"),
    ],
)
def test_bad_urls_are_refused_precisely(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ledger_from_url(url)


def test_a_batch_has_the_effect_of_its_entries_in_order() -> None:
    batch = plan_batch([make_res(1), make_res(2), make_row(1), make_row(3), make_res(3), make_res(4)])
    assert [r.request_id for r in batch.rows] == ["req-00001", "req-00003"]
    assert batch.settled == ["req-00001", "req-00003"]
    # 1 is settled later in the batch; 3 was reserved after its row (so it stays open, as in sequence)
    assert [r.request_id for r in batch.reservations] == ["req-00002", "req-00003", "req-00004"]


def test_a_batch_deletes_only_reservations_an_earlier_batch_stored() -> None:
    entries = [make_res(1), make_row(1), make_row(2), make_row(3)]
    # 1 reserved and settled in this batch, 2 reserved nothing, 3's reservation is in the database
    assert plan_batch(entries, stored_open={"req-00003"}).settled == ["req-00003"]
    assert plan_batch(entries, stored_open=set()).settled == []


def test_a_reservation_made_again_after_a_failover_replaces_the_first_in_one_batch() -> None:
    batch = plan_batch([make_res(1), make_res(2), make_res(1, upstream="vllm", amount_usd=Decimal("0.002"))])
    kept = [(r.request_id, r.upstream) for r in batch.reservations]
    assert kept == [("req-00002", "moonshot"), ("req-00001", "vllm")]


async def test_a_reservation_upserted_again_is_stored_as_the_last_one(ledger: Ledger) -> None:
    ledger.reservation_opened(make_res(5))
    await ledger.flush()
    ledger.reservation_opened(make_res(6))
    ledger.reservation_opened(make_res(6, upstream="vllm", amount_usd=Decimal("0.002")))  # same batch
    ledger.reservation_opened(make_res(5, upstream="vllm", amount_usd=Decimal("0.003")))  # a later batch
    await ledger.flush()
    stored = {r.request_id: (r.upstream, r.amount_usd) for r in await ledger.open_reservations()}
    assert stored == {"req-00005": ("vllm", Decimal("0.003")), "req-00006": ("vllm", Decimal("0.002"))}


# --------------------------------------------------------------------------------------------------
# Round trips


async def test_every_field_round_trips_and_money_is_exact(ledger: Ledger) -> None:
    row = make_row(
        1,
        cost_usd=Decimal("0.000123456"),
        cache_savings_usd=Decimal("0.0000000015"),  # rounds half-even to 2 nanodollars
        tags={"app": "checkout", "team": "zahlungen-ü", "empty": ""},
        user=None,
        ttft_ms=None,
        ts=1793534400.123456,
    )
    ledger.record(row)
    await ledger.flush()
    got = await ledger.get(row.request_id)
    assert got is not None
    assert got.cost_usd == Decimal("0.000123456") and isinstance(got.cost_usd, Decimal)
    assert got.cache_savings_usd == Decimal("0.000000002")
    assert got == dataclasses.replace(row, cache_savings_usd=Decimal("0.000000002"))
    assert await ledger.get("no-such-request") is None


async def test_sums_are_exact_where_floats_would_drift(ledger: Ledger) -> None:
    for i in range(1000):
        ledger.record(make_row(i, cost_usd=Decimal("0.000000001") if i % 2 else Decimal("0.1")))
    await ledger.flush()
    (total,) = await ledger.spend(group_by=[])
    assert total["cost_usd"] == Decimal("50.000000500")
    assert await ledger.window_spend("acme", None, 0) == Decimal("50.000000500")


async def test_text_the_databases_refuse_is_stored_cleaned(ledger: Ledger) -> None:
    ledger.record(make_row(1, user="nul\x00inside", app="half \ud800 surrogate", tags={"k": "v\x00"}))
    ledger.record(make_row(2))
    await ledger.flush()
    got = await ledger.get("req-00001")
    assert got is not None
    assert got.user == "nul\ufffdinside"
    assert got.app == "half ? surrogate"
    assert got.tags == {"k": "v\x00"}  # tags are JSON text: the NUL travels escaped
    assert ledger.rejected == 0 and await count(ledger) == 2


# --------------------------------------------------------------------------------------------------
# Reports


def dataset() -> list[LedgerRow]:
    """60 rows over two months and three UTC days, with NULL apps, users and upstreams among the groups."""
    starts = [utc("2026-10-31T23:00:00"), utc("2026-11-01T00:00:00"), utc("2026-11-02T12:00:00")]
    rows = []
    for i in range(60):
        rows.append(
            make_row(
                i,
                ts=starts[i % 3] + (i // 3) * 60,
                tenant=["acme", "Zeta", "beta"][i % 3 if i % 5 else 0],
                app=["checkout", None, "search", "Search"][i % 4],
                user=["user-7", None, "user-8"][i % 3],
                key_id=["aaaaaaaaaaaa", "bbbbbbbbbbbb"][i % 2],
                virtual_model=["kimi-k2-thinking", "kimi-fast"][(i // 2) % 2],
                upstream=["moonshot", None, "sim"][(i // 3) % 3],
                cost_usd=Decimal(i) * Decimal("0.000001001") + Decimal("0.000000001"),
                cache_savings_usd=Decimal(i % 7) * NANO,
                prompt_tokens=i * 10,
                cached_tokens=i,
                completion_tokens=i * 3,
                reasoning_tokens=i * 2,
                estimated=i % 7 == 0,
                endpoint=["chat/completions", "messages", "responses"][(i // 4) % 3],
                upstream_key=["key-a", None, "key-b"][(i // 5) % 3],
            )
        )
    return rows


def expected_spend(rows: list[LedgerRow], group_by: list[str]) -> list[dict[str, Any]]:
    """What :meth:`Ledger.spend` must return, computed in Python."""
    from gateway.metering.ledger_rows import utc_day_month

    def value(row: LedgerRow, group: str) -> Any:
        if group in ("day", "month"):
            return utc_day_month(row.ts)[0 if group == "day" else 1]
        column = GROUPS[group]
        return getattr(row, "user" if column == "end_user" else column)  # the row's field for that column

    acc: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {
            "requests": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "completion_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": Decimal(0),
            "cache_savings_usd": Decimal(0),
            "estimated_requests": 0,
        }
    )
    for row in rows:
        a = acc[tuple(value(row, g) for g in group_by)]
        a["requests"] += 1
        for f in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens"):
            a[f] += getattr(row, f)
        a["cost_usd"] += quantize_usd(row.cost_usd)
        a["cache_savings_usd"] += quantize_usd(row.cache_savings_usd)
        a["estimated_requests"] += int(row.estimated)

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple((v is None, v or "") for v in key)  # code point order, NULLs last

    return [dict(zip(group_by, k, strict=True)) | acc[k] for k in sorted(acc, key=order)]


@pytest.fixture()
async def filled(ledger: Ledger) -> Ledger:
    for row in dataset():
        ledger.record(row)
    await ledger.flush()
    return ledger


@pytest.mark.parametrize("group", list(GROUPS))
async def test_spend_by_each_group(filled: Ledger, group: str) -> None:
    got = await filled.spend(group_by=[group], since=None, until=None)
    assert got == expected_spend(dataset(), [group])
    assert len(got) >= 2


@pytest.mark.parametrize(
    "group_by",
    [[], ["tenant", "model"], ["month", "tenant", "app"], ["day", "upstream", "key"], ["app", "tenant"]],
)
async def test_spend_by_group_combinations(filled: Ledger, group_by: list[str]) -> None:
    assert await filled.spend(group_by=group_by) == expected_spend(dataset(), group_by)


async def test_spend_filters_by_time_and_tenant(filled: Ledger) -> None:
    rows = dataset()
    nov = utc("2026-11-01T00:00:00")
    nov2 = utc("2026-11-02T00:00:00")
    # since is inclusive, until exclusive: a row at exactly midnight belongs to the new day
    assert any(r.ts == nov for r in rows)
    got = await filled.spend(group_by=["day"], since=nov, until=nov2)
    assert got == expected_spend([r for r in rows if nov <= r.ts < nov2], ["day"])
    assert [g["day"] for g in got] == ["2026-11-01"]
    october = await filled.spend(group_by=["tenant"], until=nov)
    assert october == expected_spend([r for r in rows if r.ts < nov], ["tenant"])
    zeta = await filled.spend(group_by=["app"], since=nov, tenant="Zeta")
    assert zeta == expected_spend([r for r in rows if r.ts >= nov and r.tenant == "Zeta"], ["app"])
    assert await filled.spend(group_by=["tenant"], tenant="nobody") == []
    assert await filled.spend(group_by=[], since=utc("2030-01-01T00:00:00")) == []


async def test_unknown_or_repeated_groups_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match=r"unknown group 'modle' \(did you mean 'model'\?\); choose from tenant"):
        await ledger.spend(group_by=["tenant", "modle"])
    with pytest.raises(ValueError, match="unknown group 'key_id'"):
        await ledger.spend(group_by=["key_id"])
    with pytest.raises(ValueError, match="'day' is listed twice"):
        await ledger.spend(group_by=["day", "day"])
    with pytest.raises(ValueError, match="list of names"):
        await ledger.spend(group_by="tenant")


async def test_window_spend_seeds_budgets(filled: Ledger) -> None:
    rows = dataset()
    nov = utc("2026-11-01T00:00:00")

    def total(tenant: str, app: str | None, since: float) -> Decimal:
        picked = [r for r in rows if r.tenant == tenant and r.ts >= since and (app is None or r.app == app)]
        return sum((quantize_usd(r.cost_usd) for r in picked), Decimal(0))

    for tenant, app in [("acme", None), ("acme", "checkout"), ("Zeta", "Search"), ("beta", None)]:
        for since in (0.0, nov):
            assert await filled.window_spend(tenant, app, since) == total(tenant, app, since)
    assert await filled.window_spend("nobody", None, 0) == Decimal(0)


# --------------------------------------------------------------------------------------------------
# The writer: batching, flushing, closing, restarting


async def test_record_never_blocks_and_one_flush_writes_many_batches(make: Factory) -> None:
    ledger = make(batch_size=200)
    await ledger.open()
    batches: list[int] = []
    write = ledger._write

    async def counting(batch: Any) -> None:
        batches.append(len(batch.rows))
        await write(batch)

    ledger._write = counting  # type: ignore[method-assign]
    started = time.perf_counter()
    for i in range(2000):
        ledger.record(make_row(i))
    elapsed = time.perf_counter() - started
    assert ledger.backlog == 2000  # nothing ran: record() only appends
    assert elapsed < 0.5
    await ledger.flush()
    assert ledger.backlog == 0
    assert batches == [200] * 10
    assert await count(ledger) == 2000


async def test_a_full_batch_does_not_turn_the_writer_into_one_transaction_per_row(make: Factory) -> None:
    """Regression: once a full batch had been written, rows arriving one by one during each write
    were written one small transaction at a time for as long as the load lasted (measured at the
    benchmark's 4,000 requests/s: 891 transactions for 5,000 rows), where one per interval will do."""
    ledger = make(batch_size=50, max_delay=0.2)
    await ledger.open()
    batches: list[int] = []
    write = ledger._write

    async def slow(batch: Any) -> None:  # a write takes longer than the gap between two rows
        batches.append(len(batch.rows))
        await asyncio.sleep(0.005)
        await write(batch)

    ledger._write = slow  # type: ignore[method-assign]
    for i in range(50):  # a full batch: written at once
        ledger.record(make_row(i))
    for i in range(50, 150):  # then a steady trickle, well under a batch per interval
        await asyncio.sleep(0.001)
        ledger.record(make_row(i))
    await ledger.flush()
    assert sum(batches) == 150
    assert batches[0] == 50
    assert len(batches) <= 5, batches


async def test_the_writer_does_not_need_a_flush(make: Factory) -> None:
    ledger = make(max_delay=0.01)
    await ledger.open()
    ledger.record(make_row(1))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if await ledger.get("req-00001") is not None:
            break
    assert await ledger.get("req-00001") is not None
    assert ledger.backlog == 0


async def test_close_writes_everything_and_a_new_ledger_sees_it(make: Factory) -> None:
    first = make(batch_size=100)
    await first.open()
    for i in range(750):
        first.reservation_opened(make_res(i))
        first.record(make_row(i))
    first.reservation_opened(make_res(9999))
    await first.close()  # no flush: close must drain
    assert first.backlog == 0
    await first.close()  # idempotent
    second = make()
    await second.open()
    assert await count(second) == 750
    assert [r.request_id for r in await second.open_reservations()] == ["req-09999"]


async def test_rows_survive_a_restart_and_writing_continues(make: Factory) -> None:
    first = make()
    await first.open()
    first.record(make_row(1))
    await first.close()
    second = make()
    await second.open()
    assert (await second.get("req-00001")) == make_row(1)
    second.record(make_row(2))
    await second.flush()
    assert await count(second) == 2
    assert await second.applied_migrations() == [1, 2, 3, 4, 5]


async def test_entries_recorded_before_open_are_kept(make: Factory) -> None:
    ledger = make()
    ledger.record(make_row(1))
    await ledger.open()
    await ledger.flush()
    assert await count(ledger) == 1


async def test_an_entry_after_close_is_logged_not_lost_quietly(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    ledger = make()
    await ledger.open()
    await ledger.close()
    with caplog.at_level(logging.ERROR, "gateway.metering.ledger"):
        ledger.record(make_row(42))
    assert ledger.rejected == 1
    assert "req-00042" in caplog.text and "0.000123498" in caplog.text


async def test_a_large_backlog_warns_but_keeps_everything(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    ledger = make(backlog_warn=10)
    await ledger.open()
    with caplog.at_level(logging.WARNING, "gateway.metering.ledger"):
        for i in range(50):
            ledger.record(make_row(i))
    assert caplog.text.count("ledger backlog is") == 1
    assert "backlog is 11 entries" in caplog.text
    assert ledger.backlog == 50
    await ledger.flush()
    assert await count(ledger) == 50


# --------------------------------------------------------------------------------------------------
# Failures: outages are retried, bad data is isolated and logged


async def test_an_outage_is_retried_until_the_database_is_back(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    ledger = make(retry_max_delay=0.02)
    await ledger.open()
    write = ledger._write
    # a ValueError from the driver (aiosqlite's "no active connection") is an outage, not bad data
    failures: list[Exception] = [ConnectionResetError("database went away"), ValueError("no active connection")] * 2

    async def flaky(batch: Any) -> None:
        if failures:
            raise failures.pop()
        await write(batch)

    ledger._write = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "gateway.metering.ledger"):
        for i in range(10):
            ledger.record(make_row(i))
        await asyncio.wait_for(ledger.flush(), 5)
    assert await count(ledger) == 10
    assert ledger.rejected == 0
    assert caplog.text.count("retrying") == 4


async def test_close_gives_up_on_a_dead_database_and_logs_the_entries(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = make(retry_max_delay=0.02, close_timeout=0.3)
    await ledger.open()

    async def down(batch: Any) -> None:
        raise ConnectionRefusedError("no database")

    ledger._write = down  # type: ignore[method-assign]
    ledger.reservation_opened(make_res(1))
    ledger.record(make_row(1))
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, "gateway.metering.ledger"):
        await ledger.close()
    assert time.perf_counter() - started < 2
    unwritten = [r.message for r in caplog.records if r.message.startswith("ledger unwritten: ")]
    assert len(unwritten) == 2
    assert '"kind":"open_reservation"' in unwritten[0] and '"kind":"ledger_row"' in unwritten[1]
    assert ledger.rejected == 2


async def test_bad_data_loses_only_the_bad_entry(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "gateway.metering.ledger"):
        for i in range(40):
            if i == 13:
                ledger.record(make_row(i, cost_usd=0.1))  # a float: refused before the database
            elif i == 27:
                ledger.record(make_row(i, prompt_tokens=2**70))  # the database (or driver) refuses it
            else:
                ledger.record(make_row(i))
        await ledger.flush()
    assert await count(ledger) == 38
    assert ledger.rejected == 2
    assert await ledger.get("req-00013") is None and await ledger.get("req-00027") is None
    assert "req-00013" in caplog.text and "req-00027" in caplog.text


async def test_a_duplicate_request_id_keeps_the_first_row(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    ledger.record(make_row(1, cost_usd=Decimal("1")))
    await ledger.flush()
    with caplog.at_level(logging.WARNING, "gateway.metering.ledger"):
        ledger.record(make_row(2))
        ledger.record(make_row(1, cost_usd=Decimal("2")))  # already stored
        ledger.record(make_row(2, cost_usd=Decimal("3")))  # twice in one batch
        ledger.record(make_row(3))
        await ledger.flush()
    assert await count(ledger) == 3
    first = await ledger.get("req-00001")
    assert first is not None and first.cost_usd == Decimal("1")
    second = await ledger.get("req-00002")
    assert second is not None and second.cost_usd == make_row(2).cost_usd
    assert caplog.text.count("already recorded") == 2
    assert ledger.rejected == 0


async def test_a_batch_with_one_known_id_stores_all_the_others_once(ledger: Ledger) -> None:
    """The fast insert skips a known id; the batch is redone id by id, without double rows."""
    ledger.record(make_row(5))
    await ledger.flush()
    for i in range(1, 10):
        ledger.record(make_row(i, cost_usd=Decimal("7")))
    await ledger.flush()
    assert await count(ledger) == 9
    stored = await ledger.spend(group_by=[])
    assert stored[0]["cost_usd"] == 8 * Decimal("7") + make_row(5).cost_usd


# --------------------------------------------------------------------------------------------------
# Reservations and crash reconciliation


async def test_a_row_settles_its_reservation_in_the_same_batch(ledger: Ledger) -> None:
    ledger.reservation_opened(make_res(1))
    ledger.reservation_opened(make_res(2))
    ledger.record(make_row(1))
    await ledger.flush()
    assert [r.request_id for r in await ledger.open_reservations()] == ["req-00002"]


async def test_a_row_settles_a_reservation_written_earlier(ledger: Ledger) -> None:
    ledger.reservation_opened(make_res(1, amount_usd=Decimal("0.0000000015"), app=None))
    await ledger.flush()
    (res,) = await ledger.open_reservations()
    assert res == make_res(1, amount_usd=Decimal("0.000000002"), app=None)
    ledger.record(make_row(1))
    await ledger.flush()
    assert await ledger.open_reservations() == []
    assert await ledger.reconcile_open_reservations() == []


CRASH = textwrap.dedent(
    """
    import asyncio, os, sys
    from decimal import Decimal
    from tests.unit.test_ledger import make_res, make_row
    from gateway.metering.ledger_factory import open_ledger

    async def main():
        ledger = await open_ledger(sys.argv[1])
        for i in (1, 2, 3):
            ledger.reservation_opened(make_res(i, amount_usd=Decimal("0.01") * i))
        ledger.record(make_row(2))
        await ledger.flush()
        ledger.reservation_opened(make_res(4))  # never written: the process dies first
        os._exit(3)  # no close(), no cleanup: a crash

    asyncio.run(main())
    """
)


C3 = Decimal("0.0075")


async def test_reservations_left_by_a_crash_become_estimated_rows(make: Factory, ledger_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH, ledger_url, cwd=ROOT, stdout=PIPE, stderr=PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 3, stderr.decode()
    ledger = make()
    await ledger.open()
    assert [r.request_id for r in await ledger.open_reservations()] == ["req-00001", "req-00003"]
    rows = await ledger.reconcile_open_reservations(reason="replica died", estimate=lambda r: r.amount_usd / 4)
    assert [(r.request_id, r.cost_usd) for r in rows] == [("req-00001", Decimal("0.0025")), ("req-00003", C3)]
    assert await ledger.open_reservations() == []
    got = await ledger.get("req-00003")
    assert got is not None
    assert (got.outcome, got.status, got.estimated, got.estimate_reason) == ("interrupted", 0, True, "replica died")
    assert (got.tenant, got.app, got.prompt_tokens, got.cost_usd) == ("acme", "checkout", 1500, C3)
    (total,) = await ledger.spend(group_by=[])
    assert (total["requests"], total["estimated_requests"]) == (3, 2)
    assert await ledger.reconcile_open_reservations() == []  # nothing left to do


async def test_reconcile_defaults_and_cutoff(ledger: Ledger) -> None:
    ledger.reservation_opened(make_res(1))
    ledger.reservation_opened(make_res(100))
    await ledger.flush()
    rows = await ledger.reconcile_open_reservations(opened_before=make_res(50).ts)
    assert [(r.request_id, r.cost_usd) for r in rows] == [("req-00001", Decimal("0.0125"))]  # the amount held
    assert [r.request_id for r in await ledger.open_reservations()] == ["req-00100"]


async def test_a_late_real_row_replaces_the_crash_estimate(ledger: Ledger) -> None:
    ledger.reservation_opened(make_res(1))
    await ledger.flush()
    await ledger.reconcile_open_reservations()
    ledger.record(make_row(1))  # the replica was only slow
    await ledger.flush()
    got = await ledger.get("req-00001")
    assert got is not None and not got.estimated and got.outcome == "ok"
    assert await count(ledger) == 1


# --------------------------------------------------------------------------------------------------
# Several processes on one database


async def test_migrations_are_idempotent_and_safe_to_race(make: Factory) -> None:
    racers = [make() for _ in range(3)]
    await asyncio.gather(*(r.open() for r in racers))
    for r in racers:
        assert await r.applied_migrations() == [1, 2, 3, 4, 5]
    for r in racers:
        await r.close()
    again = make()
    await again.open()
    assert await again.applied_migrations() == [1, 2, 3, 4, 5]


async def test_two_ledgers_write_to_one_database_without_loss(make: Factory) -> None:
    a, b = make(batch_size=25), make(batch_size=25)
    await asyncio.gather(a.open(), b.open())
    expected = Decimal(0)
    for i in range(600):
        writer = a if i % 2 else b
        writer.reservation_opened(make_res(i))
        writer.record(make_row(i))
        expected += make_row(i).cost_usd
        if i % 100 == 0:
            await asyncio.sleep(0)
    await asyncio.gather(a.flush(), b.flush())
    (total,) = await a.spend(group_by=[])
    assert (total["requests"], total["cost_usd"]) == (600, expected)
    assert await b.open_reservations() == []


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "ledger.db"
    ledger = ledger_from_url(f"sqlite:///{path}")
    await ledger.open()
    try:
        ledger.record(make_row(1))
        await ledger.flush()
        with contextlib.closing(sqlite3.connect(path)) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("SELECT cost_nanos FROM ledger").fetchone() == (123_457,)
    finally:
        await ledger.close()


async def test_a_report_of_some_days_searches_their_time_range(tmp_path: Path) -> None:
    """Spend by day between two times reads the ``ts`` index range, not every row of the ledger."""
    path = tmp_path / "ledger.db"
    ledger = ledger_from_url(f"sqlite:///{path}")
    await ledger.open()
    await ledger.close()
    sql, params = build_spend_query(
        ["day"],
        since=utc("2026-11-01T00:00:00"),
        until=utc("2026-11-08T00:00:00"),
        tenant=None,
        cost_col="cost_nanos",
        savings_col="cache_savings_nanos",
        placeholder=lambda _: "?",
        collate="",
    )
    with contextlib.closing(sqlite3.connect(path)) as raw:
        plan = " / ".join(row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "USING INDEX ledger_ts (ts>? AND ts<?)" in plan, plan


async def test_sqlite_in_memory() -> None:
    async with ledger_from_url("sqlite:///:memory:") as ledger:
        ledger.reservation_opened(make_res(1))
        ledger.record(make_row(1))
        ledger.record(make_row(2))
        await ledger.flush()
        spend, window = await asyncio.gather(ledger.spend(group_by=["tenant"]), ledger.window_spend("acme", None, 0))
        assert spend[0]["requests"] == 2 and window == Decimal("0.000246915")
        assert await ledger.open_reservations() == []


async def test_replicas_reconciling_at_once_take_each_reservation_once(make: Factory) -> None:
    writer = make()
    await writer.open()
    for i in range(60):
        writer.reservation_opened(make_res(i))
    await writer.flush()
    a, b = make(), make()
    await asyncio.gather(a.open(), b.open())
    got_a, got_b = await asyncio.gather(a.reconcile_open_reservations(), b.reconcile_open_reservations())
    ids = [r.request_id for r in got_a + got_b]
    assert sorted(ids) == [f"req-{i:05d}" for i in range(60)]
    assert await count(writer) == 60 and await writer.open_reservations() == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are read from Linux /proc")
async def test_sqlite_ledger_threads_yield_the_cpu_to_the_event_loop(tmp_path: Path) -> None:
    """The writer's thread runs WRITER_NICE below the event loop, so a batch written while requests
    are in flight does not hold them up; the loop's own priority is untouched."""

    def nice_by_thread() -> dict[str, int]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError):
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[tid] = int(fields[16])
        return out

    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = nice_by_thread()
    ledger = SqliteLedger(tmp_path / "nice.db")
    await ledger.open()
    try:
        new = {tid: nice for tid, nice in nice_by_thread().items() if tid not in before}
        assert new and set(new.values()) == {min(loop_nice + WRITER_NICE, 19)}
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice
        ledger.record(make_row(1))
        await ledger.flush()
        assert await ledger.get("req-00001") is not None
    finally:
        await ledger.close()
