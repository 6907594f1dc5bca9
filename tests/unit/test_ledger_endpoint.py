"""The ledger's ``endpoint`` column (which API the client spoke), on SQLite and a real PostgreSQL:
rows written before migration 4 read as chat completions, spend groups by it, and a reservation left
open by a crash keeps it in the estimated row that stands in for the request."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from gateway.metering import ledger_postgres_columns, ledger_sqlite_columns
from gateway.metering.ledger_factory import ledger_from_url
from gateway.storage import postgres as storage_postgres
from gateway.storage import sqlite as storage_sqlite
from tests.unit.conftest import PG_URL
from tests.unit.test_ledger import make_res, make_row

OLD_MIGRATIONS = 3  # the schema before the endpoint column


async def insert_row_before_endpoint_column(url: str, row_values: tuple[Any, ...], newer: int = 1) -> None:
    """A row as a gateway before migration 4 wrote it: every column but ``endpoint`` (and the
    ``newer`` - 1 columns added after it)."""
    if url.startswith("sqlite"):
        columns = ledger_sqlite_columns.ROW_COLUMNS[:-newer]
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as raw:
            raw.execute(
                f"INSERT INTO ledger ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", row_values
            )
            raw.commit()
        return
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    columns = ledger_postgres_columns.ROW_COLUMNS[:-newer]
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": f'"{schema}"'})
    try:
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await conn.execute(f"INSERT INTO ledger ({', '.join(columns)}) VALUES ({marks})", *row_values)
    finally:
        await conn.close()


async def test_rows_from_before_the_endpoint_column_read_as_chat_completions(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = ledger_url.startswith("sqlite")
    schema = storage_sqlite if sqlite else storage_postgres
    columns = ledger_sqlite_columns if sqlite else ledger_postgres_columns
    with monkeypatch.context() as patch:  # a gateway of the release before: three migrations
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:OLD_MIGRATIONS])
        old = ledger_from_url(ledger_url)
        await old.open()
        assert await old.applied_migrations() == [1, 2, 3]
        await old.close()
    await insert_row_before_endpoint_column(ledger_url, columns.encode_row(make_row(1))[:-2], newer=2)

    ledger = ledger_from_url(ledger_url)
    await ledger.open()
    try:
        assert await ledger.applied_migrations() == [1, 2, 3, 4, 5]
        stored = await ledger.get("req-00001")
        assert stored is not None and stored.endpoint == "chat/completions"
        ledger.record(make_row(2, endpoint="responses"))
        ledger.record(make_row(3, endpoint="messages"))
        ledger.record(make_row(4, endpoint="responses"))
        await ledger.flush()
        by_endpoint = await ledger.spend(group_by=["endpoint"])
        assert [(r["endpoint"], r["requests"]) for r in by_endpoint] == [
            ("chat/completions", 1),
            ("messages", 1),
            ("responses", 2),
        ]
        got = await ledger.get("req-00002")
        assert got is not None and got.endpoint == "responses"
    finally:
        await ledger.close()


async def test_a_crashed_request_keeps_its_endpoint_in_the_estimated_row(ledger_url: str) -> None:
    crashed = ledger_from_url(ledger_url)
    await crashed.open()
    crashed.reservation_opened(make_res(7, endpoint="responses"))
    crashed.reservation_opened(make_res(8, endpoint="messages"))
    await crashed.flush()
    assert {r.endpoint for r in await crashed.open_reservations()} == {"responses", "messages"}
    await crashed.close()  # stands for the dead process: the reservations stay open in the database

    restarted = ledger_from_url(ledger_url)
    await restarted.open()
    try:
        rows = await restarted.reconcile_open_reservations()
        assert {(r.request_id, r.endpoint, r.outcome) for r in rows} == {
            ("req-00007", "responses", "interrupted"),
            ("req-00008", "messages", "interrupted"),
        }
        stored = await restarted.get("req-00007")
        assert stored is not None and stored.endpoint == "responses" and stored.estimated
        spend = await restarted.spend(group_by=["endpoint"])
        assert [r["endpoint"] for r in spend] == ["messages", "responses"]
    finally:
        await restarted.close()


async def test_rows_from_before_the_upstream_key_column_have_none_and_group_with_new_ones(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = ledger_url.startswith("sqlite")
    schema = storage_sqlite if sqlite else storage_postgres
    columns = ledger_sqlite_columns if sqlite else ledger_postgres_columns
    with monkeypatch.context() as patch:  # the release before key pools: four migrations
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
        old = ledger_from_url(ledger_url)
        await old.open()
        assert await old.applied_migrations() == [1, 2, 3, 4]
        await old.close()
    await insert_row_before_endpoint_column(ledger_url, columns.encode_row(make_row(1))[:-1], newer=1)
    ledger = ledger_from_url(ledger_url)
    await ledger.open()
    try:
        assert await ledger.applied_migrations() == [1, 2, 3, 4, 5]
        stored = await ledger.get("req-00001")
        assert stored is not None and stored.upstream_key is None
        ledger.record(make_row(2, upstream_key="key-a"))
        ledger.record(make_row(3, upstream_key="key-a"))
        await ledger.flush()
        by_key = await ledger.spend(group_by=["upstream_key"])
        assert [(r["upstream_key"], r["requests"]) for r in by_key] == [("key-a", 2), (None, 1)]
    finally:
        await ledger.close()
