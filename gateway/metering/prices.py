"""Prices per ``upstream/model``, with history, and the cost of a request.

Money is Decimal end to end. A price entry is in force from its ``effective_from`` date (UTC) until
the next entry for the same target; a request is priced by the entry in force at its time and its
ledger row records which entry (``price_version``), so a price change never rewrites history.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.metering.money import NANO, from_nanos, to_nanos, whole_units
from gateway.yamlfile import ConfigError, load_model

MILLION = Decimal(1_000_000)
NO_SAVINGS = Decimal(0).quantize(NANO)
FEMTO_PER_USD = 10**15
FEMTO_PER_NANO = 10**6
Money = Annotated[Decimal, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuCost(_Strict):
    """A self-hosted deployment priced as GPU cost per hour over measured throughput (an estimate)."""

    usd_per_hour: Money
    tokens_per_s: Annotated[float, Field(gt=0)]
    cached_factor: Annotated[Decimal, Field(ge=0, le=1)] = Decimal("0.1")


class PriceEntry(_Strict):
    target: str
    effective_from: dt.date
    input_miss: Money | None = None
    input_hit: Money | None = None
    output: Money | None = None
    gpu: GpuCost | None = None
    tool_fees: dict[str, Money] = Field(default_factory=dict)
    verify: bool = False
    note: str = ""

    @model_validator(mode="after")
    def _one_form(self) -> PriceEntry:
        per_token = (self.input_miss, self.input_hit, self.output)
        if self.gpu is not None:
            if any(p is not None for p in per_token):
                raise ValueError("give either gpu or input_miss/input_hit/output, not both")
        elif any(p is None for p in per_token):
            raise ValueError("needs input_miss, input_hit and output (USD per 1M tokens), or gpu")
        if "/" not in self.target:
            raise ValueError(f"target {self.target!r} must look like 'upstream/model'")
        return self


class PriceFile(_Strict):
    currency: str = "USD"
    prices: list[PriceEntry]

    @model_validator(mode="after")
    def _usd(self) -> PriceFile:
        if self.currency != "USD":
            raise ValueError(f"only USD is supported, got {self.currency!r}")
        return self


@dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices (USD) in force for one target from ``since``."""

    target: str
    since: float
    version: str
    miss: Decimal
    hit: Decimal
    out: Decimal
    tool_fees: dict[str, Decimal] = field(default_factory=dict)
    estimate: bool = False
    # The same prices in whole femtodollars (1e-15 USD) per token or call, when they are whole there
    # (any list price with up to nine decimals per 1M tokens): cost_of then adds integers, exact
    # and a fraction of Decimal arithmetic's cost. None for an amortized GPU price's long fraction.
    femto: tuple[int, int, int, dict[str, int]] | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        parts = [whole_units(p, FEMTO_PER_USD) for p in (self.miss, self.hit, self.out)]
        fees = {name: whole_units(fee, FEMTO_PER_USD) for name, fee in self.tool_fees.items()}
        exact = all(p is not None for p in parts) and all(f is not None for f in fees.values())
        femto = (parts[0], parts[1], parts[2], fees) if exact else None
        object.__setattr__(self, "femto", femto)

    @classmethod
    def from_entry(cls, entry: PriceEntry) -> Price:
        since = dt.datetime.combine(entry.effective_from, dt.time(), tzinfo=dt.UTC).timestamp()
        version = f"{entry.target}@{entry.effective_from.isoformat()}"
        if entry.gpu is not None:
            per_token = entry.gpu.usd_per_hour / (Decimal(str(entry.gpu.tokens_per_s)) * 3600)
            return cls(
                entry.target,
                since,
                version,
                per_token,
                per_token * entry.gpu.cached_factor,
                per_token,
                dict(entry.tool_fees),
                estimate=True,
            )
        assert entry.input_miss is not None and entry.input_hit is not None and entry.output is not None
        return cls(
            entry.target,
            since,
            version,
            entry.input_miss / MILLION,
            entry.input_hit / MILLION,
            entry.output / MILLION,
            dict(entry.tool_fees),
        )


class Cost(NamedTuple):
    """What one request cost. A named tuple: one is built per request, and a frozen dataclass's
    ``__init__`` (an ``object.__setattr__`` per field) took 620 ns of it (bench/RESULTS.md, "What
    changed, and what each saved", f3a1d59)."""

    usd: Decimal
    cache_savings: Decimal
    price_version: str
    # the same two amounts in whole nanodollars, as the ledger and budget counters store them
    nanos: int = 0
    savings_nanos: int = 0


_HALF_NANO = FEMTO_PER_NANO // 2


def _femto_to_nanos(femto: int) -> int:
    """Round half-to-even to the nanodollar, as ``Decimal.quantize(NANO)`` does."""
    q, r = divmod(femto, FEMTO_PER_NANO)  # r in [0, 1e6) whatever the sign
    if r >= _HALF_NANO and (r > _HALF_NANO or q & 1):
        q += 1
    return q


class PriceBook:
    """Every target's price history, sorted by start time."""

    def __init__(self, entries: list[PriceEntry]) -> None:
        history: dict[str, list[Price]] = {}
        for entry in entries:
            history.setdefault(entry.target, []).append(Price.from_entry(entry))
        for prices in history.values():
            prices.sort(key=lambda p: p.since)
        self._history = history
        self._starts = {t: [p.since for p in ps] for t, ps in history.items()}

    def targets(self) -> set[str]:
        return set(self._history)

    def at(self, target: str, when: float) -> Price | None:
        """The price in force for ``target`` at ``when`` (unix seconds), or None."""
        starts = self._starts.get(target)
        if not starts:
            return None
        i = bisect.bisect_right(starts, when) - 1
        return self._history[target][i] if i >= 0 else None


def cost_of(
    price: Price,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    tool_calls: dict[str, int] | None = None,
) -> Cost:
    """Exact cost: uncached input at the miss price, cached at the hit price, output, tool fees."""
    prompt = prompt_tokens if prompt_tokens > 0 else 0
    cached = cached_tokens if cached_tokens > 0 else 0
    if cached > prompt:
        cached = prompt
    completion = completion_tokens if completion_tokens > 0 else 0
    if price.femto is not None:
        miss, hit, out, fees = price.femto
        femto = (prompt - cached) * miss + cached * hit + completion * out
        if tool_calls:
            for name, count in tool_calls.items():
                fee = fees.get(name)
                if fee is not None:
                    femto += fee * count
        nanos = _femto_to_nanos(femto)
        if not cached:
            return Cost(from_nanos(nanos), NO_SAVINGS, price.version, nanos, 0)
        saved = _femto_to_nanos(cached * (miss - hit))
        return Cost(from_nanos(nanos), from_nanos(saved), price.version, nanos, saved)
    return _decimal_cost(price, prompt, cached, completion, tool_calls)


def _decimal_cost(
    price: Price, prompt: int, cached: int, completion: int, tool_calls: dict[str, int] | None = None
) -> Cost:
    """:func:`cost_of` in Decimal arithmetic, for prices that are no whole number of femtodollars
    (and the reference the integer path is tested against)."""
    usd = (prompt - cached) * price.miss + completion * price.out
    savings = NO_SAVINGS
    if cached:  # (each Decimal operation skipped counts: this runs for every request)
        usd += cached * price.hit
        savings = (cached * (price.miss - price.hit)).quantize(NANO)
    if tool_calls:
        for name, count in tool_calls.items():
            fee = price.tool_fees.get(name)
            if fee is not None:
                usd += fee * count
    usd = usd.quantize(NANO)
    return Cost(usd, savings, price.version, to_nanos(usd), to_nanos(savings))


def worst_case(price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """The most a request can cost: every prompt token a cache miss, every output token used."""
    return (prompt_tokens * price.miss + max_tokens * price.out).quantize(NANO)


def load_prices(path: Path) -> PriceBook:
    doc, parsed = load_model(path, PriceFile, top="a mapping with 'prices'")
    seen: dict[tuple[str, dt.date], int] = {}
    problems = []
    for i, entry in enumerate(parsed.prices):
        key = (entry.target, entry.effective_from)
        if key in seen:
            problems.append(
                doc.problem(
                    ("prices", i),
                    f"{entry.target} already has a price from {entry.effective_from} (prices[{seen[key]}])",
                )
            )
        seen[key] = i
    if problems:
        raise ConfigError(problems)
    return PriceBook(list(parsed.prices))


def missing_prices(book: PriceBook, targets: set[str], now: float) -> list[str]:
    """Routable targets with no price in force now."""
    return sorted(t for t in targets if book.at(t, now) is None)
