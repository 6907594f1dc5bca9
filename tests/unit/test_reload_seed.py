"""Which budget counters a policy reload seeds from the ledger: only new ones, never one twice."""

from __future__ import annotations

import time
from decimal import Decimal
from types import SimpleNamespace

from gateway.metering.budget import Budgets
from gateway.metering.reload_seed import ReloadSeeding
from gateway.policy.model import Budget
from gateway.state.memory import MemoryBudgetState

SPENT = Decimal("0.004")


def policies(*names: str) -> SimpleNamespace:
    return SimpleNamespace(tenants={n: SimpleNamespace(name=n, budget=Budget(daily_usd=Decimal(1))) for n in names})


class Ledger:
    """Every tenant spent ``SPENT`` in every window."""

    async def window_spend(self, tenant: str, app: str | None, since: float) -> Decimal:
        return SPENT


async def test_reload_seeds_only_new_counters_and_never_one_twice() -> None:
    """A tenant added by a reload is seeded; removed and added again within the day, its counter still
    counts its live spend, so seeding it again from the ledger would count that spend twice."""
    budgets = Budgets(MemoryBudgetState())
    now = time.time()
    seeding = ReloadSeeding(budgets, Ledger(), policies("a"), now)
    first = await seeding.before_install(policies("a"), policies("a", "b"), now)
    assert first == {f"budget:b:tenant:d{time.strftime('%Y-%m-%d', time.gmtime(now))}"}
    assert await budgets.state.used(next(iter(first))) == int(SPENT * 10**9)
    assert await seeding.before_install(policies("a", "b"), policies("a"), now) == set()
    assert await seeding.before_install(policies("a"), policies("a", "b"), now) == set()
    assert await budgets.state.used(next(iter(first))) == int(SPENT * 10**9)


async def test_reload_seeds_a_cap_an_existing_tenant_gains() -> None:
    budgets = Budgets(MemoryBudgetState())
    now = time.time()
    capped = policies("a")
    uncapped = SimpleNamespace(tenants={"a": SimpleNamespace(name="a", budget=None)})
    seeding = ReloadSeeding(budgets, Ledger(), uncapped, now)
    [key] = await seeding.before_install(uncapped, capped, now)
    assert await budgets.state.used(key) == int(SPENT * 10**9)
