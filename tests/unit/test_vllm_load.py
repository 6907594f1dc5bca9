"""vLLM /metrics parsing and the queueing delay it adds to a candidate's expected first token."""

from __future__ import annotations

import pytest

from gateway.routing.load import Load, parse_metrics, queue_delay
from gateway.simulator import Simulator, profile_from
from gateway.simulator.server import metrics_text


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
    assert queue_delay(Load(0, 4, 0.5), 0.2, 50) == 0
    # 8 waiting over 4 running: two service times of 0.2 + 1000/50 s each
    assert queue_delay(Load(8, 4, 0.5), 0.2, 50) == pytest.approx(2 * 20.2)
    assert queue_delay(Load(0, 4, 0.99), 0.2, 50) == pytest.approx(0.2)  # nearly full KV cache


def test_dispatches_between_scrapes_count_as_arrivals() -> None:
    from gateway.routing.load import LoadState

    state = LoadState()
    state.scraped(Load(0, 10, 0.3))  # never seen queueing: capacity unknown, no wait expected
    state.dispatched = 50
    assert state.queue_delay(0.2, 50) == 0
    state.scraped(Load(2, 32, 0.5))  # queueing at 32 running: that is its limit
    assert state.capacity == 32
    state.scraped(Load(0, 30, 0.5))  # two slots free
    assert state.queue_delay(0.2, 50) == 0
    state.dispatched = 6  # sent since the scrape: four of them wait
    assert state.queue_delay(0.2, 50) == pytest.approx(4 / 30 * 20.2)
