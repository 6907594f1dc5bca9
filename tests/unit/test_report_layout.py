"""The spend report in a terminal: the full table when it fits, a narrower layout when it does not
(80 columns is the common case), and never a cut-off amount of money."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from gateway.metering.money import fmt_usd
from gateway.metering.report import render_report, totals


def row(model: str, requests: int, cost: str, saved: str, scale: int = 1, **groups: Any) -> dict[str, Any]:
    return {
        "tenant": "demo",
        "model": model,
        **groups,
        "requests": requests,
        "prompt_tokens": 1652 * scale,
        "cached_tokens": 800 * scale,
        "completion_tokens": 346 * scale,
        "reasoning_tokens": 240 * scale,
        "cost_usd": Decimal(cost),
        "cache_savings_usd": Decimal(saved),
        "estimated_requests": 3 if scale > 1 else 0,
    }


DEMO = [row("kimi-k2-thinking", 2, "0.001803", "0.000614"), row("kimi-k2-thinking-turbo", 12, "0.010500", "0.0021")]
BIG = [row("kimi-k2-thinking-turbo", 12_345, "12345.678901234", "1360.5", scale=10_000)]


def printed(rows: list[dict[str, Any]], width: int, groups: list[str] | None = None) -> tuple[Any, list[str]]:
    console = Console(width=width, record=True, color_system=None)
    layout = render_report(rows, groups or ["tenant", "model"], console=console, title="kimi-gateway spend")
    console.print(layout)
    return layout, console.export_text().splitlines()


def amounts(rows: list[dict[str, Any]]) -> list[str]:
    every = [*rows, totals(rows)]
    return [fmt_usd(r[m]) for r in every for m in ("cost_usd", "cache_savings_usd")]


def test_a_wide_terminal_gets_the_full_table() -> None:
    layout, lines = printed(DEMO, 200)
    assert isinstance(layout, Table) and len(layout.columns) == 10
    assert "cache savings (USD)" in lines[2] and "reasoning" in lines[2]


def test_eighty_columns_get_the_narrow_table_with_every_figure() -> None:
    layout, lines = printed(DEMO, 80)
    assert isinstance(layout, Table) and [c.header for c in layout.columns] == [
        "tenant / model",
        "requests",
        "tokens",
        "cost (USD)",
        "saved (USD)",
    ]
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80, text
    for amount in amounts(DEMO):
        assert amount in text, (amount, text)
    for figure in ("3,304 in", "1,600 cached", "692 out", "480 reasoning"):  # the TOTAL's tokens
        assert figure in text, text
    assert "kimi-k2-thinking-turbo" in text  # a group name wraps between names, never inside one


def test_figures_too_wide_for_a_table_fall_back_to_one_block_per_group() -> None:
    layout, lines = printed(BIG, 80)
    assert not isinstance(layout, Table)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80, text
    assert "cost $12345.678901" in text and "saved $1360.500000" in text
    assert "16,520,000 prompt, 8,000,000 cached" in text and "3 estimated" in text


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(min_value=40, max_value=160),
    cost=st.decimals(min_value=0, max_value=Decimal("99999999.999999999"), places=9),
    scale=st.integers(min_value=1, max_value=100_000),
    upstream=st.sampled_from(["vllm-sim", "moonshot-turbo-sim/kimi-k2-thinking-turbo"]),
)
def test_money_is_never_cut_whatever_the_width(width: int, cost: Decimal, scale: int, upstream: str) -> None:
    rows = [row("kimi-k2-thinking", 5, str(cost), str(cost / 4), scale=scale, upstream=upstream)]
    _, lines = printed(rows, width, ["tenant", "model", "upstream"])
    text = "\n".join(lines)
    assert max(map(len, lines)) <= width, text
    for amount in amounts(rows):
        assert amount in text, (amount, text)


@pytest.mark.parametrize("width", [80, 200])
def test_an_empty_report_still_prints_its_totals(width: int) -> None:
    _, lines = printed([], width)
    assert any("TOTAL" in line for line in lines) and any("0.000000" in line for line in lines)
