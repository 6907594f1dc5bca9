"""vLLM /metrics parsing and the queueing delay it adds to a candidate's expected first token."""

from __future__ import annotations

import pytest

from gateway.routing.load import Load, parse_metrics, queue_delay
from simulator import Simulator, profile_from
from simulator.metrics import metrics_text


def test_parses_the_simulators_vllm_metrics() -> None:
    sim = Simulator(profile_from("vllm"))
    load = parse_metrics(metrics_text(sim))
    assert load == Load(0.0, 0.0, 0.0)


def test_parses_labelled_gauges_and_sums_models() -> None:
    text = """# HELP vllm:num_requests_waiting x
vllm:num_requests_waiting{model_name="a"} 6.0
vllm:num_requests_waiting{model_name="b"} 2.0
vllm:num_requests_running{model_name="a"} 4.0
vllm:kv_cache_usage_perc{model_name="a"} 0.99
vllm:prompt_tokens_total{model_name="a"} 1e6
"""
    assert parse_metrics(text) == Load(8.0, 4.0, 0.99)


def test_a_queue_makes_the_server_slow() -> None:
    assert queue_delay(Load(-1, 4, 0.5), 0.2, 50) == 0  # a slot is free
    # 8 ahead over 4 busy slots: the 9th slot to free is ours, each takes a cold service time
    assert queue_delay(Load(8, 4, 0.5), 0.2, 50) == pytest.approx(9 / 4 * 20.2)
    assert queue_delay(Load(8, 4, 0.5), 0.2, 50, service_s=10.0) == pytest.approx(9 / 4 * 10.0)
    assert queue_delay(Load(-1, 4, 0.99), 0.2, 50) == pytest.approx(0.2)  # nearly full KV cache


def test_dispatches_between_scrapes_count_as_arrivals() -> None:
    from gateway.routing.load import LoadState

    state = LoadState()
    state.scraped(Load(0, 10, 0.3), now=100.0)  # never seen queueing: capacity unknown, no wait expected
    state.dispatched = 50
    assert state.queue_delay(0.2, 50, now=100.0) == 0
    state.scraped(Load(2, 32, 0.5), now=102.0)  # queueing at 32 running: that is its limit
    assert state.capacity == 32
    state.scraped(Load(0, 30, 0.5), now=104.0)  # two slots free
    assert state.queue_delay(0.2, 50, now=104.0) == 0
    state.dispatched = 6  # sent since the scrape: four of them wait, we are the fifth
    assert state.queue_delay(0.2, 50, now=104.0) == pytest.approx(5 / 30 * 20.2)


def test_slots_that_finished_since_the_scrape_shorten_the_queue() -> None:
    from gateway.routing.load import LoadState

    state = LoadState()
    state.scraped(Load(10, 32, 0.5), now=100.0)
    state.service_s = 16.0  # 32 slots free at 2 per second
    assert state.queue_delay(0.2, 50, now=100.0) == pytest.approx(11 / 32 * 16.0)
    # 2 s later four slots have freed: six remain ahead
    assert state.queue_delay(0.2, 50, now=102.0) == pytest.approx(7 / 32 * 16.0)
    assert state.queue_delay(0.2, 50, now=110.0) == 0  # drained: a slot is free


def test_service_time_is_learned_from_answers() -> None:
    from gateway.routing.load import SERVICE_ALPHA, LoadState

    state = LoadState()
    state.scraped(Load(3, 4, 0.5), now=0.0)
    assert state.queue_delay(0.2, 50, now=0.0) == pytest.approx(4 / 4 * 20.2)  # cold: 0.2 s + 1,000 tokens
    state.served(8.0)
    assert state.service_s == 8.0  # the first answer replaces the cold guess
    state.served(18.0)
    assert state.service_s == pytest.approx(8.0 + SERVICE_ALPHA * 10.0)
    assert state.queue_delay(0.2, 50, now=0.0) == pytest.approx(state.service_s)


def test_queue_wait_is_not_learned_into_the_first_token_time() -> None:
    """A queueing vLLM must not look slow twice: once in its queue delay and again in its TTFT EWMA."""
    import asyncio
    from pathlib import Path

    from gateway.policy.store import Candidate, Route, Tenant
    from gateway.routing.load import apply_load
    from gateway.routing.router import Router, Traits
    from gateway.state.memory import MemoryKeyValueState
    from gateway.upstreams.priors import Speed
    from gateway.upstreams.usage import Usage

    vllm = Candidate("vllm", "k2", "k2")
    other = Candidate("other", "k2", "k2")
    now = [1000.0]
    router = Router(
        {"vllm": Traits(Speed(0.2, 50.0)), "other": Traits(Speed(0.6, 35.0))},
        None,
        MemoryKeyValueState(),
        clock=lambda: now[0],
        wall=lambda: now[0],
    )
    route = Route("k2", (vllm, other), "latency")
    tenant = Tenant("t", {"k2": route}, Path("t.yaml"))
    body = {"model": "k2", "messages": [{"role": "user", "content": "q"}], "max_tokens": 500}
    apply_load(router, "vllm", Load(8, 32, 0.5))
    plan = asyncio.run(router.plan(tenant, route, body, 100))
    option = next(o for o in plan.options if o.label == vllm.label)
    assert option.queue_s == pytest.approx(9 / 32 * 20.2)  # cold service time
    assert option.ttft_s == pytest.approx(0.2 + option.queue_s, abs=0.01)
    # it waited as long as expected, then answered in 0.2 s and decoded 500 tokens in 10 s
    ttft = option.queue_s + 0.2
    asyncio.run(router.served(tenant, plan, option, ttft, 10.0, Usage(20, 500, 0, 0)))
    assert router.stats.stat(vllm.label, Speed(0.2, 50.0)).ttft_s == pytest.approx(0.2)
    assert router.loads["vllm"].service_s == pytest.approx(10.2)  # it held a slot 10.2 s, not 10.2 + wait


def test_a_plan_without_estimates_teaches_a_scraped_vllm_only_its_decode_speed() -> None:
    """A single-candidate route expects no wait, so the wait hidden in its times must not be learned
    as a slow first token or a long slot time."""
    import asyncio
    from pathlib import Path

    from gateway.policy.store import Candidate, Route, Tenant
    from gateway.routing.load import apply_load
    from gateway.routing.router import Router, Traits
    from gateway.state.memory import MemoryKeyValueState
    from gateway.upstreams.priors import Speed
    from gateway.upstreams.usage import Usage

    vllm = Candidate("vllm", "k2", "k2")
    prior = Speed(0.2, 50.0)
    router = Router({"vllm": Traits(prior)}, None, MemoryKeyValueState())
    route = Route("k2", (vllm,), "balanced")
    tenant = Tenant("t", {"k2": route}, Path("t.yaml"))
    apply_load(router, "vllm", Load(8, 32, 0.5))
    plan = asyncio.run(router.plan(tenant, route, {"messages": [{"role": "user", "content": "q"}]}, 100))
    assert not plan.estimated
    # waited 3 s in the queue, then 0.2 s to the first token and 500 tokens at 25 tokens/s
    asyncio.run(router.served(tenant, plan, plan.options[0], 3.2, 20.0, Usage(20, 500, 0, 0)))
    stat = router.stats.stat(vllm.label, prior)
    assert stat.ttft_s == pytest.approx(0.2) and stat.tokens_per_s == pytest.approx(25.0)
    assert router.loads["vllm"].service_s is None
    asyncio.run(router.served(tenant, plan, plan.options[0], None, 23.2, Usage(20, 500, 0, 0)))  # whole
    assert router.stats.stat(vllm.label, prior).tokens_per_s == pytest.approx(25.0)
