"""Each strategy's choice on constructed statistics: cheap vs fast vs cached, ties, cold starts,
budget steps, open breakers and dead candidates."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.metering.prices import PriceBook, PriceEntry
from gateway.policy.model import BudgetStep
from gateway.policy.store import Candidate, Route, Tenant
from gateway.routing import affinity
from gateway.routing.router import Plan, Router, Traits, budget_strategy
from gateway.state.memory import MemoryKeyValueState
from gateway.upstreams.priors import Speed

STANDARD = Candidate("moonshot", "kimi-k2-thinking", "kimi-k2-thinking")
TURBO = Candidate("moonshot", "kimi-k2-thinking-turbo", "kimi-k2-thinking-turbo")
VLLM = Candidate("vllm", "kimi-k2-thinking", "moonshotai/Kimi-K2-Thinking")
BODY: dict[str, Any] = {"model": "k2", "messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 2000}


def _price(target: str, miss: str, hit: str, out: str) -> PriceEntry:
    return PriceEntry(target=target, effective_from=dt.date(2025, 1, 1), input_miss=miss, input_hit=hit, output=out)


PRICES = PriceBook(
    [
        _price(STANDARD.label, "0.60", "0.15", "2.50"),
        _price(TURBO.label, "1.15", "0.15", "8.00"),
        _price(VLLM.label, "0.30", "0.03", "1.00"),
    ]
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # wall-clock seconds: prices in force, affinity expiry

    def __call__(self) -> float:
        return self.now


def router(speeds: dict[str, Speed] | None = None, prices: PriceBook = PRICES, clock: Clock | None = None) -> Router:
    traits = {
        "moonshot": Traits(Speed(0.6, 35.0)),
        "vllm": Traits(Speed(0.2, 50.0)),
    }
    clock = clock or Clock()
    r = Router(traits, prices, MemoryKeyValueState(clock=clock), clock=clock, wall=clock)
    for label, speed in (speeds or {}).items():
        stat = r.stats.stat(label, speed)
        stat.ttft_s, stat.tokens_per_s = speed.ttft_s, speed.tokens_per_s
    return r


def route(strategy: str, *candidates: Candidate, ttft_ms: float | None = None, total_ms: float | None = None) -> Route:
    return Route("k2", tuple(candidates), strategy, ttft_ms, total_ms)


def tenant(r: Route, steps: tuple[BudgetStep, ...] = ()) -> Tenant:
    return Tenant("t", {r.name: r}, Path("t.yaml"), None, 32768, steps)


def plan(r: Router, rt: Route, body: dict[str, Any] = BODY, **kw: Any) -> Plan:
    return asyncio.run(r.plan(tenant(rt), rt, body, 4000, **kw))


def labels(p: Plan) -> list[str]:
    return [o.label for o in p.options]


# one request: 1,000 prompt tokens, 1,000 expected output tokens (cold tenant average caps 2,000)
FAST_TURBO = {TURBO.label: Speed(0.3, 90.0), STANDARD.label: Speed(0.6, 35.0), VLLM.label: Speed(0.2, 50.0)}


def test_cost_picks_the_cheapest_expected_candidate() -> None:
    p = plan(router(FAST_TURBO), route("cost", TURBO, STANDARD, VLLM))
    assert labels(p) == [VLLM.label, STANDARD.label, TURBO.label]
    assert p.reason.startswith("cost: lowest expected cost $")
    assert p.options[0].cost is not None and p.options[0].cost < p.options[1].cost  # type: ignore[operator]


def test_latency_picks_the_fastest_expected_completion() -> None:
    p = plan(router(FAST_TURBO), route("latency", STANDARD, VLLM, TURBO))
    # turbo: 0.3 + 1000/90 = 11.4 s; vllm: 0.2 + 1000/50 = 20.2 s; standard: 0.6 + 1000/35 = 29.2 s
    assert labels(p) == [TURBO.label, VLLM.label, STANDARD.label]
    assert p.reason.startswith("latency: fastest expected completion 11.41 s")


def test_balanced_picks_the_cheapest_that_meets_the_slo() -> None:
    # only turbo finishes 1,000 tokens within 15 s
    p = plan(router(FAST_TURBO), route("balanced", STANDARD, TURBO, VLLM, total_ms=15000))
    assert labels(p)[0] == TURBO.label
    assert p.reason.startswith("balanced: cheapest of 1/3 candidates expected to meet the SLO (total <= 15000 ms)")
    # a looser SLO lets the cheaper ones in; vLLM is cheapest
    p = plan(router(FAST_TURBO), route("balanced", STANDARD, TURBO, VLLM, total_ms=60000))
    assert labels(p) == [VLLM.label, STANDARD.label, TURBO.label]


def test_balanced_with_no_candidate_meeting_the_slo_takes_the_fastest() -> None:
    p = plan(router(FAST_TURBO), route("balanced", STANDARD, TURBO, ttft_ms=100))
    assert labels(p)[0] == TURBO.label
    assert "no candidate expected to meet the SLO (ttft <= 100 ms)" in p.reason


def test_header_tightens_the_slo() -> None:
    loose = route("balanced", STANDARD, TURBO, total_ms=60000)
    assert labels(plan(router(FAST_TURBO), loose))[0] == STANDARD.label
    assert labels(plan(router(FAST_TURBO), loose, max_latency_ms=15000))[0] == TURBO.label


def test_pinned_keeps_policy_order_and_skips_estimates() -> None:
    p = plan(router(FAST_TURBO), route("pinned", TURBO, STANDARD, VLLM))
    assert labels(p) == [TURBO.label, STANDARD.label, VLLM.label]
    assert p.reason == "pinned: first candidate"
    assert not p.estimated and p.chain is None  # the fast path: nothing estimated, nothing hashed


def test_ties_keep_policy_order() -> None:
    twin = Candidate("moonshot2", "kimi-k2-thinking", "kimi-k2-thinking")
    prices = PriceBook([_price(STANDARD.label, "0.60", "0.15", "2.50"), _price(twin.label, "0.60", "0.15", "2.50")])
    r = router(prices=prices)
    r.traits["moonshot2"] = r.traits["moonshot"]
    for strategy in ("cost", "latency", "balanced"):
        assert labels(plan(r, route(strategy, twin, STANDARD))) == [twin.label, STANDARD.label], strategy
        assert labels(plan(r, route(strategy, STANDARD, twin))) == [STANDARD.label, twin.label], strategy


def test_cold_start_uses_priors_then_learns() -> None:
    r = router()  # no observations: moonshot prior ttft 0.6 s, vllm 0.2 s
    rt = route("balanced", STANDARD, VLLM, ttft_ms=1000)
    p = plan(r, rt)
    assert labels(p) == [VLLM.label, STANDARD.label]  # both meet 1 s on priors; vLLM is cheaper
    assert p.options[0].ttft_s == pytest.approx(0.2)
    # vLLM turns out slow: its answers start after 2 s
    for _ in range(3):
        r.stats.observe_speed(VLLM.label, Speed(0.2, 50), 2.0, 500, 10.0)
    p = plan(r, rt)
    assert labels(p) == [STANDARD.label, VLLM.label]
    assert p.reason.startswith("balanced: cheapest of 1/2 candidates expected to meet the SLO (ttft <= 1000 ms)")


def test_first_observation_replaces_the_prior() -> None:
    r = router()
    r.stats.observe_speed(STANDARD.label, Speed(0.6, 35), 1.5, 1000, 20.0)
    stat = r.stats.stat(STANDARD.label, Speed(0.6, 35))
    assert stat.ttft_s == pytest.approx(1.5) and stat.tokens_per_s == pytest.approx(50.0)
    r.stats.observe_speed(STANDARD.label, Speed(0.6, 35), 0.5, 1000, 20.0)
    assert stat.ttft_s == pytest.approx(1.5 + 0.3 * (0.5 - 1.5))


def test_expected_output_is_capped_by_the_tenant_average() -> None:
    r = router(FAST_TURBO)
    assert plan(r, route("cost", STANDARD, VLLM)).options[0].output_tokens == 1000  # cold cap
    r.stats.observe_completion("t", 300)
    assert plan(r, route("cost", STANDARD, VLLM)).options[0].output_tokens == 300
    small = {**BODY, "max_tokens": 100}
    assert plan(r, route("cost", STANDARD, VLLM), small).options[0].output_tokens == 100


def test_cache_affinity_makes_the_holder_cheaper() -> None:
    clock = Clock()
    r = router(FAST_TURBO, clock=clock)
    # no vLLM here: standard vs turbo, where a cached prefix at turbo beats standard's cold prompt
    conversation = {"model": "k2", "messages": [{"role": "user", "content": "y" * 400_000}], "max_tokens": 50}
    rt = route("cost", STANDARD, TURBO)
    first = plan(r, rt, conversation)
    assert labels(first)[0] == STANDARD.label
    asyncio.run(affinity.remember(r.kv, "t", affinity.prefix_chain(conversation), TURBO.label, 100_000, 300, clock.now))
    follow = {**conversation, "messages": [*conversation["messages"], {"role": "assistant", "content": "ok"}]}
    p = plan(r, rt, follow)
    assert labels(p)[0] == TURBO.label
    assert p.options[0].cached_tokens == 90_000  # 100,000 held x the 0.9 prior hit rate
    assert "90000 cached tokens expected" in p.reason
    clock.now += 301  # the provider's cache lifetime passed: the holder is forgotten
    assert labels(plan(r, rt, follow))[0] == STANDARD.label


def test_observed_hit_rate_corrects_expected_cached_tokens() -> None:
    r = router()
    r.stats.observe_cache(TURBO.label, Speed(0.3, 90), 10_000, 5_000)
    assert r.stats.stat(TURBO.label, Speed(0.3, 90)).hit_rate == pytest.approx(0.5)


def test_open_breaker_and_dead_candidates_are_left_out() -> None:
    clock = Clock()
    r = router(FAST_TURBO, clock=clock)
    rt = route("pinned", STANDARD, TURBO, VLLM)
    for _ in range(3):
        r.stats.failure(STANDARD.label, Speed(0.6, 35), clock.now)
    r.dead.add(TURBO.label)
    p = plan(r, rt)
    assert labels(p) == [VLLM.label]
    assert {o.label: o.excluded for o in p.excluded} == {
        STANDARD.label: "circuit breaker open after consecutive failures",
        TURBO.label: "dead: its upstream answered 404 for the model",
    }
    assert p.reason.startswith("pinned: first healthy candidate; skipped")
    clock.now += 31  # cooled down: tried again
    assert labels(plan(r, rt)) == [STANDARD.label, VLLM.label]


def test_all_breakers_open_probes_instead_of_refusing() -> None:
    clock = Clock()
    r = router(clock=clock)
    for _ in range(3):
        r.stats.failure(STANDARD.label, Speed(0.6, 35), clock.now)
    p = plan(r, route("pinned", STANDARD))
    assert labels(p) == [STANDARD.label]
    assert "circuit breaker is open: trying anyway" in p.reason


@pytest.mark.parametrize(
    ("configured", "fraction", "expected"),
    [
        ("latency", 0.9, "latency"),
        ("latency", 0.4, "balanced"),
        ("balanced", 0.4, "balanced"),
        ("pinned", 0.05, "cost"),
        ("cost", 0.4, "cost"),
        ("latency", None, "latency"),
    ],
)
def test_budget_steps_only_move_towards_cheaper(configured: str, fraction: float | None, expected: str) -> None:
    steps = (BudgetStep(remaining_below=0.5, strategy="balanced"), BudgetStep(remaining_below=0.1, strategy="cost"))
    rt = route(configured, STANDARD)
    strategy, note = budget_strategy(configured, tenant(rt, steps), fraction)
    assert strategy == expected
    assert bool(note) == (expected != configured)


def test_budget_step_changes_the_plan() -> None:
    steps = (BudgetStep(remaining_below=0.2, strategy="cost"),)
    rt = route("latency", TURBO, VLLM)
    r = router(FAST_TURBO)
    assert labels(asyncio.run(r.plan(tenant(rt, steps), rt, BODY, 4000, budget_fraction=0.5)))[0] == TURBO.label
    p = asyncio.run(r.plan(tenant(rt, steps), rt, BODY, 4000, budget_fraction=0.1))
    assert labels(p)[0] == VLLM.label and p.strategy == "cost"
    assert "budget 10% left (< 20%): latency -> cost" in p.reason


def test_unpriced_candidate_ranks_last_for_cost() -> None:
    prices = PriceBook([_price(STANDARD.label, "0.60", "0.15", "2.50")])
    p = plan(router(prices=prices), route("cost", VLLM, STANDARD))
    assert labels(p) == [STANDARD.label, VLLM.label]
    assert p.options[1].cost is None and Decimal(0) < p.options[0].cost  # type: ignore[operator]


def test_single_candidate_is_routed_without_estimates() -> None:
    p = plan(router(), route("balanced", STANDARD))
    assert labels(p) == [STANDARD.label] and p.reason == "balanced: the only candidate"
    assert not p.estimated and p.chain is None


@pytest.mark.parametrize("strategy", ["pinned", "cost", "latency", "balanced"])
@pytest.mark.parametrize("fraction", [None, 0.05])
def test_a_one_candidate_plan_names_its_only_candidate(strategy: str, fraction: float | None) -> None:
    """A one-candidate plan: pinned names its first candidate, the others their only one, a budget
    step adds its note, and the SLOs are the route's tightened by the request's."""
    steps = (BudgetStep(remaining_below=0.1, strategy="cost"),)
    rt = route(strategy, STANDARD, ttft_ms=500)
    p = asyncio.run(router().plan(tenant(rt, steps), rt, BODY, 4000, budget_fraction=fraction, max_latency_ms=900))
    effective = "cost" if fraction is not None else strategy
    base = "pinned: first candidate" if effective == "pinned" else f"{effective}: the only candidate"
    note = f"; budget 5% left (< 10%): {strategy} -> cost" if effective != strategy else ""
    assert (p.strategy, labels(p), p.excluded, p.reason) == (effective, [STANDARD.label], [], base + note)
    assert (p.slo_ttft_ms, p.slo_total_ms, p.estimated, p.chain) == (500, 900, False, None)


def test_expected_first_token_includes_prefill_of_uncached_tokens() -> None:
    clock = Clock()
    r = router(clock=clock)
    r.traits["moonshot"] = Traits(Speed(0.6, 35.0, 4000.0))
    long = {"model": "k2", "messages": [{"role": "user", "content": "z" * 80_000}], "max_tokens": 10}
    cold = plan(r, route("latency", STANDARD, VLLM), long)
    standard = next(o for o in cold.options if o.label == STANDARD.label)
    assert standard.ttft_s == pytest.approx(0.6 + 20_000 / 4000, abs=0.01)  # 80 kB of JSON ~ 20,000 tokens
    asyncio.run(affinity.remember(r.kv, "t", affinity.prefix_chain(long), STANDARD.label, 20_000, 300, clock.now))
    warm = next(o for o in plan(r, route("latency", STANDARD, VLLM), long).options if o.label == STANDARD.label)
    assert warm.ttft_s == pytest.approx(0.6 + 2_000 / 4000, abs=0.01)  # 90 % expected cached
