"""One database URL syntax for the ledger and the capture store beside it: they read the same
configured URL, so they must open the same file or schema and refuse the same mistakes."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.capture.factory import capture_store_from_url
from gateway.dburl import PostgresURL, SqliteURL, parse_database_url
from gateway.metering.ledger_factory import ledger_from_url


def place(store: Any) -> tuple[str, ...]:
    """Where a store would connect: its SQLite path, or its DSN and schema."""
    return (store.path,) if hasattr(store, "path") else (store.dsn, str(store.schema))


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///data/ledger.db",
        "sqlite:////var/lib/kimi/ledger.db",
        "sqlite:///:memory:",
        "sqlite:///data/ledger.db?mode=ro",
        "postgres://gw:secret@db:5433/spend?schema=ledger&sslmode=disable",
        "postgresql://gw:p%23ss@db/spend",
    ],
)
def test_the_ledger_and_capture_open_the_same_place(url: str) -> None:
    assert place(ledger_from_url(url)) == place(capture_store_from_url(url))


def test_urls_parse_to_a_path_or_a_dsn_and_schema() -> None:
    assert parse_database_url("sqlite:///a/b.db?x=1") == SqliteURL("a/b.db")
    assert parse_database_url("SQLite:////abs.db") == SqliteURL("/abs.db")
    assert parse_database_url("postgres://u@h:1/db?schema=s&sslmode=require") == PostgresURL(
        "postgresql://u@h:1/db?sslmode=require", "s"
    )
    assert parse_database_url("postgresql://h/db") == PostgresURL("postgresql://h/db", None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # capture used to open "edger.db" here, beside a ledger that refused the URL
        ("sqlite://ledger.db", "sqlite:///relative.db"),
        ("sqlite:///", "sqlite:///relative.db"),
        ("ledger.db", "needs a scheme"),
        ("mysql://h/db", "unknown scheme 'mysql'"),
        # an unescaped '#' (in a password, say) cuts the URL short: the ledger used to keep the
        # fragment in its DSN and capture to drop it; both refuse it now
        ("postgresql://gw:pa#ss@db/spend", "must be percent-encoded as %23"),
        ("postgresql://db/spend#", "must be percent-encoded as %23"),
        ("postgresql://h/db?schema=x;drop", "plain identifier"),
    ],
)
def test_the_ledger_and_capture_refuse_the_same_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ledger_from_url(url)
    with pytest.raises(ValueError, match=message):
        capture_store_from_url(url)


def test_a_refused_fragment_does_not_echo_the_password() -> None:
    with pytest.raises(ValueError) as refused:
        parse_database_url("postgresql://gw:pa#ss@db/spend", label="ledger URL")
    assert "pa#ss" not in str(refused.value) and str(refused.value).startswith("ledger URL:")
