"""A tool loop stays on the upstream that holds its prompt prefix (cost and balanced), unless the SLO,
the budget or a broken holder moves it, and the route reason says which.

The prices are the demo's: Moonshot's list (miss $0.60, hit $0.15, output $2.50 per 1M) against a
self-hosted vLLM whose GPU cost makes every token about $1.78 per 1M (cached at a tenth). A cold first
turn is priced with 1,000 expected output tokens, where vLLM is cheaper; the second turn, with the
tenant's learned output and a longer prompt, is cheaper per request at Moonshot even after vLLM's
cache hits. That flip is what moved the demo's loops.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from gateway.metering.prices import PriceBook, PriceEntry
from gateway.policy.model import BudgetStep
from gateway.policy.store import Route
from gateway.routing import affinity
from gateway.routing.router import Plan, Router
from gateway.upstreams.priors import Speed
from tests.unit.test_routing_strategies import STANDARD, VLLM, Clock, labels, route, router, tenant

DEMO_PRICES = PriceBook(
    [
        PriceEntry(
            target=STANDARD.label,
            effective_from=dt.date(2025, 1, 1),
            input_miss="0.60",
            input_hit="0.15",
            output="2.50",
        ),
        PriceEntry(
            target=VLLM.label,
            effective_from=dt.date(2025, 1, 1),
            gpu={"usd_per_hour": "16.00", "tokens_per_s": 2500, "cached_factor": "0.1"},
        ),
    ]
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TURN1: dict[str, Any] = {
    "model": "k2",
    "tools": TOOLS,
    "messages": [{"role": "system", "content": "s" * 1600}, {"role": "user", "content": "weather in Paris?"}],
}
CALL = {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TURN2: dict[str, Any] = {
    **TURN1,
    "messages": [
        *TURN1["messages"],
        {"role": "assistant", "content": "", "reasoning_content": "r" * 400, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "get_weather:0", "content": "t" * 1200},
    ],
}


def _plan(r: Router, rt: Route, body: dict[str, Any], **kw: Any) -> Plan:
    return asyncio.run(r.plan(tenant(rt, kw.pop("steps", ())), rt, body, 4000, **kw))


def _first_turn_served_by_vllm(r: Router, rt: Route, clock: Clock) -> None:
    """Turn 1 as the pipeline runs it: routed (to vLLM), served, remembered, output learned."""
    first = _plan(r, rt, TURN1)
    assert labels(first)[0] == VLLM.label, first.reason
    chain = affinity.prefix_chain(TURN1)
    asyncio.run(affinity.remember(r.kv, "t", chain, VLLM.label, 460, 300, clock.now))
    r.stats.observe_completion("t", 120)


def test_a_tool_loop_stays_on_the_upstream_holding_its_prefix_though_another_is_cheaper_this_turn() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM)
    _first_turn_served_by_vllm(r, rt, clock)

    second = _plan(r, rt, TURN2)

    assert labels(second) == [VLLM.label, STANDARD.label]
    assert second.kept and second.holder == VLLM.label
    held, other = second.options
    assert held.held_tokens == 460 and held.cached_tokens == 414  # 460 x the 0.9 prior hit rate
    assert other.cost is not None and held.cost is not None and other.cost < held.cost  # the flip
    assert second.reason.startswith(f"balanced: stays on {VLLM.label}, which holds this conversation's prefix")
    assert f"{STANDARD.label} would cost ${other.cost:.6f} this turn with 0 cached tokens" in second.reason


def test_without_a_held_prefix_the_cheaper_upstream_leads() -> None:
    """The same second turn from a conversation no upstream served: per-request cheapest wins."""
    r = router(prices=DEMO_PRICES)
    r.stats.observe_completion("t", 120)
    p = _plan(r, route("balanced", STANDARD, VLLM), TURN2)
    assert labels(p)[0] == STANDARD.label and not p.kept and p.holder is None


def test_cost_strategy_keeps_the_loop_on_its_holder_too() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("cost", STANDARD, VLLM)
    _first_turn_served_by_vllm(r, rt, clock)
    p = _plan(r, rt, TURN2)
    assert labels(p)[0] == VLLM.label and p.reason.startswith(f"cost: stays on {VLLM.label}")


def test_balanced_moves_the_loop_when_its_holder_would_miss_the_slo() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM, ttft_ms=1500)
    _first_turn_served_by_vllm(r, rt, clock)
    for _ in range(3):  # vLLM's answers now start after 4 s
        r.stats.observe_speed(VLLM.label, Speed(0.2, 50), 4.0, 500, 10.0)

    p = _plan(r, rt, TURN2)

    assert labels(p)[0] == STANDARD.label and not p.kept
    assert f"moved off {VLLM.label}, which holds this conversation's prefix (460 prompt tokens)" in p.reason
    assert "because it is not expected to meet the SLO (ttft <= 1500 ms)" in p.reason


def test_a_budget_step_moves_the_loop_to_the_cheapest_and_says_so() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM)
    _first_turn_served_by_vllm(r, rt, clock)
    steps = (BudgetStep(remaining_below=0.2, strategy="cost"),)

    p = _plan(r, rt, TURN2, steps=steps, budget_fraction=0.1)

    assert labels(p)[0] == STANDARD.label and p.strategy == "cost" and not p.kept
    assert "budget 10% left (< 20%): balanced -> cost" in p.reason
    assert f"moved off {VLLM.label}, which holds this conversation's prefix" in p.reason


def test_an_open_breaker_on_the_holder_moves_the_loop_and_explain_names_the_lost_cache() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM)
    _first_turn_served_by_vllm(r, rt, clock)
    for _ in range(3):
        r.stats.failure(VLLM.label, Speed(0.2, 50), clock.now)

    p = _plan(r, rt, TURN2)
    assert labels(p) == [STANDARD.label] and p.reason.endswith(f"skipped {VLLM.label}")  # one left: no estimates

    explained = _plan(r, rt, TURN2, explain=True)  # route/explain estimates and names what is lost
    assert labels(explained) == [STANDARD.label]
    assert f"the conversation's cached prefix at {VLLM.label} (460 tokens) is lost" in explained.reason


def test_after_a_move_the_loop_stays_on_its_new_holder() -> None:
    """The upstream that served the longer prefix holds the conversation from then on."""
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM)
    _first_turn_served_by_vllm(r, rt, clock)
    asyncio.run(affinity.remember(r.kv, "t", affinity.prefix_chain(TURN2), STANDARD.label, 1000, 300, clock.now))
    turn3 = {**TURN2, "messages": [*TURN2["messages"], {"role": "assistant", "content": "done"}]}
    p = _plan(r, rt, turn3)
    assert p.holder == STANDARD.label and labels(p)[0] == STANDARD.label


def test_latency_routes_by_speed_alone() -> None:
    """A latency route already counts the held prefix as faster prefill; it is not held to it."""
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    _first_turn_served_by_vllm(r, route("balanced", STANDARD, VLLM), clock)
    for _ in range(3):
        r.stats.observe_speed(VLLM.label, Speed(0.2, 50), 4.0, 500, 10.0)
    p = _plan(r, route("latency", STANDARD, VLLM), TURN2)
    assert labels(p)[0] == STANDARD.label and p.holder == VLLM.label and not p.kept


def test_when_no_candidate_can_meet_the_slo_the_loop_keeps_its_cache() -> None:
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM, ttft_ms=100)  # neither starts within 100 ms
    _first_turn_served_by_vllm(r, route("balanced", STANDARD, VLLM), clock)
    for _ in range(3):  # vLLM is now the slower one
        r.stats.observe_speed(VLLM.label, Speed(0.2, 50), 4.0, 500, 10.0)
    p = _plan(r, rt, TURN2)
    assert labels(p)[0] == VLLM.label and p.kept
    assert "no candidate expected to meet the SLO (ttft <= 100 ms)" in p.reason


def test_a_conversation_named_by_prompt_cache_key_stays_with_its_upstream_after_its_history_changed() -> None:
    """Codex CLI sends its session id as ``prompt_cache_key``; a compacted history still stays put."""
    clock = Clock()
    r = router(prices=DEMO_PRICES, clock=clock)
    rt = route("balanced", STANDARD, VLLM)
    keyed = {**TURN1, "prompt_cache_key": "session-42"}
    asyncio.run(affinity.remember(r.kv, "t", affinity.prefix_chain(keyed), VLLM.label, 460, 300, clock.now))
    r.stats.observe_completion("t", 120)
    compacted = {**TURN2, "prompt_cache_key": "session-42", "messages": [{"role": "user", "content": "x" * 16000}]}
    p = _plan(r, rt, compacted)
    assert labels(p)[0] == VLLM.label and p.kept and p.holder == VLLM.label
    other = {**compacted, "prompt_cache_key": "session-43"}  # another session: per-request cheapest
    assert labels(_plan(r, rt, other))[0] == STANDARD.label
