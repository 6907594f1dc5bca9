"""Budget counters a policy hot reload adds start from the ledger, as the start-up ones do.

A tenant added by a reload (or a tenant or app that gains a cap) may have spent already this day or
month: served earlier by this deployment without a cap, or before it was removed. Its counters must
start from the ledger, or the cap would allow that spend twice. Only counters that are new are
seeded: the in-process state adds a seed to what it holds, so a counter that already counts live
settlements (present before the reload, or seen at an earlier one in the same window) is left alone.
Seeding happens before the new policy is installed, so no request reserves on a counter that is
about to be seeded.
"""

from __future__ import annotations

from typing import Any

from gateway.metering.budget import Budgets, lines_for, seed_from_ledger, windows
from gateway.policy.model import Budget


def tenants_of(policies: Any) -> list[tuple[str, Budget | None]]:
    """(name, budget) of every tenant of a :class:`gateway.policy.store.PolicySet`."""
    return [(t.name, t.budget) for t in policies.tenants.values()]


def budget_keys(tenants: list[tuple[str, Budget | None]], now: float) -> set[str]:
    """Every counter key the tenants' caps use in the windows containing ``now``."""
    keys: set[str] = set()
    for tenant, budget in tenants:
        if budget is None:
            continue
        for app in [None, *budget.apps]:
            keys.update(line.limit.key for line in lines_for(tenant, budget, app, now))
    return keys


class ReloadSeeding:
    """Remembers which counters this process has counted in the current windows."""

    def __init__(self, budgets: Budgets, ledger: object | None, policies: Any, now: float) -> None:
        self.budgets = budgets
        self.ledger = ledger
        self.known = budget_keys(tenants_of(policies), now)

    async def before_install(self, old: Any, new: Any, now: float) -> set[str]:
        """Seed the counters ``new`` caps that neither ``old`` nor an earlier reload in the same
        windows used; returns their keys."""
        current = tuple(w.key for w in windows(now))
        self.known = {k for k in self.known if k.endswith(current)}  # forget past days and months
        tenants = tenants_of(new)
        wanted = budget_keys(tenants, now)
        counted = budget_keys(tenants_of(old), now)
        added = wanted - counted - self.known
        if added and self.ledger is not None:
            await seed_from_ledger(self.budgets, self.ledger, tenants, now, only=added)
        self.known |= wanted | counted
        return added
