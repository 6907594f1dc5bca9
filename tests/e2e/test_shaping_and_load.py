"""Per-upstream request shaping through the real server, a failover that reshapes for the next
candidate, and vLLM load scraped from a real simulator's /metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway

KEY = "sk-shaping-tenant"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
USER = [{"role": "user", "content": "look it up"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("shaping")
    upstreams = f"""\
  ms:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking, kimi-k2.6, kimi-k3]
    shaping:
      kimi-k2-thinking: {{temperature: [0, 1], thinking: none, default_max_tokens: true, tool_choice_required: emulate}}
      kimi-k2.6: {{thinking: type, tool_choice_required: reject}}
      kimi-k3: {{thinking: effort}}
  plain:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k3]
"""
    policy = f"""\
tenant: shaping
keys: ["{hashed(KEY)}"]
default_max_tokens: 20000
models:
  k2: {{candidates: [ms/kimi-k2-thinking]}}
  k26: {{candidates: [ms/kimi-k2.6]}}
  k3: {{candidates: [ms/kimi-k3]}}
  fo: {{candidates: [ms/kimi-k2-thinking, plain/kimi-k3], strategy: pinned}}
"""
    config = write_gateway(folder, upstreams, policy)
    proc = start_gateway(config)
    yield proc
    proc.stop()


SENT: list[bytes] = []


@pytest.fixture()
def client(gateway: Process, sim: Process) -> OpenAI:
    SENT.clear()

    def record(request: httpx.Request) -> None:
        SENT.append(request.read())

    http = httpx.Client(event_hooks={"request": [record]})
    return gateway.openai(KEY, http_client=http)


def seen(sim: Process) -> list[dict[str, Any]]:
    return [r["body"] for r in httpx.get(sim.url + "/_sim/requests", params={"limit": 50}).json()]


def complete(client: OpenAI, stream: bool, **kwargs: Any) -> None:
    if stream:
        with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
            assert "[DONE]" in resp.read().decode()
    else:
        client.chat.completions.create(**kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_k2_thinking_request_is_shaped(client: OpenAI, sim: Process, stream: bool) -> None:
    # temperature 1.7 and tool_choice "required" are refused by Moonshot's K2; thinking is not a K2 field
    complete(
        client,
        stream,
        model="k2",
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.7,
        extra_body={"thinking": {"type": "enabled"}, "x_client_field": [1, 2]},
    )
    [body] = seen(sim)
    assert body["temperature"] == 1
    assert "thinking" not in body and "tool_choice" not in body
    assert body["max_tokens"] == 20000  # the tenant's default for a thinking model
    assert body["messages"][-1] == {"role": "user", "content": "Please select a tool to handle the current issue."}
    assert body["x_client_field"] == [1, 2]
    # every key the client sent keeps its place; removed ones are gone, added ones come last
    sent = [k for k in json.loads(SENT[-1]) if k not in ("thinking", "tool_choice")]
    assert list(body)[: len(sent)] == sent


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_k26_rejects_required_tool_choice_with_a_clear_400(client: OpenAI, sim: Process, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, stream, model="k26", messages=USER, tools=TOOLS, tool_choice="required")
    assert info.value.body["code"] == "unsupported_tool_choice"  # type: ignore[index]
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
    assert seen(sim) == []  # refused before any upstream call
    complete(client, stream, model="k26", messages=USER, extra_body={"reasoning_effort": "none"})
    assert seen(sim)[-1]["thinking"] == {"type": "disabled"}


def test_k3_takes_reasoning_effort(client: OpenAI, sim: Process) -> None:
    client.chat.completions.create(model="k3", messages=USER, extra_body={"thinking": {"type": "enabled"}})
    [body] = seen(sim)
    assert body["reasoning_effort"] == "high" and "thinking" not in body


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_failover_reshapes_the_clients_body_for_the_next_candidate(client: OpenAI, sim: Process, stream: bool) -> None:
    httpx.post(sim.url + "/_sim/faults", json={"status": 503}).raise_for_status()
    complete(client, stream, model="fo", messages=USER, tools=TOOLS, tool_choice="required", temperature=0.5)
    first, second = seen(sim)
    assert first["model"] == "kimi-k2-thinking" and "tool_choice" not in first and len(first["messages"]) == 2
    # K3 takes "required" as sent: the nudge and the K2 shaping did not leak into its request
    assert second["model"] == "kimi-k3"
    assert second["tool_choice"] == "required" and second["messages"] == USER
    assert "max_tokens" not in second


# ---------------------------------------------------------------- vLLM load


def test_queueing_vllm_is_scraped_and_looks_slow(tmp_path: Any) -> None:
    vllm = start_simulator(tmp_path, "vllm", "--max-concurrency", "1", "--ttft-ms", "1500")
    try:
        upstreams = f"""\
  vl:
    kind: openai
    base_url: {vllm.url}/v1
    models: [kimi-k2-thinking]
    vllm_metrics: true
    metrics_interval_s: 0.2
    prior: {{ttft_ms: 200, tokens_per_s: 50}}
  ms: {{kind: simulated, profile: moonshot-standard, models: [kimi-k2-thinking]}}
"""
        policy = f"""\
tenant: load
keys: ["{hashed(KEY)}"]
models:
  k2: {{candidates: [vl/kimi-k2-thinking, ms/kimi-k2-thinking], slo: {{ttft_ms: 3000}}}}
"""
        config = write_gateway(
            tmp_path,
            upstreams,
            policy,
            name="load",
            prices={"vl/kimi-k2-thinking": {"input_miss": "0.1", "input_hit": "0.01", "output": "0.4"}},
        )
        gw = start_gateway(config)
        try:

            def plan() -> dict[str, Any]:
                body = {"model": "k2", "messages": USER}
                return httpx.post(
                    gw.url + "/v1/route/explain", json=body, headers={"Authorization": f"Bearer {KEY}"}
                ).json()

            assert plan()["plan"][0]["candidate"] == "vl/kimi-k2-thinking"  # idle and cheapest
            # three slow requests straight at the vLLM: one runs, two wait in its queue
            body = {"model": "kimi-k2-thinking", "messages": USER, "max_tokens": 5}
            threads = [
                threading.Thread(
                    target=httpx.post, args=(vllm.url + "/v1/chat/completions",), kwargs={"json": body, "timeout": 20}
                )
                for _ in range(3)
            ]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if 'gateway_vllm_waiting_requests{upstream="vl"} 2.0' in httpx.get(gw.url + "/metrics").text:
                    break
                time.sleep(0.1)
            loaded = plan()
            assert loaded["plan"][0]["candidate"] == "ms/kimi-k2-thinking", loaded
            vl = next(c for c in loaded["plan"] if c["candidate"] == "vl/kimi-k2-thinking")
            assert vl["expected_ttft_ms"] > 3000 and not vl["meets_slo"]
            for t in threads:
                t.join(20)
        finally:
            gw.stop()
    finally:
        vllm.stop()
