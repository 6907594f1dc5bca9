"""The router end to end: the real gateway process in front of two real simulator processes.

Prefix affinity in a tool loop, failover order and the circuit breaker with the simulator's
injected faults, a 404-retired candidate, and the x-gateway-max-latency-ms header.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.waiting import wait_until

KEY = "sk-routing-tenant"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
]


@pytest.fixture(scope="module")
def sim_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_simulator(tmp_path_factory.mktemp("sim-b"), "instant")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process, sim_b: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("routing")
    timeouts = "timeouts: {connect_s: 1, first_byte_s: 1, idle_s: 2, total_s: 3}"
    upstreams = f"""\
  a:
    kind: openai
    base_url: {simulator.url}/v1
    models: {{kimi-k2-thinking: kimi-k2-thinking, k2-fo: kimi-k2-thinking, k2-br: kimi-k2.6,
              k2-old: kimi-k2-0711-preview, k2-t0: kimi-k2-thinking, k2-t1: kimi-k2-thinking, k2-ra: kimi-k2-thinking,
              k2-rp: kimi-k2-thinking}}
    {timeouts}
  b:
    kind: openai
    base_url: {sim_b.url}/v1
    models: {{kimi-k2-thinking: kimi-k2-thinking, k2-fo: kimi-k2-thinking, k2-br: kimi-k2-thinking,
              k2-t0: kimi-k2-thinking, k2-t1: kimi-k2-thinking, k2-ra: kimi-k2-thinking, k2-rp: kimi-k2-thinking}}
    {timeouts}
  down:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    models: [k2-fo]
    {timeouts}
"""
    policy = f"""\
tenant: routing
keys: ["{hashed(KEY)}"]
models:
  loop: {{candidates: [a/kimi-k2-thinking, b/kimi-k2-thinking], strategy: cost}}
  failover: {{candidates: [down/k2-fo, a/k2-fo, b/k2-fo], strategy: pinned}}
  breaker: {{candidates: [a/k2-br, b/k2-br], strategy: pinned}}
  timeouts-0: {{candidates: [a/k2-t0, b/k2-t0], strategy: pinned}}
  timeouts-1: {{candidates: [a/k2-t1, b/k2-t1], strategy: pinned}}
  retry-after: {{candidates: [a/k2-ra, b/k2-ra], strategy: pinned}}
  retiring: {{candidates: [a/k2-old, b/k2-fo], strategy: balanced}}
  reprobe: {{candidates: [a/k2-rp, b/k2-rp], strategy: pinned}}
"""
    # b is cheaper on a cold prompt but its cache hits cost almost as much as a miss
    prices = {"b/kimi-k2-thinking": {"input_miss": "0.50", "input_hit": "0.45", "output": "2.50"}}
    extra = "routing: {breaker_failures: 3, breaker_cooldown_s: 1.5, retired_probe_s: 1}"
    config = write_gateway(folder, upstreams, policy, extra_yaml=extra, prices=prices)
    proc = start_gateway(config)
    yield proc
    proc.stop()


@pytest.fixture()
def sims(simulator: Process, sim_b: Process) -> tuple[Process, Process]:
    for sim in (simulator, sim_b):
        httpx.post(sim.url + "/_sim/reset", timeout=5).raise_for_status()
    return simulator, sim_b


@pytest.fixture()
def client(gateway: Process) -> OpenAI:
    return gateway.openai(KEY)


def fault(sim: Process, **spec: object) -> None:
    httpx.post(sim.url + "/_sim/faults", json=spec).raise_for_status()


def requests_seen(sim: Process) -> list[dict[str, Any]]:
    return httpx.get(sim.url + "/_sim/requests", params={"limit": 100}).json()


def cached_of(usage: Any) -> int:
    data = usage.model_dump()
    return int(data.get("cached_tokens") or (data.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _turn(client: OpenAI, messages: list[dict[str, Any]], stream: bool) -> tuple[str, dict[str, Any], int]:
    """One tool-loop turn; returns the upstream that served it, the assistant message, cached tokens."""
    kwargs: dict[str, Any] = {"model": "loop", "messages": messages, "tools": TOOLS, "max_tokens": 4000}
    kwargs["extra_body"] = {"sim": {"tool_calls": 1}}
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        completion = raw.parse()
        message = completion.choices[0].message.model_dump(exclude_none=True)
        assert completion.usage is not None
        return raw.headers["x-gateway-upstream"], message, cached_of(completion.usage)
    kwargs["stream_options"] = {"include_usage": True}
    with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        upstream = resp.headers["x-gateway-upstream"]
        calls: dict[int, dict[str, Any]] = {}
        content, reasoning, usage = "", "", None
        for chunk in resp.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta.model_dump(exclude_none=True)
                content += delta.get("content") or ""
                reasoning += delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or ():
                    entry = calls.setdefault(
                        call["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                    entry["id"] = call.get("id") or entry["id"]
                    fn = call.get("function") or {}
                    entry["function"]["name"] += fn.get("name") or ""
                    entry["function"]["arguments"] += fn.get("arguments") or ""
    assert usage is not None
    message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": list(calls.values()),
    }
    return upstream, message, cached_of(usage)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_tool_loop_stays_on_the_upstream_holding_its_prefix(
    client: OpenAI, sims: tuple[Process, Process], stream: bool
) -> None:
    sim_a, sim_b = sims
    system = f"You are a careful coding agent ({'stream' if stream else 'whole'}). " + "Follow the rules. " * 300
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Find the bug in the parser."},
    ]
    fault(sim_b, status=503)  # the first turn fails over from b (cheapest when cold) to a
    served: list[str] = []
    cached: list[int] = []
    for turn in range(6):
        upstream, message, hits = _turn(client, messages, stream)
        served.append(upstream)
        cached.append(hits)
        messages.append(message)
        for call in message["tool_calls"]:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"file contents {turn} " * 40})
    assert served == ["a/kimi-k2-thinking"] * 6, served
    assert cached[0] == 0
    assert all(later > earlier for earlier, later in itertools.pairwise(cached)), cached
    assert len(requests_seen(sim_b)) == 1  # only the failed first attempt ever reached b
    # what the gateway forwarded turn after turn starts with the same bytes: the prefix is stable
    bodies = [r["body"] for r in requests_seen(sim_a)]
    for earlier, later in itertools.pairwise(bodies):
        assert later["messages"][: len(earlier["messages"])] == earlier["messages"]


def test_cost_route_explains_the_cache_it_expects(client: OpenAI, sims: tuple[Process, Process]) -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Explain caching. " * 400}]
    messages.append({"role": "user", "content": "go"})
    raw = client.chat.completions.with_raw_response.create(model="loop", messages=messages)  # type: ignore[arg-type]
    assert raw.headers["x-gateway-upstream"] == "b/kimi-k2-thinking"  # cold: b's miss price is lower
    assert raw.headers["x-gateway-route-reason"].startswith("cost: lowest expected cost $")
    messages += [
        {"role": "assistant", "content": raw.parse().choices[0].message.content},
        {"role": "user", "content": "more"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="loop", messages=messages)  # type: ignore[arg-type]
    # b holds the prefix but its hit price is close to a's miss price: a cold a is still not cheaper
    assert raw.headers["x-gateway-upstream"] == "b/kimi-k2-thinking"
    assert "cached tokens expected" in raw.headers["x-gateway-route-reason"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_failover_order_connect_error_then_5xx(client: OpenAI, sims: tuple[Process, Process], stream: bool) -> None:
    sim_a, sim_b = sims
    fault(sim_a, status=500)
    raw = client.chat.completions.with_raw_response.create(
        model="failover", messages=[{"role": "user", "content": "hi"}], stream=stream
    )
    if stream:
        text = raw.http_response.read().decode()
        assert "[DONE]" in text
    assert raw.headers["x-gateway-upstream"] == "b/k2-fo"
    assert raw.headers["x-gateway-route-reason"] == (
        "pinned: failover to candidate 3 after down/k2-fo (connect), a/k2-fo (500) failed"
    )
    assert len(requests_seen(sim_a)) == 1 and len(requests_seen(sim_b)) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_failover_on_429_and_first_byte_timeout(client: OpenAI, sims: tuple[Process, Process], stream: bool) -> None:
    sim_a, sim_b = sims
    model = f"timeouts-{int(stream)}"  # its own candidates: breaker state of other tests stays out
    fault(sim_a, status=429, retry_after=3)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-gateway-upstream"] == f"b/k2-t{int(stream)}"
    # a silent upstream: no first byte within first_byte_s (1 s) for a stream, total_s (3 s) whole
    fault(sim_a, stall_s=1.5 if stream else 3.5)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "y"}], stream=stream
    )
    assert raw.headers["x-gateway-upstream"] == f"b/k2-t{int(stream)}"
    assert "failover to candidate 2 after a/" in raw.headers["x-gateway-route-reason"]
    if stream:
        assert "[DONE]" in raw.http_response.read().decode()
    assert len(requests_seen(sim_a)) == 2 and len(requests_seen(sim_b)) == 2


def test_retry_after_is_honoured_when_no_candidate_is_left(client: OpenAI, sims: tuple[Process, Process]) -> None:
    sim_a, sim_b = sims
    fault(sim_a, status=429, retry_after=7)
    fault(sim_b, status=429, retry_after=9)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="retry-after", messages=[{"role": "user", "content": "z"}])
    assert info.value.response.headers["retry-after"] == "9"  # the last candidate's wait
    assert info.value.response.headers["x-gateway-upstream"] == "b/k2-ra"
    assert "failover to candidate 2 after a/k2-ra" in info.value.response.headers["x-gateway-route-reason"]
    assert len(requests_seen(sim_a)) == 1 and len(requests_seen(sim_b)) == 1


def test_breaker_opens_skips_and_closes_after_cooldown(
    client: OpenAI, gateway: Process, sims: tuple[Process, Process]
) -> None:
    sim_a, _ = sims
    fault(sim_a, status=503, count=-1, model="kimi-k2.6")
    user = [{"role": "user", "content": "breaker"}]
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="breaker", messages=user)  # type: ignore[arg-type]
        assert raw.headers["x-gateway-upstream"] == "b/k2-br"
    assert len(requests_seen(sim_a)) == 3
    assert "circuit breaker for a/k2-br opened" in gateway.output()
    raw = client.chat.completions.with_raw_response.create(model="breaker", messages=user)  # type: ignore[arg-type]
    assert raw.headers["x-gateway-upstream"] == "b/k2-br"
    assert "skipped a/k2-br" in raw.headers["x-gateway-route-reason"]
    assert len(requests_seen(sim_a)) == 3  # open breaker: a was not called
    httpx.delete(sim_a.url + "/_sim/faults").raise_for_status()
    time.sleep(1.6)
    raw = client.chat.completions.with_raw_response.create(model="breaker", messages=user)  # type: ignore[arg-type]
    assert raw.headers["x-gateway-upstream"] == "a/k2-br"  # cooled down, a answers, the breaker closes
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_breaker_opened_total{candidate="a/k2-br"} 1.0' in metrics
    assert 'gateway_failovers_total{candidate="a/k2-br",kind="503"}' in metrics


def retired(gateway: Process) -> dict[str, float]:
    return httpx.get(gateway.url + "/readyz").json()["retired"]


def test_retired_candidate_is_skipped_then_probed_with_a_growing_backoff(
    client: OpenAI, gateway: Process, sims: tuple[Process, Process]
) -> None:
    sim_a, _ = sims
    # the 404 costs the app nothing: the same request moves on to the next candidate
    raw = client.chat.completions.with_raw_response.create(
        model="retiring", messages=[{"role": "user", "content": "old"}], stream=True
    )
    assert "[DONE]" in raw.http_response.read().decode()
    assert raw.headers["x-gateway-upstream"] == "b/k2-fo"
    assert "after a/k2-old (404 for the model: retired) failed" in raw.headers["x-gateway-route-reason"]
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(
            model="retiring", messages=[{"role": "user", "content": "old"}], stream=stream
        )
        assert raw.headers["x-gateway-upstream"] == "b/k2-fo"
        assert "skipped a/k2-old (404 for the model: retired)" in raw.headers["x-gateway-route-reason"]
    assert len(requests_seen(sim_a)) == 1
    assert 0 < retired(gateway)["a/k2-old"] <= 1
    assert gateway.output().count("candidate a/k2-old is skipped, probed again in 1 s") == 1
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_dead_candidates_total{candidate="a/k2-old"} 1.0' in metrics
    assert 'gateway_candidate_retired{candidate="a/k2-old"} 1.0' in metrics
    assert 'gateway_failovers_total{candidate="a/k2-old",kind="404"} 1.0' in metrics
    assert 'gateway_breaker_opened_total{candidate="a/k2-old"}' not in metrics  # dead, not unhealthy


def test_a_retired_candidate_is_tried_again_with_a_growing_backoff_until_it_answers(
    client: OpenAI, gateway: Process, sims: tuple[Process, Process]
) -> None:
    sim_a, _ = sims
    gone = {"status": 404, "error_type": "resource_not_found_error", "message": "Not found the model kimi-k2-thinking"}
    fault(sim_a, **gone, count=2)  # two 404s, as during a deploy; then the model is back
    asked = itertools.count()

    def ask() -> str:  # a new prompt each time: no cached prefix keeps the request where the last one went
        user = [{"role": "user", "content": f"probe {next(asked)}"}]
        raw = client.chat.completions.with_raw_response.create(model="reprobe", messages=user)  # type: ignore[arg-type]
        return raw.headers["x-gateway-upstream"]

    assert ask() == "b/k2-rp"  # the first 404 fails over
    assert 0 < retired(gateway)["a/k2-rp"] <= 1
    assert ask() == "b/k2-rp" and len(requests_seen(sim_a)) == 1  # skipped while retired
    wait_until(lambda: retired(gateway)["a/k2-rp"] == 0, timeout=5)
    assert ask() == "b/k2-rp"  # tried again: the second 404, and out for twice as long
    assert len(requests_seen(sim_a)) == 2
    assert 1 < retired(gateway)["a/k2-rp"] <= 2
    assert "candidate a/k2-rp is skipped, probed again in 2 s" in gateway.output()
    wait_until(lambda: retired(gateway)["a/k2-rp"] == 0, timeout=5)
    assert ask() == "a/k2-rp"  # answered: back for good
    assert "a/k2-rp" not in retired(gateway)
    assert 'gateway_candidate_retired{candidate="a/k2-rp"} 0.0' in httpx.get(gateway.url + "/metrics").text


MAX_LATENCY_CASES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    "messages": ("/v1/messages", {"max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}),
    "responses": ("/v1/responses", {"input": "x", "store": False}),
}


@pytest.mark.parametrize("endpoint", sorted(MAX_LATENCY_CASES))
def test_malformed_max_latency_header_is_a_400_on_every_endpoint(
    gateway: Process, sims: tuple[Process, Process], endpoint: str
) -> None:
    path, body = MAX_LATENCY_CASES[endpoint]
    auth = {"x-api-key": KEY} if endpoint == "messages" else {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(
        gateway.url + path, json={"model": "loop", **body}, headers={**auth, "x-gateway-max-latency-ms": "soon"}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "x-gateway-max-latency-ms" in error["message"]
    if endpoint == "messages":  # Anthropic's shape: no param, the type says what it is
        assert resp.json()["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["param"] == "x-gateway-max-latency-ms"
    assert not requests_seen(sims[0]) and not requests_seen(sims[1])  # refused before any upstream call
    fine = httpx.post(
        gateway.url + path, json={"model": "loop", **body}, headers={**auth, "x-gateway-max-latency-ms": "20000"}
    )
    assert fine.status_code == 200, fine.text


def test_budget_exhaustion_serves_a_cheaper_candidate_whole(tmp_path: Path, simulator: Process) -> None:
    httpx.post(simulator.url + "/_sim/reset").raise_for_status()
    upstreams = f"""\
  a:
    kind: openai
    base_url: {simulator.url}/v1
    models: {{k2: kimi-k2-thinking, k2t: kimi-k2-thinking-turbo}}
"""
    policy = f"""\
tenant: budget
keys: ["{hashed(KEY)}"]
models:
  m: {{candidates: [a/k2t, a/k2], strategy: latency}}
budget: {{daily_usd: '0.05', when_exhausted: downgrade, min_max_tokens: 256}}
"""
    prices = {"a/k2t": {"input_miss": "1.15", "input_hit": "0.15", "output": "8.00"}}
    config = write_gateway(tmp_path, upstreams, policy, name="budget", prices=prices)
    proc = start_gateway(config)
    try:
        client = proc.openai(KEY)
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": f"spend {stream}"}], max_tokens=10000, stream=stream
            )
            raw.http_response.read()
            # turbo's worst case ($0.08) does not fit $0.05; standard's ($0.025) does, at full max_tokens
            assert raw.headers["x-gateway-upstream"] == "a/k2"
            assert raw.headers["x-gateway-route-reason"].startswith(
                "budget: a/k2t does not fit the remaining budget at max_tokens 10000, a/k2 does; latency:"
            )
        assert [r["body"]["max_tokens"] for r in requests_seen(simulator)] == [10000, 10000]
    finally:
        proc.stop()
