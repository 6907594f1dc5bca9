"""At budget exhaustion, a cheaper candidate that still fits goes first.

The reservation (metering/budget.py) decides what fits, atomically, when the request is forwarded.
Before that, when the plan's first candidate cannot fit its worst case into what is left, this probe
looks down the plan for one whose worst case does and moves it to the front, so the request is served
whole by a cheaper upstream before the policy's ``downgrade`` (lower max_tokens) or ``reject`` applies.
"""

from __future__ import annotations

from gateway.metering.budget import Budgets, lines_for
from gateway.metering.money import to_nanos
from gateway.metering.prices import PriceBook, worst_case
from gateway.policy.store import Tenant
from gateway.routing.router import Plan


async def _headroom(budgets: Budgets, tenant: Tenant, app: str | None, now: float) -> int | None:
    lines = lines_for(tenant.name, tenant.budget, app, now)
    if not lines:
        return None
    return min([line.limit.cap - await budgets.state.used(line.limit.key) for line in lines])


async def prefer_affordable(
    budgets: Budgets,
    prices: PriceBook,
    tenant: Tenant,
    app: str | None,
    plan: Plan,
    prompt_tokens: int,
    max_tokens: int,
    now: float,
) -> None:
    """Reorder ``plan`` in place when its first candidate does not fit the remaining budget."""
    if len(plan.options) < 2:
        return
    headroom = await _headroom(budgets, tenant, app, now)
    if headroom is None:
        return
    costs = []
    for option in plan.options:
        price = prices.at(option.label, now)
        costs.append(to_nanos(worst_case(price, prompt_tokens, max_tokens)) if price is not None else None)
    if costs[0] is not None and costs[0] <= headroom:
        return
    for i, cost in enumerate(costs[1:], start=1):
        if cost is not None and cost <= headroom:
            chosen = plan.options.pop(i)
            first = plan.options[0].label
            plan.options.insert(0, chosen)
            plan.reason = (
                f"budget: {first} does not fit the remaining budget at max_tokens {max_tokens}, "
                f"{chosen.label} does; " + plan.reason
            )
            return
