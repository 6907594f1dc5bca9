"""Spend reports: pure functions over :meth:`Ledger.spend` rows, plus the parsers the CLI and the
admin API share so both refuse bad input with the same precise message.

Exports (CSV, JSON) carry money as full-precision strings (nine decimals, never a float and never an
exponent) so a spreadsheet or a finance system sums exactly what the ledger holds; the rich table is
for people and rounds to micro-dollars. Every report shows cache savings and ends with a totals row.

The table is for a terminal, often 80 columns: :func:`render_report` prints the wide table when it
fits and otherwise a narrower one (tokens stacked in one cell), then one block per group. Money
columns never shrink: a cut-off amount is worse than no report.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import io
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gateway.metering.ledger_query import GROUPS, METRICS
from gateway.metering.money import fmt_usd, quantize_usd

MONEY = ("cost_usd", "cache_savings_usd")
COUNTS = tuple(m for m in METRICS if m not in MONEY)
TOTAL_LABEL = "TOTAL"
HEADERS = {
    "requests": "requests",
    "prompt_tokens": "prompt",
    "cached_tokens": "cached",
    "completion_tokens": "completion",
    "reasoning_tokens": "reasoning",
    "cost_usd": "cost (USD)",
    "cache_savings_usd": "cache savings (USD)",
    "estimated_requests": "estimated",
}


def group_columns(rows: Sequence[dict[str, Any]], group_by: Sequence[str] | None = None) -> list[str]:
    """The group columns of a report: ``group_by`` when given (needed to label an empty report),
    otherwise the group keys of the first row, in their order."""
    if group_by is not None:
        return list(group_by)
    return [k for k in rows[0] if k in GROUPS] if rows else []


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every metric summed over ``rows`` (exact: money stays Decimal)."""
    out: dict[str, Any] = {m: 0 for m in COUNTS}
    out.update({m: Decimal(0) for m in MONEY})
    for row in rows:
        for m in METRICS:
            out[m] += row[m]
    return out


def usd_text(d: Decimal) -> str:
    """Full precision, fixed point: ``Decimal('1.0E-8')`` becomes ``'0.000000010'``."""
    return f"{quantize_usd(d):f}"


def to_json(rows: Sequence[dict[str, Any]], group_by: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """JSON-ready rows (money as strings) and a last entry with ``"total": true``; every entry has
    ``"total"`` so a consumer can tell a real ``null`` group (e.g. requests without an app) from it."""
    groups = group_columns(rows, group_by)
    out = []
    for row in [*rows, {**dict.fromkeys(groups), **totals(rows)}]:
        item: dict[str, Any] = {g: row[g] for g in groups}
        item.update({m: usd_text(row[m]) if m in MONEY else int(row[m]) for m in METRICS})
        item["total"] = False
        out.append(item)
    out[-1]["total"] = True
    return out


def to_csv(rows: Sequence[dict[str, Any]], group_by: Sequence[str] | None = None) -> str:
    """CSV with a header, one line per group and a ``TOTAL`` line (in the first group column; a
    report without groups gets a ``total`` column instead). Empty groups are empty cells."""
    groups = group_columns(rows, group_by)
    label = groups or ["total"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*label, *METRICS])
    total_row = {**totals(rows), **dict.fromkeys(groups, "")}
    total_row[label[0]] = TOTAL_LABEL
    for row in [*rows, total_row]:
        cells = ["" if row.get(g) is None else row[g] for g in label]
        writer.writerow([*cells, *(usd_text(row[m]) if m in MONEY else row[m] for m in METRICS)])
    return buf.getvalue()


def render_table(
    rows: Sequence[dict[str, Any]], group_by: Sequence[str] | None = None, *, title: str | None = None, places: int = 6
) -> Table:
    """A rich table for the CLI: money rounded to ``places`` decimals, a bold totals row."""
    groups = group_columns(rows, group_by)
    table = Table(title=title, show_footer=False)
    for g in groups:
        table.add_column(g)
    for m in METRICS:
        table.add_column(HEADERS[m], justify="right", no_wrap=m in MONEY)

    def cells(row: dict[str, Any]) -> list[str]:
        return [f"{row[m]:,}" if m in COUNTS else fmt_usd(row[m], places) for m in METRICS]

    for i, row in enumerate(rows):
        group_cells = ["(none)" if row[g] is None else str(row[g]) for g in groups]
        table.add_row(*group_cells, *cells(row), end_section=i == len(rows) - 1)
    total_cells = [TOTAL_LABEL, *[""] * (len(groups) - 1)] if groups else []
    table.add_row(*total_cells, *cells(totals(rows)), style="bold")
    return table


def _group_text(row: dict[str, Any], groups: Sequence[str]) -> str:
    return " / ".join("(none)" if row[g] is None else str(row[g]) for g in groups)


def render_narrow(
    rows: Sequence[dict[str, Any]],
    group_by: Sequence[str] | None = None,
    *,
    title: str | None = None,
    places: int = 6,
    group_width: int | None = None,
) -> Table:
    """Five columns: the groups joined, requests, the token figures stacked in one cell, cost, savings.

    ``group_width`` caps the first column (names wrap between names); by default it is as narrow as
    the longest single name."""
    groups = group_columns(rows, group_by)
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    names = [_group_text(row, groups) for row in rows]
    # wrapped between names, never inside one (unless a single name is wider than the terminal)
    longest = max((len(word) for name in names for word in name.split(" ")), default=0)
    narrowest = max(longest, len(TOTAL_LABEL))
    width = max(group_width, narrowest) if group_width is not None else narrowest
    table.add_column(" / ".join(groups) or "total", overflow="fold", min_width=narrowest, max_width=width)
    table.add_column("requests", justify="right")
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("cost (USD)", justify="right", no_wrap=True)
    table.add_column("saved (USD)", justify="right", no_wrap=True)

    def cells(row: dict[str, Any]) -> list[str]:
        requests = f"{row['requests']:,}"
        if row["estimated_requests"]:
            requests += f"\n{row['estimated_requests']:,} est."
        tokens = (
            f"{row['prompt_tokens']:,} in\n{row['cached_tokens']:,} cached\n"
            f"{row['completion_tokens']:,} out\n{row['reasoning_tokens']:,} reasoning"
        )
        return [requests, tokens, fmt_usd(row["cost_usd"], places), fmt_usd(row["cache_savings_usd"], places)]

    for row, name in zip(rows, names, strict=True):
        table.add_row(name, *cells(row), end_section=True)
    table.add_row(TOTAL_LABEL, *cells(totals(rows)), style="bold")
    return table


def render_blocks(
    rows: Sequence[dict[str, Any]], group_by: Sequence[str] | None = None, *, title: str | None = None, places: int = 6
) -> Group:
    """One block of short lines per group, for the narrowest terminals (lines wrap between figures)."""
    groups = group_columns(rows, group_by)
    parts: list[RenderableType] = [Text(title, style="bold")] if title else []
    for row, name in [*((r, _group_text(r, groups)) for r in rows), (totals(rows), TOTAL_LABEL)]:
        estimated = f", {row['estimated_requests']:,} estimated" if row["estimated_requests"] else ""
        parts.append(Text(name, style="bold", overflow="fold"))
        parts.append(Text(f"  cost ${fmt_usd(row['cost_usd'], places)}"))
        parts.append(Text(f"  saved ${fmt_usd(row['cache_savings_usd'], places)}"))
        parts.append(Text(f"  {row['requests']:,} requests{estimated}"))
        parts.append(Text(f"  {row['prompt_tokens']:,} prompt, {row['cached_tokens']:,} cached"))
        parts.append(Text(f"  {row['completion_tokens']:,} completion, {row['reasoning_tokens']:,} reasoning"))
    return Group(*parts)


def _width(console: Console, renderable: RenderableType) -> int:
    """Columns ``renderable`` needs to print without wrapping or cutting anything."""
    options = console.options.update(width=10_000, max_width=10_000)
    return console.measure(renderable, options=options).maximum


def render_report(
    rows: Sequence[dict[str, Any]],
    group_by: Sequence[str] | None = None,
    *,
    console: Console,
    title: str | None = None,
    places: int = 6,
) -> RenderableType:
    """The widest layout that fits ``console``: the full table, the narrow table, or blocks."""
    wide = render_table(rows, group_by, title=title, places=places)
    if _width(console, wide) <= console.width:
        return wide
    narrowest = render_narrow(rows, group_by, title=title, places=places)
    slack = console.width - _width(console, narrowest)
    if slack >= 0:  # the group column takes what the figures leave
        group_width = narrowest.columns[0].max_width or 0
        return render_narrow(rows, group_by, title=title, places=places, group_width=group_width + slack)
    return render_blocks(rows, group_by, title=title, places=places)


def parse_group_by(text: str) -> list[str]:
    """``"tenant,model"`` → ``["tenant", "model"]``; an empty string means no grouping (totals only).

    Refuses empty items, unknown names (suggesting the closest) and repeats, naming the item and its
    position so a typo in a long list is easy to find.
    """
    text = text.strip()
    if not text:
        return []
    out: list[str] = []
    for pos, raw in enumerate(text.split(","), start=1):
        name = raw.strip()
        if not name:
            raise ValueError(f"group_by {text!r}: item {pos} is empty (separate names with single commas)")
        if name not in GROUPS:
            hint = difflib.get_close_matches(name.lower(), GROUPS, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"group_by {text!r}: item {pos} {name!r} is not a group{did_you_mean} (choose from {', '.join(GROUPS)})"
            )
        if name in out:
            raise ValueError(f"group_by {text!r}: {name!r} is listed twice")
        out.append(name)
    return out


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH = re.compile(r"\d{4}-\d{2}")
_DATE_LIKE = re.compile(r"\d{4}-\d{2}")
MAX_UNIX_SECONDS = 1e11  # year 5138: a larger number is almost surely milliseconds


def parse_time(text: str) -> float:
    """Unix seconds from what a person types: ``2026-11-01`` (midnight UTC), ``2026-11`` (the first of
    the month, UTC), an ISO 8601 datetime (``2026-11-01T12:00:00Z``; without an offset it is taken as
    UTC) or unix seconds (``1793491200``). Errors say what was expected."""
    s = text.strip()
    expected = "expected YYYY-MM-DD, YYYY-MM, an ISO 8601 datetime such as 2026-11-01T12:00:00Z, or unix seconds"
    if not s:
        raise ValueError(f"empty time; {expected}")
    if _NUMBER.fullmatch(s):
        value = float(s)
        if abs(value) >= MAX_UNIX_SECONDS:
            raise ValueError(f"time {text!r} is too large for unix seconds (milliseconds? divide by 1000)")
        return value
    if not _DATE_LIKE.match(s):
        raise ValueError(f"cannot read time {text!r}; {expected}")
    try:
        if _MONTH.fullmatch(s):
            year, month = int(s[:4]), int(s[5:])
            if not 1 <= month <= 12:
                raise ValueError(f"month {month} is not in 1..12")
            return dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()
        if _DATE.fullmatch(s):
            return dt.datetime.combine(dt.date.fromisoformat(s), dt.time(), dt.UTC).timestamp()
        moment = dt.datetime.fromisoformat(s)
    except ValueError as exc:
        raise ValueError(f"cannot read time {text!r}: {exc}; {expected}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


__all__ = [
    "group_columns",
    "parse_group_by",
    "parse_time",
    "render_blocks",
    "render_narrow",
    "render_report",
    "render_table",
    "to_csv",
    "to_json",
    "totals",
    "usd_text",
]
