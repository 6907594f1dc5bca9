"""Two gateway processes on one Redis route as one: a breaker one replica opens is open for the other,
and a tool loop whose turns alternate between them keeps its reasoning (strip mode) and stays on the
upstream that holds its prompt prefix."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml
from tests.e2e.test_reasoning_modes import (
    FIRST_REASONING,
    TOOLS,
    assemble_stream,
    expected_reasoning,
    no_reasoning_keys,
)

pytestmark = pytest.mark.redis
KEY = "sk-replica-routing"
COOLDOWN_S = 3.0


@pytest.fixture(scope="module")
def sim_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_simulator(tmp_path_factory.mktemp("replica-sim-b"), "instant")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, simulator: Process, sim_b: Process
) -> Iterator[tuple[Process, Process]]:
    folder = tmp_path_factory.mktemp("replica-routing")
    url, ns = shared_redis()
    timeouts = "timeouts: {connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 5}"
    upstreams = f"""\
  a:
    kind: openai
    base_url: {simulator.url}/v1
    models: {{kimi-k2-thinking: kimi-k2-thinking, k2-br: kimi-k2.6}}
    {timeouts}
  b:
    kind: openai
    base_url: {sim_b.url}/v1
    models: {{kimi-k2-thinking: kimi-k2-thinking, k2-br: kimi-k2-thinking}}
    {timeouts}
"""
    policy = f"""\
tenant: replicas
keys: ["{hashed(KEY)}"]
models:
  loop: {{candidates: [a/kimi-k2-thinking, b/kimi-k2-thinking], strategy: cost}}
  breaker: {{candidates: [a/k2-br, b/k2-br], strategy: pinned}}
reasoning: {{mode: strip}}
"""
    # b is cheaper on a cold prompt, but its cache hits cost almost as much as a miss
    prices = {"b/kimi-k2-thinking": {"input_miss": "0.50", "input_hit": "0.45", "output": "2.50"}}
    extra = state_yaml(url, ns) + f"routing: {{breaker_failures: 3, breaker_cooldown_s: {COOLDOWN_S}}}\n"
    procs: list[Process] = []
    try:
        for i in range(2):
            config = write_gateway(folder, upstreams, policy, extra_yaml=extra, prices=prices, name=f"replica{i}")
            procs.append(start_gateway(config))
        yield procs[0], procs[1]
    finally:
        for proc in procs:
            proc.stop()
        drop_namespace(url, ns)


@pytest.fixture()
def sims(simulator: Process, sim_b: Process) -> tuple[Process, Process]:
    for sim in (simulator, sim_b):
        httpx.post(sim.url + "/_sim/reset", timeout=5).raise_for_status()
    return simulator, sim_b


def client(gw: Process) -> OpenAI:
    return OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)


def fault(sim: Process, **spec: object) -> None:
    httpx.post(sim.url + "/_sim/faults", json=spec, timeout=5).raise_for_status()


def requests_seen(sim: Process) -> list[dict[str, Any]]:
    return httpx.get(sim.url + "/_sim/requests", params={"limit": 100}, timeout=5).json()


def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def call(gw: Process, stream: bool, **kwargs: Any) -> tuple[dict[str, str], dict[str, Any], str, str]:
    """One request; returns (response headers, assistant message to send back, finish reason, every
    byte of the body the client received)."""
    c = client(gw)
    if not stream:
        raw = c.chat.completions.with_raw_response.create(**kwargs)
        choice = raw.parse().choices[0]
        return dict(raw.headers), choice.message.model_dump(exclude_none=True), str(choice.finish_reason), raw.text
    with c.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        headers = dict(resp.headers)
        message, finish, seen = assemble_stream(resp.parse())
    return headers, message, finish, seen


def test_breaker_opened_by_one_replica_is_skipped_by_the_other(
    pair: tuple[Process, Process], sims: tuple[Process, Process]
) -> None:
    first, second = pair
    sim_a, _ = sims
    fault(sim_a, status=503, count=-1, model="kimi-k2.6")
    user = [{"role": "user", "content": "breaker across replicas"}]
    for _ in range(3):
        headers, *_ = call(first, False, model="breaker", messages=user)
        assert headers["x-gateway-upstream"] == "b/k2-br"
    assert "circuit breaker for a/k2-br opened" in first.output()
    opened = time.monotonic()
    # the other replica learns it within a sync interval, without a failure of its own
    assert wait_for(lambda: "circuit breaker for a/k2-br is open (another replica" in second.output(), 2.0)
    for stream in (False, True):
        headers, _, finish, _ = call(second, stream, model="breaker", messages=user)
        assert headers["x-gateway-upstream"] == "b/k2-br" and finish == "stop"
        assert "skipped a/k2-br" in headers["x-gateway-route-reason"]
    assert time.monotonic() - opened < COOLDOWN_S  # the skips above happened while it was open
    assert len(requests_seen(sim_a)) == 3  # the second replica never called the failing upstream
    httpx.delete(sim_a.url + "/_sim/faults", timeout=5).raise_for_status()
    time.sleep(max(0.0, COOLDOWN_S + 0.3 - (time.monotonic() - opened)))
    headers, *_ = call(second, False, model="breaker", messages=user)
    assert headers["x-gateway-upstream"] == "a/k2-br"  # cooled down on the second replica's clock too


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_loop_alternating_replicas_keeps_reasoning_and_prefix(
    pair: tuple[Process, Process], sims: tuple[Process, Process], stream: bool
) -> None:
    sim_a, sim_b = sims
    system = f"You are a careful agent ({'stream' if stream else 'whole'}). " + "Follow the rules. " * 300
    messages: list[Any] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Weather and time in Beijing, then Shanghai, then more?"},
    ]
    fault(sim_b, status=503)  # the first turn fails over from b (cheapest when cold) to a
    expected: list[str] = []
    turns = 6
    for turn in range(turns):
        gw = pair[turn % 2]  # every turn on the other process
        chunks = 2 + turn  # a different reasoning text every turn
        headers, message, finish, received = call(
            gw,
            stream,
            model="loop",
            messages=messages,
            tools=TOOLS,
            extra_body={"sim": {"tool_calls": 2, "reasoning_chunks": chunks}},
        )
        assert headers["x-gateway-upstream"] == "a/kimi-k2-thinking", (turn, headers["x-gateway-route-reason"])
        assert finish == "tool_calls"
        assert no_reasoning_keys(json.loads(received)) and FIRST_REASONING not in received
        expected.append(expected_reasoning(chunks))
        messages.append(message)
        assert len(message["tool_calls"]) == 2  # parallel calls
        for tool_call in message["tool_calls"]:
            messages.append({"role": "tool", "tool_call_id": tool_call["id"], "content": '{"ok": true}'})
        sent = requests_seen(sim_a)[-1]["body"]["messages"]
        assistants = [m for m in sent if m["role"] == "assistant"]
        assert all(m.get("tool_calls") for m in assistants)
        # what the other process kept is what went upstream, turn after turn
        assert [m["reasoning_content"] for m in assistants] == expected[:-1]
    headers, message, finish, received = call(
        pair[turns % 2],
        stream,
        model="loop",
        messages=messages,
        tools=TOOLS,
        extra_body={"sim": {"reasoning_chunks": 3}},
    )
    assert finish == "stop" and headers["x-gateway-upstream"] == "a/kimi-k2-thinking"
    assert no_reasoning_keys(json.loads(received)) and FIRST_REASONING not in received
    sent = requests_seen(sim_a)[-1]["body"]["messages"]
    assert [m["reasoning_content"] for m in sent if m["role"] == "assistant"] == expected
    assert len(requests_seen(sim_b)) == 1  # only the failed first attempt ever reached b
    # both processes restored kept reasoning (each turn's from the other process), never a placeholder
    for gw in pair:
        assert gw.metric("gateway_reasoning_restored_total", tenant="replicas", source="store") > 0
        assert gw.metric("gateway_reasoning_restored_total", tenant="replicas", source="placeholder") == 0
