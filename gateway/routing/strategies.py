"""The four strategies: each orders the live candidates and says why the first one leads.

Ties keep the policy's order (the sorts are stable on the candidate's index), so two candidates the
router cannot tell apart are tried in the order the tenant wrote them.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from gateway.routing.expected import Option

_INF = Decimal("Infinity")


def _cost(o: Option) -> Decimal:
    return o.cost if o.cost is not None else _INF


def _usd(o: Option) -> str:
    return f"${o.cost:.6f}" if o.cost is not None else "unpriced"


def _cache_note(o: Option) -> str:
    return f", {o.cached_tokens} cached tokens expected" if o.cached_tokens else ""


def pinned(options: list[Option], slo: Callable[[], str]) -> tuple[list[Option], str]:
    ranked = options if len(options) == 1 else sorted(options, key=lambda o: o.index)
    first = ranked[0]
    return ranked, "pinned: first candidate" if first.index == 0 else "pinned: first healthy candidate"


def cost(options: list[Option], slo: Callable[[], str]) -> tuple[list[Option], str]:
    ranked = sorted(options, key=lambda o: (_cost(o), o.index))
    first = ranked[0]
    reason = f"cost: lowest expected cost {_usd(first)}{_cache_note(first)}"
    if len(ranked) > 1:
        reason += f" (next {ranked[1].label} {_usd(ranked[1])})"
    return ranked, reason


def latency(options: list[Option], slo: Callable[[], str]) -> tuple[list[Option], str]:
    ranked = sorted(options, key=lambda o: (o.total_s, o.index))
    first = ranked[0]
    reason = f"latency: fastest expected completion {first.total_s:.2f} s (ttft {first.ttft_s * 1000:.0f} ms)"
    if len(ranked) > 1:
        reason += f" (next {ranked[1].label} {ranked[1].total_s:.2f} s)"
    return ranked, reason


def balanced(options: list[Option], slo: Callable[[], str]) -> tuple[list[Option], str]:
    meeting = sorted((o for o in options if o.meets_slo), key=lambda o: (_cost(o), o.index))
    missing = sorted((o for o in options if not o.meets_slo), key=lambda o: (o.total_s, o.index))
    first = (meeting or missing)[0]
    if meeting:
        reason = (
            f"balanced: cheapest of {len(meeting)}/{len(options)} candidates expected to meet {slo()} "
            f"({_usd(first)}{_cache_note(first)}, ttft {first.ttft_s * 1000:.0f} ms)"
        )
    else:
        reason = f"balanced: no candidate expected to meet {slo()}; fastest expected ({first.total_s:.2f} s)"
    return meeting + missing, reason


# each takes the live options and a function that describes the SLO (only formatted when needed)
STRATEGIES: dict[str, Callable[[list[Option], Callable[[], str]], tuple[list[Option], str]]] = {
    "pinned": pinned,
    "cost": cost,
    "latency": latency,
    "balanced": balanced,
}
# how cheap each strategy routes: a budget step only ever moves a route towards cheaper
CHEAPNESS = {"latency": 0, "pinned": 0, "balanced": 1, "cost": 2}
