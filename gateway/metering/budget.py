"""Hard budgets: reserve the worst case before forwarding, settle to the true cost afterwards.

A request reserves what it could cost at most (every prompt token a cache miss, every allowed output
token used) on every counter that caps it: the tenant's daily and monthly windows and its app's.
The state backend makes check-and-add atomic, so concurrent requests can never push spend past a
cap. Settlement replaces the reservation by the actual cost on every path (success, upstream error,
timeout, client cancel), so no reservation leaks.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import time
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from gateway.errors import GatewayError
from gateway.metering.money import from_nanos, to_nanos
from gateway.metering.prices import Price, worst_case
from gateway.policy.model import Budget, Caps
from gateway.state.base import BudgetState, Limit


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # "daily" | "monthly"
    key: str  # e.g. d2026-11-29
    resets_at: float


def windows(now: float) -> tuple[Window, Window]:
    """The UTC day and month ``now`` falls in (computed once per day: every reservation asks)."""
    return _windows_of_day(int(now // 86400))


@functools.lru_cache(maxsize=8)
def _windows_of_day(day_number: int) -> tuple[Window, Window]:
    day = dt.date(1970, 1, 1) + dt.timedelta(days=day_number)
    tomorrow = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    days_in_month = calendar.monthrange(day.year, day.month)[1]
    next_month = dt.datetime.combine(day.replace(day=1) + dt.timedelta(days=days_in_month), dt.time(), tzinfo=dt.UTC)
    return (
        Window("daily", f"d{day.isoformat()}", tomorrow.timestamp()),
        Window("monthly", f"m{day.strftime('%Y-%m')}", next_month.timestamp()),
    )


@dataclass(frozen=True, slots=True)
class Line:
    """One cap that applies to a request."""

    scope: str  # "tenant" or "app=NAME"
    window: Window
    limit: Limit


# (tenant, app, day) -> (the budget object, its lines): a request's caps are the same all day, and
# reserving is on every budgeted request's path. A reloaded policy is a new object: rebuilt then.
_LINES: dict[tuple[str, str | None, int], tuple[Budget, list[Line]]] = {}


def lines_for(tenant: str, budget: Budget | None, app: str | None, now: float) -> list[Line]:
    """The caps that apply to a request of ``tenant`` (and ``app``) at ``now``; callers must not
    change the returned list (it is shared for the day). Counters live until their window resets
    plus at least a day."""
    if budget is None:
        return []
    day = int(now // 86400)
    cached = _LINES.get((tenant, app, day))
    if cached is not None and cached[0] is budget:
        return cached[1]
    if len(_LINES) > 4096:
        _LINES.clear()
    lines = _lines(tenant, budget, app, day * 86400.0)
    _LINES[(tenant, app, day)] = (budget, lines)
    return lines


def _lines(tenant: str, budget: Budget, app: str | None, now: float) -> list[Line]:
    out: list[Line] = []
    scopes: list[tuple[str, Caps]] = [("tenant", budget)]
    if app is not None and app in budget.apps:
        scopes.append((f"app={app}", budget.apps[app]))
    for scope, caps in scopes:
        for window, cap in zip(windows(now), (caps.daily_usd, caps.monthly_usd), strict=True):
            if cap is None:
                continue
            ttl = int(window.resets_at - now) + 86400
            key = f"budget:{tenant}:{scope}:{window.key}"
            out.append(Line(scope, window, Limit(key, to_nanos(cap), ttl)))
    return out


@dataclass(slots=True)
class Reservation:
    request_id: str
    amount: int  # nanodollars
    lines: list[Line]
    max_tokens: int  # the bound the reservation assumed (maybe lowered by a downgrade)
    downgraded: bool = False


def _refusal_error(tenant: str, line: Line, remaining: int, needed: int) -> GatewayError:
    resets = dt.datetime.fromtimestamp(line.window.resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    who = f"tenant '{tenant}'" if line.scope == "tenant" else f"{line.scope.replace('=', ' ')} of tenant '{tenant}'"
    retry_after = max(1, int(line.window.resets_at - time.time()))
    return GatewayError(
        429,
        f"Budget exceeded for {who} ({line.window.name} cap ${from_nanos(line.limit.cap):f}): "
        f"${from_nanos(remaining):f} remaining, this request may cost up to ${from_nanos(needed):f}; "
        f"the window resets at {resets}.",
        type="budget_exceeded",
        code="budget_exceeded",
        headers=[(b"retry-after", str(retry_after).encode()), (b"x-should-retry", b"false")],
    )


class Budgets:
    def __init__(self, state: BudgetState) -> None:
        self.state = state

    async def reserve(
        self,
        *,
        request_id: str,
        tenant: str,
        budget: Budget | None,
        app: str | None,
        price: Price,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
    ) -> Reservation | None:
        """Reserve the worst case, lowering ``max_tokens`` when the policy allows; raises 429 otherwise."""
        lines = lines_for(tenant, budget, app, now)
        if not lines:
            return None
        assert budget is not None
        amount = to_nanos(worst_case(price, prompt_tokens, max_tokens))
        limits = [line.limit for line in lines]
        refusal = await self.state.reserve(request_id, limits, amount)
        if refusal is None:
            return Reservation(request_id, amount, lines, max_tokens)
        line = next(li for li in lines if li.limit.key == refusal.key)
        if budget.when_exhausted == "downgrade" and price.out > 0:
            # the most output tokens that still fit in the tightest line
            tightest = min([li.limit.cap - await self.state.used(li.limit.key) for li in lines])
            prompt_cost = to_nanos(worst_case(price, prompt_tokens, 0))
            fits = (from_nanos(tightest - prompt_cost) / price.out).to_integral_value(ROUND_FLOOR)
            fit_tokens = int(min(Decimal(max_tokens), fits)) if fits > 0 else 0
            if fit_tokens >= budget.min_max_tokens:
                amount = to_nanos(worst_case(price, prompt_tokens, fit_tokens))
                if await self.state.reserve(request_id, limits, amount) is None:
                    return Reservation(request_id, amount, lines, fit_tokens, downgraded=True)
        raise _refusal_error(tenant, line, refusal.remaining, amount)

    async def settle(self, reservation: Reservation, actual_usd: Decimal) -> None:
        """Release ``reservation`` and count ``actual_usd`` instead (callers skip requests that hold none)."""
        await self.state.settle(reservation.request_id, to_nanos(actual_usd))

    async def remaining(self, tenant: str, budget: Budget | None, now: float) -> list[dict[str, object]]:
        """Remaining budget per scope and window, for ``GET /v1/budget`` and the gauge."""
        out: list[dict[str, object]] = []
        if budget is None:
            return out
        apps = [None, *budget.apps]
        seen: set[str] = set()
        for app in apps:
            for line in lines_for(tenant, budget, app, now):
                if line.limit.key in seen:
                    continue
                seen.add(line.limit.key)
                used = await self.state.used(line.limit.key)
                out.append(
                    {
                        "scope": line.scope,
                        "window": line.window.name,
                        "cap_usd": str(from_nanos(line.limit.cap)),
                        "used_usd": str(from_nanos(used)),
                        "remaining_usd": str(from_nanos(max(0, line.limit.cap - used))),
                        "resets_at": dt.datetime.fromtimestamp(line.window.resets_at, dt.UTC).isoformat(),
                    }
                )
        return out


async def seed_from_ledger(
    budgets: Budgets,
    ledger: object,
    tenants: list[tuple[str, Budget | None]],
    now: float,
    only: set[str] | None = None,
) -> None:
    """Start-up: counters of an in-process state begin at what the ledger says was spent in each window.

    ``ledger`` is a :class:`gateway.metering.ledger.Ledger` (typed loosely to keep this module free of
    storage imports). ``only``: seed just these counter keys (the ones a policy reload added).
    """
    window_starts = {}
    for window in windows(now):
        if window.name == "daily":
            start = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            start = dt.datetime.fromtimestamp(now, dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        window_starts[window.key] = start.timestamp()
    for tenant, budget in tenants:
        if budget is None:
            continue
        for app in [None, *budget.apps]:
            for line in lines_for(tenant, budget, app, now):
                if (app is not None and line.scope == "tenant") or (only is not None and line.limit.key not in only):
                    continue
                spent = await ledger.window_spend(tenant, app, window_starts[line.window.key])  # type: ignore[attr-defined]
                if spent:
                    await budgets.state.seed(line.limit.key, to_nanos(spent), line.limit.ttl_s)
