"""Settle a request: true cost from usage (or an estimate), ledger row, metrics, budget release.

The request path fills a :class:`Metered` as it goes and calls :meth:`Meter.settle` exactly once on
every path out (success, upstream error, timeout, client cancel). Settling never awaits I/O: the
ledger row is queued for the batch writer, the budget counter is adjusted in the state backend.

With a :class:`~gateway.metering.journal.Journal` the meter also writes the request's crash record:
:meth:`Meter.started` before each upstream call, :meth:`Meter.progress` as a stream relays, and the
exact row through :meth:`Meter.seal` before the answer's last byte (the relays call it) or in
:meth:`Meter.settle` for requests that end otherwise. The row sealed is the row the ledger stores.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.errors import GatewayError
from gateway.metering.budget import Budgets, Reservation
from gateway.metering.journal import Journal
from gateway.metering.journal_records import Started
from gateway.metering.ledger import Ledger
from gateway.metering.ledger_rows import LedgerRow, OpenReservation
from gateway.metering.money import from_nanos
from gateway.metering.prices import Cost, Price, PriceBook, cost_of
from gateway.metering.stream import StreamTap
from gateway.metering.tokens import count_prompt
from gateway.observability import BUDGET_REMAINING, UNKNOWN, log, series
from gateway.policy.store import Tenant
from gateway.upstreams.usage import Usage

ZERO = Decimal(0)
GAUGE_EVERY_S = 1.0  # the remaining-budget gauge is refreshed this often per tenant, not per request


@dataclass(slots=True)
class Metered:
    """What settlement needs to know about one request."""

    request_id: str
    ts: float
    tenant: Tenant
    key_id: str
    virtual_model: str
    stream: bool
    body: dict[str, Any]
    app: str | None = None
    user: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # the wire format the client spoke: chat/completions, messages (Anthropic) or responses
    endpoint: str = "chat/completions"
    upstream: str | None = None
    upstream_model: str | None = None
    label: str | None = None
    upstream_key: str | None = None  # the label of the pool key the answer came over
    price: Price | None = None
    reservation: Reservation | None = None
    usage: Usage | None = None
    tap: StreamTap | None = None
    tool_calls: dict[str, int] = field(default_factory=dict)
    status: int = 0
    outcome: str = "ok"
    reached_upstream: bool = False
    estimate_reason: str | None = None
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    route_reason: str = ""
    cost: Cost | None = None
    settled: bool = False
    row: LedgerRow | None = None  # sealed before the answer's last byte; the one row the ledger stores


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": no answer could be sent


class Meter:
    def __init__(
        self, prices: PriceBook, budgets: Budgets, ledger: Ledger | None, journal: Journal | None = None
    ) -> None:
        self.prices = prices
        self.budgets = budgets
        self.ledger = ledger
        self.journal = journal
        self._gauge_due: set[str] = set()
        self._gauge_tasks: set[asyncio.Task[None]] = set()

    def price(self, label: str, when: float) -> Price | None:
        return self.prices.at(label, when)

    def opened(self, m: Metered, prompt_bound: int) -> None:
        """Record an open reservation so a crash before settlement is reconciled at start-up.

        Called again after a failover, the row (keyed by request id) is replaced by the one now held;
        with no reservation (an unpriced candidate) it holds nothing."""
        if self.ledger is None:
            return
        held = m.reservation
        self.ledger.reservation_opened(
            OpenReservation(
                request_id=m.request_id,
                ts=m.ts,
                tenant=m.tenant.name,
                key_id=m.key_id,
                app=m.app,
                virtual_model=m.virtual_model,
                upstream=m.upstream,
                upstream_model=m.upstream_model,
                amount_usd=from_nanos(held.amount) if held is not None else ZERO,
                prompt_tokens_estimate=prompt_bound,
                windows=[line.limit.key for line in held.lines] if held is not None else [],
                endpoint=m.endpoint,
            )
        )

    def started(self, m: Metered, prompt_bytes: int) -> None:
        """The journal's start line: the request is about to go to ``m.upstream`` (the last start
        of a request wins, so a failover names the candidate that was actually called)."""
        if self.journal is None:
            return
        self.journal.started(
            Started(
                m.request_id, m.ts, m.tenant.name, m.key_id, m.app, m.user, m.tags, m.virtual_model, m.upstream,
                m.upstream_model, m.label, m.stream, prompt_bytes, m.endpoint, m.route_reason,
            )
        )  # fmt: skip

    def progress(self, m: Metered, events: int) -> None:
        """``events`` SSE events of ``m``'s stream are about to have reached the client."""
        if self.journal is not None:
            self.journal.progress(m.request_id, events)

    def seal(self, m: Metered) -> LedgerRow:
        """The request's final row, written to the journal now: call once its cost is computed and
        before the last byte of the answer goes out. :meth:`settle` stores this same row."""
        if m.row is None:
            cost = m.cost or Cost(ZERO, ZERO, "")
            usage = m.usage or Usage()
            # positional: a 29-field row built by keyword costs twice as much, once per request
            m.row = LedgerRow(
                m.request_id, m.ts, m.tenant.name, m.key_id, m.app, m.user, m.tags, m.virtual_model, m.upstream,
                m.upstream_model, m.stream, usage.prompt_tokens, usage.cached_tokens,
                usage.completion_tokens, usage.reasoning_tokens, sum(m.tool_calls.values()) if m.tool_calls else 0,
                cost.usd, cost.cache_savings, cost.price_version or None, m.ttft_ms, m.latency_ms, m.status,
                m.outcome, m.estimate_reason is not None, m.estimate_reason, m.route_reason, cost.nanos,
                cost.savings_nanos, m.endpoint, m.upstream_key,
            )  # fmt: skip
            if self.journal is not None:
                self.journal.finished(m.row)
        return m.row

    def client_closed(self, request_id: str, tenant: Tenant, key_id: str, endpoint: str, latency_ms: float) -> None:
        """The row of a request whose client closed the connection before its body was in: nothing
        was parsed or sent upstream, so it costs nothing, but finance sees that it happened."""
        m = Metered(request_id, time.time(), tenant, key_id, UNKNOWN, False, {}, endpoint=endpoint)
        m.status, m.outcome, m.latency_ms = CLIENT_CLOSED_STATUS, "client_closed", latency_ms
        m.route_reason = "the client closed the connection before its request body was in"
        m.settled = True
        self._store(self.seal(m))

    def _store(self, row: LedgerRow) -> None:
        if self.ledger is not None:
            self.ledger.record(row)
        if self.journal is not None:
            self.journal.recorded(row.request_id)

    async def compute(self, m: Metered) -> Cost:
        """Usage (reported, else estimated when the upstream may have billed) and its exact cost.

        Estimates tokenize the whole conversation, so they run in a thread, off the event loop.
        """
        if m.usage is None and m.reached_upstream and m.estimate_reason is not None:
            m.usage = await asyncio.to_thread(_estimate, m)
        elif m.usage is None:
            m.estimate_reason = None
        usage = m.usage or Usage()
        if m.price is None:
            m.cost = Cost(ZERO, ZERO, "")
        else:
            m.cost = cost_of(m.price, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, m.tool_calls)
        return m.cost

    async def settle(self, m: Metered) -> None:
        if m.settled:
            return
        m.settled = True
        cost = m.cost or await self.compute(m)
        if m.reservation is not None:  # most requests hold nothing
            try:
                await self.budgets.settle(m.reservation, cost.usd)
            except Exception:  # the row below is what finance reads: it is written whatever the state does
                log.exception("request %s: settling its budget reservation failed", m.request_id)
        usage = m.usage or Usage()
        tenant, model, upstream = m.tenant.name, m.virtual_model, m.label or UNKNOWN
        s = series(tenant, model, upstream, m.stream)
        if usage.prompt_tokens:
            s.prompt.inc(usage.prompt_tokens)
        if usage.cached_tokens:
            s.cached.inc(usage.cached_tokens)
        if usage.completion_tokens:
            s.completion.inc(usage.completion_tokens)
        if usage.reasoning_tokens:
            s.reasoning.inc(usage.reasoning_tokens)
        if cost.nanos:
            s.spend.inc(cost.nanos / 1e9)  # the same float as float(cost.usd), without the Decimal
        if cost.savings_nanos:
            s.savings.inc(cost.savings_nanos / 1e9)
        if m.tenant.budget is not None:
            self._remaining_soon(m)
        if self.ledger is not None or self.journal is not None:
            self._store(self.seal(m))

    def _remaining_soon(self, m: Metered) -> None:
        """Refresh the gauge within a second, once per tenant however many requests settle meanwhile:
        reading every budget line per request would double the state round trips with Redis."""
        name = m.tenant.name
        if name in self._gauge_due:
            return
        self._gauge_due.add(name)

        async def later() -> None:
            await asyncio.sleep(GAUGE_EVERY_S)
            self._gauge_due.discard(name)
            await self._update_remaining(m)

        task = asyncio.get_running_loop().create_task(later())
        self._gauge_tasks.add(task)
        task.add_done_callback(self._gauge_tasks.discard)

    async def _update_remaining(self, m: Metered) -> None:
        try:
            for row in await self.budgets.remaining(m.tenant.name, m.tenant.budget, time.time()):
                if row["scope"] == "tenant":
                    BUDGET_REMAINING.labels(m.tenant.name, str(row["window"])).set(float(str(row["remaining_usd"])))
        except GatewayError:  # the state store is down and budgets fail closed: try again next time
            return
        except Exception:  # a gauge must never fail a request
            log.exception("budget gauge update failed")


def _estimate(m: Metered) -> Usage:
    prompt = count_prompt(m.body)
    completion = m.tap.estimate_completion_tokens() if m.tap is not None else 0
    return Usage(prompt, completion, 0, 0)
