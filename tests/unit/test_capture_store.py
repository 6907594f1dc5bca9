"""Capture rows beside the ledger, on SQLite and PostgreSQL: stored, read back, redacted, expired by
retention."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Any

import asyncpg
import pytest

from gateway.capture.factory import capture_store_from_url
from gateway.capture.record import capture_redactor, redacted
from gateway.capture.store import DAY_S, CaptureRow
from gateway.metering import ledger_postgres_columns, ledger_sqlite_columns
from gateway.metering.ledger_factory import ledger_from_url
from gateway.policy.model import Redaction
from gateway.storage import postgres as storage_postgres
from gateway.storage import sqlite as storage_sqlite
from tests.unit.conftest import PG_URL
from tests.unit.test_ledger import make_row
from tests.unit.test_ledger_endpoint import insert_row_before_endpoint_column


@pytest.fixture
def capture_url(ledger_url: str) -> str:
    """Capture rows live in the ledger's database: the same SQLite file or PostgreSQL schema."""
    return ledger_url


def row(request_id: str, ts: float, retention_days: int, record: dict[str, object]) -> CaptureRow:
    return CaptureRow(request_id, ts, ts + retention_days * DAY_S, "acme", "full", record)


async def test_capture_rows_round_trip_and_expire_by_retention(capture_url: str) -> None:
    store = capture_store_from_url(capture_url, max_delay=0.01)
    await store.open()
    try:
        now = time.time()
        store.record(row("req-old", now - 10 * DAY_S, 7, {"note": "expired three days ago"}))
        store.record(row("req-new", now, 7, {"note": "fresh", "nested": {"n": 1}}))
        await store.flush()
        assert (await store.get("req-new")).record == {"note": "fresh", "nested": {"n": 1}}  # type: ignore[union-attr]
        assert await store.get("req-old") is not None
        assert await store.purge(now) == 1
        assert await store.get("req-old") is None
        assert await store.get("req-new") is not None
        # eight days on, the fresh row is past its 7 days as well
        assert await store.purge(now + 8 * DAY_S) == 1
        assert await store.get("req-new") is None
    finally:
        await store.close()


async def test_capture_store_deletes_expired_rows_when_it_opens(capture_url: str) -> None:
    first = capture_store_from_url(capture_url, max_delay=0.01)
    await first.open()
    first.record(row("req-expired", time.time() - 3 * DAY_S, 1, {}))
    await first.flush()
    await first.close()
    second = capture_store_from_url(capture_url)
    await second.open()
    try:
        assert await second.get("req-expired") is None
    finally:
        await second.close()


def test_capture_redaction_always_removes_keys_even_when_the_tenant_lists_other_detectors() -> None:
    r = capture_redactor(Redaction(detectors=["email"]))
    doc = {
        "messages": [
            {"role": "user", "content": "my key is sk-abcdefghijklmnopqrstuv and mail a@example.com"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "f:0", "function": {"name": "f", "arguments": '{"t": "Bearer abcdefghijklmnopqrstu"}'}}
                ],
            },
        ]
    }
    out = redacted(doc, r)
    text = str(out)
    assert "sk-abc" not in text and "a@example.com" not in text and "Bearer abc" not in text
    assert out["messages"][1]["tool_calls"][0]["id"] == "f:0"  # ids are not free text


# -- the capture table is a ledger migration


def _schema_module(url: str) -> Any:
    """Where the dialect's migrations are listed."""
    return storage_sqlite if url.startswith("sqlite") else storage_postgres


def _columns_module(url: str) -> Any:
    """Where the dialect's ledger encoders are."""
    return ledger_sqlite_columns if url.startswith("sqlite") else ledger_postgres_columns


async def _tables(url: str) -> set[str]:
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as raw:
            return {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    schema = url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(PG_URL)
    try:
        found = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
    finally:
        await conn.close()
    return {r["table_name"] for r in found}


async def _previous_release_ledger(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger database as the release before the capture migration left it: migration 1 only,
    with one row written in that release's columns (no ``endpoint`` nor ``upstream_key``, which
    migrations 4 and 5 add)."""
    schema = _schema_module(url)
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    old = ledger_from_url(url)
    await old.open()
    await old.close()
    monkeypatch.undo()
    await insert_row_before_endpoint_column(url, _columns_module(url).encode_row(make_row(1))[:-2], newer=2)


async def test_an_existing_ledger_database_gains_the_capture_table_on_upgrade(
    capture_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _previous_release_ledger(capture_url, monkeypatch)
    assert "capture" not in await _tables(capture_url)
    upgraded = ledger_from_url(capture_url)
    await upgraded.open()
    try:
        assert await upgraded.applied_migrations() == [1, 2, 3, 4, 5]
        assert await upgraded.get("req-00001") == make_row(1)  # the ledger's rows are untouched
    finally:
        await upgraded.close()
    assert "capture" in await _tables(capture_url)
    store = capture_store_from_url(capture_url, max_delay=0.01)
    await store.open()
    try:
        store.record(row("req-after-upgrade", time.time(), 7, {"ok": True}))
        await store.flush()
        assert (await store.get("req-after-upgrade")).record == {"ok": True}  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_capture_table_made_before_the_migration_existed_is_kept_with_its_rows(
    capture_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gateways before migration 2 created the table themselves at start-up, with the same DDL."""
    await _previous_release_ledger(capture_url, monkeypatch)
    statements = _schema_module(capture_url).MIGRATIONS[1].statements
    values = ("req-before-upgrade", time.time(), time.time() + DAY_S, "acme", "full", '{"kept": true}')
    if capture_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(capture_url.removeprefix("sqlite:///"))) as raw:
            for statement in statements:
                raw.execute(statement)
            raw.execute("INSERT INTO capture VALUES (?, ?, ?, ?, ?, ?)", values)
            raw.commit()
    else:
        schema = capture_url.rsplit("schema=", 1)[1]
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        try:
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO capture VALUES ($1, $2, $3, $4, $5, $6::jsonb)", *values)
        finally:
            await conn.close()
    upgraded = capture_store_from_url(capture_url)
    await upgraded.open()  # runs migration 2 over the existing table
    try:
        assert (await upgraded.get("req-before-upgrade")).record == {"kept": True}  # type: ignore[union-attr]
    finally:
        await upgraded.close()
    ledger = ledger_from_url(capture_url)
    await ledger.open()
    try:
        assert await ledger.applied_migrations() == [1, 2, 3, 4, 5]
    finally:
        await ledger.close()
