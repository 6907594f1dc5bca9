"""At budget exhaustion a cheaper candidate that still fits goes first; budget steps are read from
the real budget counters."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

from gateway.metering.budget import Budgets, lines_for
from gateway.metering.money import to_nanos
from gateway.policy.model import Budget, BudgetStep
from gateway.policy.store import Tenant
from gateway.routing.budget_fit import prefer_affordable
from gateway.routing.router import remaining_fraction
from gateway.state.memory import MemoryBudgetState
from tests.unit.test_routing_strategies import FAST_TURBO, PRICES, STANDARD, TURBO, VLLM, plan, route, router


def tenant(daily: str, steps: tuple[BudgetStep, ...] = ()) -> Tenant:
    return Tenant("t", {}, Path("t.yaml"), Budget(daily_usd=Decimal(daily), when_exhausted="downgrade"), 32768, steps)


def test_cheaper_candidate_that_fits_goes_first() -> None:
    budgets = Budgets(MemoryBudgetState())
    p = plan(router(FAST_TURBO), route("latency", STANDARD, TURBO, VLLM))
    assert [o.label for o in p.options] == [TURBO.label, VLLM.label, STANDARD.label]
    # 10,000 output tokens: turbo's worst case $0.08, standard's $0.025 against $0.05 left
    asyncio.run(prefer_affordable(budgets, PRICES, tenant("0.05"), None, p, 100, 10_000, time.time()))
    # the next in plan order whose worst case fits: vLLM ($0.01)
    assert [o.label for o in p.options] == [VLLM.label, TURBO.label, STANDARD.label]
    assert p.reason.startswith(
        f"budget: {TURBO.label} does not fit the remaining budget at max_tokens 10000, {VLLM.label} does; latency:"
    )
    assert p.reason_for(p.options[0]) == p.reason


def test_plan_is_untouched_when_the_first_fits_or_nothing_fits() -> None:
    budgets = Budgets(MemoryBudgetState())
    p = plan(router(FAST_TURBO), route("latency", TURBO, STANDARD))
    asyncio.run(prefer_affordable(budgets, PRICES, tenant("1"), None, p, 100, 10_000, time.time()))
    assert p.options[0].label == TURBO.label
    asyncio.run(prefer_affordable(budgets, PRICES, tenant("0.001"), None, p, 100, 10_000, time.time()))
    assert p.options[0].label == TURBO.label  # none fits: the policy's downgrade/reject decides


def test_remaining_fraction_reads_the_budget_counters() -> None:
    budgets = Budgets(MemoryBudgetState())
    steps = (BudgetStep(remaining_below=0.5, strategy="cost"),)
    t = tenant("10", steps)
    now = time.time()
    assert asyncio.run(remaining_fraction(budgets, t, None, now)) == 1.0
    line = lines_for("t", t.budget, None, now)[0]
    asyncio.run(budgets.state.add_spent(line.limit.key, to_nanos(Decimal("7.5")), 3600))
    assert asyncio.run(remaining_fraction(budgets, t, None, now)) == 0.25
    assert asyncio.run(remaining_fraction(budgets, tenant("10"), None, now)) is None  # no steps: not read
