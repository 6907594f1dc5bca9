"""The clean-up steps of a request run independently: a failing one never skips the others.

The ledger row is what finance reads, so it is written even when the budget reservation cannot be
settled (a state store that is down); capture and the rate-limit correction run even when the whole
settlement raises. Each failure is logged once with the request id.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import pipeline
from gateway.metering.meter import Meter, Metered
from gateway.metering.prices import Cost
from gateway.policy.store import Tenant


class Broken(Exception):
    pass


class FailingBudgets:
    async def settle(self, reservation: Any, amount: Decimal) -> None:
        raise Broken("state store unreachable")


class Rows:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    def record(self, row: Any) -> None:
        self.rows.append(row)


def metered(request_id: str) -> Metered:
    m = Metered(request_id, 1_700_000_000.0, Tenant("t-clean", {}, Path("t.yaml")), "k1", "k2", False, {})
    m.cost = Cost(Decimal("0.001"), Decimal(0), "v1", 1_000_000, 0)
    m.reservation = object()  # type: ignore[assignment]
    m.status = 200
    return m


def test_the_ledger_row_is_written_when_the_budget_cannot_be_settled(caplog: pytest.LogCaptureFixture) -> None:
    rows = Rows()
    meter = Meter(None, FailingBudgets(), rows)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        asyncio.run(meter.settle(metered("req-budget-down")))
    assert [r.request_id for r in rows.rows] == ["req-budget-down"]
    assert rows.rows[0].cost_usd == Decimal("0.001")
    assert [r.getMessage() for r in caplog.records if "req-budget-down" in r.getMessage()] == [
        "request req-budget-down: settling its budget reservation failed"
    ]


def test_capture_and_rate_correction_run_when_settlement_raises(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    class FailingMeter:
        async def settle(self, m: Metered) -> None:
            calls.append("settle")
            raise Broken("ledger gone")

    class Limits:
        async def correct(self, admission: Any, tokens: int) -> None:
            calls.append("rate")

    class FailingKeys:
        async def release(self, lease: Any, usage: Any) -> None:
            calls.append("key")
            raise Broken("key state gone")

    monkeypatch.setattr(pipeline, "capture_exchange", lambda rt, ex: calls.append("capture"))
    m = metered("req-settle-raises")
    ex = SimpleNamespace(request_id=m.request_id, metered=m, rate=object(), key_lease=object())
    rt = SimpleNamespace(meter=FailingMeter(), limits=Limits(), router=SimpleNamespace(keys=FailingKeys()))
    with caplog.at_level(logging.ERROR):
        asyncio.run(pipeline._clean_up(rt, ex))  # type: ignore[arg-type]
    assert calls == ["key", "settle", "capture", "rate"]
    logged = [r for r in caplog.records if "req-settle-raises" in r.getMessage()]
    assert [r.getMessage() for r in logged] == [
        "request req-settle-raises: releasing the upstream key failed",
        "request req-settle-raises: settlement failed",
    ]
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], Broken) for r in logged)
    assert ex.key_lease is None  # released once, even when the release failed
