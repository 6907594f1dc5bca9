"""The four strategies: each orders the live candidates and says why the first one leads.

Ties keep the policy's order (the sorts are stable on the candidate's index), so two candidates the
router cannot tell apart are tried in the order the tenant wrote them.

A tool loop stays where its prefix is cached (:func:`stay_with_prefix`): each turn's estimate prices
one request only, and turns differ in shape (a cold tenant's first turn is priced with 1,000 expected
output tokens, later turns with the tenant's learned average and a longer prompt), so per-turn
cheapest would move a loop between upstreams whose prices weigh input and output differently, and
every move throws the provider's cache away. Only the SLO (balanced), the budget or a failing
holder moves it.
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


def prefix_holder(options: list[Option]) -> Option | None:
    """The candidate that served the longest prefix of this conversation recently (ties: ranked order)."""
    return max((o for o in options if o.held_tokens), key=lambda o: o.held_tokens, default=None)


def stay_with_prefix(
    ranked: list[Option], reason: str, strategy: str, slo: Callable[[], str]
) -> tuple[list[Option], str, bool]:
    """``ranked`` with the candidate holding this conversation's longest prefix first, the reason, and
    whether that overrode the strategy's own order.

    For ``cost`` and ``balanced``; a balanced route leaves the holder when it is expected to miss the
    SLO while the leader meets it, and the reason says so.
    """
    holder = prefix_holder(ranked)
    first = ranked[0]
    if holder is None or holder is first:
        return ranked, reason, False
    held = f"holds this conversation's prefix ({holder.held_tokens} prompt tokens"
    if strategy == "balanced" and not holder.meets_slo and first.meets_slo:
        why = (
            f"; moved off {holder.label}, which {held}), because it is not expected to meet {slo()} "
            f"(ttft {holder.ttft_s * 1000:.0f} ms, total {holder.total_s:.2f} s)"
        )
        return ranked, reason + why, False
    ranked = [holder, *(o for o in ranked if o is not holder)]
    speed = f", ttft {holder.ttft_s * 1000:.0f} ms" if strategy == "balanced" else ""
    if strategy == "balanced" and not holder.meets_slo:  # nor does the leader: no move would meet it
        speed += f", no candidate expected to meet {slo()}"
    reason = (
        f"{strategy}: stays on {holder.label}, which {held}, {holder.cached_tokens} cached expected): "
        f"{_usd(holder)}{speed}; {first.label} would cost {_usd(first)} this turn with "
        f"{first.cached_tokens} cached tokens, and moving gives up the cache"
    )
    return ranked, reason, True


# each takes the live options and a function that describes the SLO (only formatted when needed)
STRATEGIES: dict[str, Callable[[list[Option], Callable[[], str]], tuple[list[Option], str]]] = {
    "pinned": pinned,
    "cost": cost,
    "latency": latency,
    "balanced": balanced,
}
# how cheap each strategy routes: a budget step only ever moves a route towards cheaper
CHEAPNESS = {"latency": 0, "pinned": 0, "balanced": 1, "cost": 2}
