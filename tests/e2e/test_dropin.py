"""The drop-in promise, end to end: the official openai SDK against ``kimi-gateway serve`` on loopback,
in front of the simulator's own HTTP server (a separate process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, write_gateway

KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
USER = [{"role": "user", "content": "Weather and time in Beijing?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("dropin")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    api_key_env: SIM_UPSTREAM_KEY
    models:
      kimi-k2-thinking: kimi-k2-thinking
      kimi-k2-thinking-turbo: kimi-k2-thinking-turbo
      k2-retired-0: kimi-k2-0711-preview
      k2-retired-1: kimi-k2-0711-preview
      k2-gone-0: kimi-k2-0905-preview
      k2-gone-1: kimi-k2-0905-preview
    timeouts: {{connect_s: 1, first_byte_s: 1, idle_s: 1, total_s: 3}}
  dead:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    models: [kimi-k2-thinking]
    timeouts: {{connect_s: 1, first_byte_s: 1, idle_s: 1, total_s: 3}}
"""
    policy = f"""\
tenant: tenant-a
keys: ["{hashed(KEY_A)}"]
models:
  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}
  k2-alias: {{candidates: [sim/kimi-k2-thinking-turbo]}}
  unreachable: {{candidates: [dead/kimi-k2-thinking]}}
  retiring-0: {{candidates: [sim/k2-retired-0, sim/kimi-k2-thinking-turbo], strategy: pinned}}
  retiring-1: {{candidates: [sim/k2-retired-1, sim/kimi-k2-thinking-turbo], strategy: pinned}}
  retired-alone-0: {{candidates: [sim/k2-gone-0]}}
  retired-alone-1: {{candidates: [sim/k2-gone-1]}}
"""
    config = write_gateway(folder, upstreams, policy, extra_yaml="max_body_bytes: 65536")
    (config.parent / "gateway-policies" / "tenant-b.yaml").write_text(
        f'tenant: tenant-b\nkeys: ["{hashed(KEY_B)}"]\nmodels:\n  b-only: {{candidates: [sim/kimi-k2-thinking]}}\n'
    )
    proc = start_gateway(config, env={"SIM_UPSTREAM_KEY": "sk-upstream-secret"})
    yield proc
    proc.stop()


@pytest.fixture()
def client(gateway: Process, sim: Process) -> OpenAI:
    return gateway.openai(KEY_A)


def sim_requests(sim: Process) -> list[dict]:
    return httpx.get(sim.url + "/_sim/requests").json()


# ---------------------------------------------------------------- happy paths


def test_non_stream_keeps_reasoning_and_usage(client: OpenAI, sim: Process) -> None:
    raw = client.chat.completions.with_raw_response.create(model="kimi-k2-thinking", messages=USER, max_tokens=2000)
    reply = raw.parse()
    message = reply.choices[0].message
    assert message.content
    assert getattr(message, "reasoning_content", None)
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert raw.headers["x-gateway-upstream"] == "sim/kimi-k2-thinking"
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-gateway-route-reason"]


def test_stream_reasoning_then_content(client: OpenAI) -> None:
    stream = client.chat.completions.create(model="kimi-k2-thinking", messages=USER, stream=True)
    order, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                order.append("reasoning")
            if delta.content:
                order.append("content")
            finish = choice.finish_reason or finish
    assert "reasoning" in order and "content" in order
    assert order.index("content") > max(i for i, k in enumerate(order) if k == "reasoning")
    assert finish == "stop"


def test_tools_parallel_calls_non_stream(client: OpenAI) -> None:
    reply = client.chat.completions.create(model="kimi-k2-thinking", messages=USER, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [c.id for c in calls] == ["get_weather:0", "get_time:1"]
    assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    assert getattr(choice.message, "reasoning_content", None)


def test_tools_parallel_calls_stream(client: OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="kimi-k2-thinking", messages=USER, tools=TOOLS, stream=True):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert [calls[i]["id"] for i in sorted(calls)] == ["get_weather:0", "get_time:1"]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls.values())


def test_models_lists_only_the_tenants_own(gateway: Process) -> None:
    a = gateway.openai(KEY_A)
    b = gateway.openai(KEY_B)
    assert sorted(m.id for m in a.models.list()) == [
        "k2-alias",
        "kimi-k2-thinking",
        "retired-alone-0",
        "retired-alone-1",
        "retiring-0",
        "retiring-1",
        "unreachable",
    ]
    assert [m.id for m in b.models.list()] == ["b-only"]


def test_upstream_gets_its_own_key_and_the_clients_bytes(client: OpenAI, sim: Process) -> None:
    extra = {"zeta_vendor_field": {"keep": True}, "thinking": {"type": "enabled"}}
    client.chat.completions.create(model="kimi-k2-thinking", messages=USER, extra_body=extra)
    [seen] = sim_requests(sim)
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert KEY_A not in json.dumps(seen)
    assert seen["body"]["zeta_vendor_field"] == {"keep": True}
    assert seen["body"]["thinking"] == {"type": "enabled"}


def test_virtual_name_is_rewritten_in_place(gateway: Process, sim: Process) -> None:
    body = b'{"zeta": 1, "model": "k2-alias", "messages": [{"role": "user", "content": "x"}], "after": [1, 2]}'
    assert post(gateway, body).status_code == 200
    [seen] = sim_requests(sim)
    assert seen["body"]["model"] == "kimi-k2-thinking-turbo"
    assert list(seen["body"]) == ["zeta", "model", "messages", "after"]


# ---------------------------------------------------------------- bad input


def post(gateway: Process, body: bytes | None, *, key: str | None = KEY_A, ctype: str | None = "application/json"):
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if ctype is not None:
        headers["Content-Type"] = ctype
    return httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=headers, timeout=10)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{broken", None),
        (b"[]", None),
        (b'"just a string"', None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "kimi-k2-thinking"}', "messages"),
        (b'{"model": "kimi-k2-thinking", "messages": {"role": "user"}}', "messages"),
        (b'{"model": "kimi-k2-thinking", "messages": [{"role": "user"}], "stream": "true"}', "stream"),
    ],
)
def test_bad_bodies_are_400(gateway: Process, body: bytes, param: str | None) -> None:
    error = assert_openai_error(post(gateway, body), 400)
    assert error["param"] == param


def test_model_the_tenant_may_not_use_is_404(gateway: Process) -> None:
    body = b'{"model": "b-only", "messages": [{"role": "user", "content": "x"}]}'
    error = assert_openai_error(post(gateway, body), 404)
    assert error["code"] == "model_not_found"
    assert "b-only" in error["message"]
    with pytest.raises(openai.NotFoundError):
        gateway.openai(KEY_A).chat.completions.create(model="b-only", messages=USER)


def test_body_over_limit_is_413(gateway: Process) -> None:
    big = json.dumps({"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x" * 70000}]})
    assert_openai_error(post(gateway, big.encode()), 413)


def test_chunked_body_over_limit_is_413(gateway: Process) -> None:
    def gen() -> Iterator[bytes]:
        yield b'{"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    resp = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=gen(),
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
    )
    assert_openai_error(resp, 413)


def test_wrong_content_type_is_415(gateway: Process) -> None:
    body = b'{"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}]}'
    error = assert_openai_error(post(gateway, body, ctype="text/plain"), 415)
    assert "text/plain" in error["message"]


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_key_is_401(gateway: Process, key: str | None) -> None:
    body = b'{"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}]}'
    resp = post(gateway, body, key=key)
    error = assert_openai_error(resp, 401)
    assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        gateway.openai("sk-wrong").models.list()


@pytest.mark.parametrize("authorization", ["Basic c2stdGVuYW50LWE6", "Bearer", "sk-tenant-a"])
def test_other_authorization_schemes_are_401(gateway: Process, authorization: str) -> None:
    body = b'{"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}]}'
    resp = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": authorization, "Content-Type": "application/json"},
    )
    assert_openai_error(resp, 401)


def test_unknown_path_and_method(gateway: Process) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/nope"), 404)
    resp = httpx.get(gateway.url + "/v1/chat/completions")
    assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "POST"


def test_health_ready_metrics(gateway: Process, client: OpenAI) -> None:
    client.chat.completions.create(model="kimi-k2-thinking", messages=USER)
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/readyz").json()["status"] == "ready"
    text = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_requests_total{model="kimi-k2-thinking",status="200",tenant="tenant-a"' in text
    assert "gateway_request_duration_seconds_bucket" in text
    assert "sk-tenant-a" not in text


# ---------------------------------------------------------------- upstream faults


def fault(sim: Process, **spec: object) -> None:
    httpx.post(sim.url + "/_sim/faults", json=spec).raise_for_status()


def test_upstream_429_keeps_retry_after(client: OpenAI, sim: Process) -> None:
    fault(sim, status=429, retry_after=7)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER)
    assert info.value.response.headers["retry-after"] == "7"
    assert "upstream 'sim'" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_5xx_is_502(client: OpenAI, sim: Process, stream: bool) -> None:
    fault(sim, status=503)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER, stream=stream)
    assert info.value.status_code == 502
    assert "503" in info.value.message


def test_upstream_refusing_connections_is_502(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="unreachable", messages=USER)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_connect"  # type: ignore[index]


def test_upstream_dropping_the_connection_is_502(client: OpenAI, sim: Process) -> None:
    fault(sim, drop=True, count=2)  # the gateway retries a dropped pooled connection once
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER)
    assert info.value.status_code == 502


def test_first_byte_timeout_is_504(client: OpenAI, sim: Process) -> None:
    fault(sim, stall_s=3)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER, stream=True)
    assert info.value.status_code == 504


def test_non_stream_total_timeout_is_504(client: OpenAI, sim: Process) -> None:
    fault(sim, stall_s=5)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER)
    assert info.value.status_code == 504


def test_cut_stream_ends_with_an_error_event(client: OpenAI, sim: Process) -> None:
    fault(sim, cut_after_events=4)
    received = 0
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(model="kimi-k2-thinking", messages=USER, stream=True):
            received += 1
    assert received >= 2
    assert "cut" in info.value.message or "broke" in info.value.message


def test_idle_stall_mid_stream_ends_with_an_error_event(client: OpenAI, sim: Process) -> None:
    fault(sim, stall_mid_s=3)
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(model="kimi-k2-thinking", messages=USER, stream=True):
            pass
    assert "sent nothing" in info.value.message


def test_upstream_4xx_keeps_status_and_message(client: OpenAI, sim: Process) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER, temperature=1.7)
    assert "temperature" in info.value.message
    assert "upstream 'sim'" in info.value.message


def test_client_disconnect_cancels_the_upstream_stream(gateway: Process, simulator: Process, tmp_path: Path) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    body = {
        "model": "kimi-k2-thinking",
        "messages": USER,
        "stream": True,
        "sim": {"reasoning_chunks": 400, "fault": {"stall_mid_s": 0.5}},
    }
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw())  # the stream is running; now hang up
    deadline = httpx.get(simulator.url + "/_sim/stats").json()
    import time

    for _ in range(50):
        deadline = httpx.get(simulator.url + "/_sim/stats").json()
        if deadline["cancelled"]:
            break
        time.sleep(0.05)
    assert deadline["cancelled"] == 1
    assert deadline["completed"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_retired_model_with_another_candidate_fails_over_within_the_request(
    client: OpenAI, gateway: Process, sim: Process, stream: bool
) -> None:
    model = f"retiring-{int(stream)}"  # its own retired candidate: each is marked dead once
    raw = client.chat.completions.with_raw_response.create(model=model, messages=USER, stream=stream)
    if stream:
        assert "[DONE]" in raw.http_response.read().decode()
    else:
        assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-upstream"] == "sim/kimi-k2-thinking-turbo"
    assert (
        f"failover to candidate 2 after sim/k2-retired-{int(stream)} (404 for the model: retired) failed"
        in raw.headers["x-gateway-route-reason"]
    )
    # afterwards the retired candidate is not even tried
    raw = client.chat.completions.with_raw_response.create(model=model, messages=USER, stream=stream)
    if stream:
        raw.http_response.read()
    assert raw.headers["x-gateway-upstream"] == "sim/kimi-k2-thinking-turbo"
    assert "404" in raw.headers["x-gateway-route-reason"]
    seen = [r["body"]["model"] for r in sim_requests(sim)]
    assert seen == ["kimi-k2-0711-preview", "kimi-k2-thinking-turbo", "kimi-k2-thinking-turbo"]
    assert gateway.output().count(f"candidate sim/k2-retired-{int(stream)} is skipped") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_retired_model_without_another_candidate_is_the_upstreams_404(
    client: OpenAI, gateway: Process, sim: Process, stream: bool
) -> None:
    model = f"retired-alone-{int(stream)}"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=USER, stream=stream)
    message = info.value.message
    assert "upstream 'sim'" in message and "kimi-k2-0905-preview" in message and "retired" in message
    assert info.value.body["code"] == "upstream_model_not_found"  # type: ignore[index]
    assert f"candidate sim/k2-gone-{int(stream)} is skipped" in gateway.output()
    # the only candidate is dead: the gateway says its configuration needs updating, without a call
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=USER, stream=stream)
    assert info.value.body["code"] == "model_unavailable"  # type: ignore[index]
    assert f"sim/k2-gone-{int(stream)}" in info.value.message
    assert len(sim_requests(sim)) == 1
