"""Spend reports: exact exports, a readable table, totals everywhere, and precise parse errors."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import orjson
import pytest
from rich.console import Console

from gateway.metering.ledger_factory import ledger_from_url
from gateway.metering.report import parse_group_by, parse_time, render_table, to_csv, to_json, totals
from tests.unit.test_ledger import make_row


def spend_row(tenant: str, app: str | None, requests: int, cost: str, savings: str, **counts: int) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "app": app,
        "requests": requests,
        "prompt_tokens": counts.get("prompt", 0),
        "cached_tokens": counts.get("cached", 0),
        "completion_tokens": counts.get("completion", 0),
        "reasoning_tokens": counts.get("reasoning", 0),
        "cost_usd": Decimal(cost),
        "cache_savings_usd": Decimal(savings),
        "estimated_requests": counts.get("estimated", 0),
    }


ROWS = [
    spend_row("acme", None, 3, "1.0E-8", "0.000123456", prompt=1200, cached=10, completion=5, reasoning=2, estimated=1),
    spend_row("zeta", "checkout", 1, "12.5", "0", prompt=1_234_567),
]


def test_totals_are_exact() -> None:
    t = totals(ROWS)
    assert t["requests"] == 4 and t["prompt_tokens"] == 1_235_767 and t["estimated_requests"] == 1
    assert t["cost_usd"] == Decimal("12.50000001") and t["cache_savings_usd"] == Decimal("0.000123456")


def test_csv_has_full_precision_money_and_a_totals_line() -> None:
    assert to_csv(ROWS) == (
        "tenant,app,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,"
        "cost_usd,cache_savings_usd,estimated_requests\n"
        "acme,,3,1200,10,5,2,0.000000010,0.000123456,1\n"
        "zeta,checkout,1,1234567,0,0,0,12.500000000,0.000000000,0\n"
        "TOTAL,,4,1235767,10,5,2,12.500000010,0.000123456,1\n"
    )


def test_csv_quotes_awkward_group_values() -> None:
    rows = [spend_row('a,"b"', "x\ny", 1, "0.1", "0")]
    parsed = list(csv.reader(io.StringIO(to_csv(rows))))
    assert parsed[1][:2] == ['a,"b"', "x\ny"]


def test_empty_and_ungrouped_csv_reports() -> None:
    assert to_csv([], ["tenant", "day"]).splitlines()[1:] == ["TOTAL,,0,0,0,0,0,0.000000000,0.000000000,0"]
    assert to_csv([]).splitlines() == [
        "total,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,cost_usd,"
        "cache_savings_usd,estimated_requests",
        "TOTAL,0,0,0,0,0,0.000000000,0.000000000,0",
    ]
    ungrouped = [{k: v for k, v in ROWS[1].items() if k not in ("tenant", "app")}]
    assert to_csv(ungrouped).splitlines()[1:] == [
        ",1,1234567,0,0,0,12.500000000,0.000000000,0",
        "TOTAL,1,1234567,0,0,0,12.500000000,0.000000000,0",
    ]


def test_json_keeps_money_as_strings_and_marks_the_total() -> None:
    out = to_json(ROWS)
    assert out[0] == {
        "tenant": "acme",
        "app": None,
        "requests": 3,
        "prompt_tokens": 1200,
        "cached_tokens": 10,
        "completion_tokens": 5,
        "reasoning_tokens": 2,
        "cost_usd": "0.000000010",
        "cache_savings_usd": "0.000123456",
        "estimated_requests": 1,
        "total": False,
    }
    assert [r["total"] for r in out] == [False, False, True]
    assert out[-1]["tenant"] is None and out[-1]["cost_usd"] == "12.500000010"
    assert orjson.loads(orjson.dumps(out)) == out  # plain JSON types only
    assert to_json([], ["model"]) == [
        {
            "model": None,
            "requests": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "completion_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": "0.000000000",
            "cache_savings_usd": "0.000000000",
            "estimated_requests": 0,
            "total": True,
        }
    ]


def render(table: Any) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(table)
    return console.export_text()


def cells(lines: list[str], first: str) -> list[str]:
    line = next(line for line in lines if line.startswith(f"│ {first} "))
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_table_shows_groups_savings_and_totals() -> None:
    text = render(render_table(ROWS, title="Spend, November"))
    lines = text.splitlines()
    assert "Spend, November" in lines[0]
    header = next(line for line in lines if "tenant" in line)
    for column in ("app", "requests", "prompt", "cached", "completion", "reasoning", "cost (USD)"):
        assert column in header
    assert "cache savings (USD)" in header and "estimated" in header
    assert cells(lines, "acme") == ["acme", "(none)", "3", "1,200", "10", "5", "2", "0.000000", "0.000123", "1"]
    assert cells(lines, "TOTAL") == ["TOTAL", "", "4", "1,235,767", "10", "5", "2", "12.500000", "0.000123", "1"]
    assert "TOTAL" in render(render_table([], ["tenant"]))
    assert "12.50000001" in render(render_table(ROWS, places=8))


async def test_reports_from_a_real_ledger_add_up() -> None:
    async with ledger_from_url("sqlite:///:memory:") as ledger:
        for i in range(30):
            ledger.record(make_row(i, tenant=["acme", "zeta"][i % 2], virtual_model=["k2", "k2-fast"][i % 3 % 2]))
        await ledger.flush()
        rows = await ledger.spend(group_by=["tenant", "model"])
    lines = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert lines[-1]["tenant"] == "TOTAL"
    assert sum(Decimal(r["cost_usd"]) for r in lines[:-1]) == Decimal(lines[-1]["cost_usd"])
    assert Decimal(lines[-1]["cost_usd"]) == sum((make_row(i).cost_usd for i in range(30)), Decimal(0))
    assert to_json(rows)[-1]["requests"] == 30


# --------------------------------------------------------------------------------------------------
# Parsing what people type


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tenant,model", ["tenant", "model"]),
        (" month , tenant , app ", ["month", "tenant", "app"]),
        ("key", ["key"]),
        ("", []),
        ("   ", []),
    ],
)
def test_parse_group_by(text: str, expected: list[str]) -> None:
    assert parse_group_by(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenant,,model", r"item 2 is empty"),
        ("tenant,", r"item 2 is empty"),
        ("tenant,modle", r"item 2 'modle' is not a group; did you mean 'model'\? \(choose from tenant, app, key,"),
        ("Tenant", r"did you mean 'tenant'"),
        ("key_id", r"'key_id' is not a group"),
        ("bogus", r"'bogus' is not a group \(choose from"),
        ("day,month,day", r"'day' is listed twice"),
    ],
)
def test_parse_group_by_errors_are_precise(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_group_by(text)


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", at(2026, 11, 1)),
        ("2026-11", at(2026, 11, 1)),
        ("2026-11-01T12:30:00Z", at(2026, 11, 1, 12, 30)),
        ("2026-11-01T12:30:00", at(2026, 11, 1, 12, 30)),  # no offset: UTC
        ("2026-11-01 12:30:00+02:00", at(2026, 11, 1, 10, 30)),
        ("2026-11-01T12:30:00.250Z", at(2026, 11, 1, 12, 30) + 0.25),
        ("1793491200", 1793491200.0),
        (" 1793491200.5 ", 1793491200.5),
        ("0", 0.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"empty time; expected YYYY-MM-DD"),
        ("yesterday", r"cannot read time 'yesterday'; expected YYYY-MM-DD, YYYY-MM, an ISO 8601 datetime"),
        ("2026-02-30", r"cannot read time '2026-02-30': day is out of range for month"),
        ("2026-13", r"month 13 is not in 1\.\.12"),
        ("2026-11-01T25:00", r"cannot read time '2026-11-01T25:00': hour must be in 0\.\.23"),
        ("1793491200000", r"too large for unix seconds \(milliseconds\? divide by 1000\)"),
        ("11/01/2026", r"cannot read time '11/01/2026'"),
    ],
)
def test_parse_time_errors_are_precise(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time(text)
