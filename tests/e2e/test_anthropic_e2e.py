"""The Anthropic Messages API in, end to end: the official anthropic SDK against ``kimi-gateway
serve`` in front of the simulator process (which speaks chat/completions only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import Anthropic

from tests.conftest import Process, hashed, start_gateway, write_gateway

KEY = "sk-anthropic-tenant"
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "get_time",
        "description": "Local time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
]
USER = [{"role": "user", "content": "Weather and time in Beijing?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("anthropic")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
"""
    policy = f"""\
tenant: claude-code-users
keys: ["{hashed(KEY)}"]
models:
  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}
"""
    proc = start_gateway(write_gateway(folder, upstreams, policy))
    yield proc
    proc.stop()


@pytest.fixture()
def client(gateway: Process, sim: Process) -> Anthropic:
    return gateway.anthropic(KEY)


def sim_bodies(sim: Process) -> list[dict[str, Any]]:
    return [r["body"] for r in httpx.get(sim.url + "/_sim/requests").json()]


def test_non_stream_message_with_thinking_text_and_usage(client: Anthropic, sim: Process) -> None:
    raw = client.messages.with_raw_response.create(
        model="kimi-k2-thinking", max_tokens=4000, system="Answer briefly.", messages=USER
    )
    message = raw.parse()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking and message.content[1].text
    assert message.stop_reason == "end_turn" and message.role == "assistant"
    assert message.model == "kimi-k2-thinking"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-gateway-upstream"] == "sim/kimi-k2-thinking"
    [sent] = sim_bodies(sim)
    assert sent["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert sent["max_tokens"] == 4000


def test_stream_helpers_assemble_the_message(client: Anthropic, sim: Process) -> None:
    system = [{"type": "text", "text": "Answer"}, {"type": "text", "text": "briefly."}]
    with client.messages.stream(model="kimi-k2-thinking", max_tokens=4000, system=system, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[-1].type == "text" and final.content[-1].text == text
    assert final.content[0].type == "thinking" and final.content[0].thinking
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    assert sim_bodies(sim)[-1]["messages"][0] == {"role": "system", "content": "Answer\nbriefly."}


def test_stream_event_sequence_is_anthropics(gateway: Process, sim: Process) -> None:
    body = {"model": "kimi-k2-thinking", "max_tokens": 4000, "messages": USER, "stream": True}
    reply = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert reply.headers["content-type"] == "text/event-stream"
    kinds = [line[7:] for line in reply.text.splitlines() if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    assert "[DONE]" not in reply.text and "chat.completion" not in reply.text


def test_cached_prompt_tokens_become_cache_read_input_tokens(client: Anthropic) -> None:
    long_user = [{"role": "user", "content": "Summarize the history of tea. " * 150}]
    first = client.messages.create(model="kimi-k2-thinking", max_tokens=4000, messages=long_user)
    second = client.messages.create(model="kimi-k2-thinking", max_tokens=4000, messages=long_user)
    assert not first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens and second.usage.cache_read_input_tokens > 0
    total = first.usage.input_tokens
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total


def _turn(client: Anthropic, messages: list[Any], stream: bool) -> Any:
    kwargs: dict[str, Any] = {"model": "kimi-k2-thinking", "max_tokens": 4000, "tools": TOOLS, "messages": messages}
    if stream:
        with client.messages.stream(**kwargs) as s:
            return s.get_final_message()
    return client.messages.create(**kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop_over_messages(client: Anthropic, sim: Process, stream: bool) -> None:
    messages: list[Any] = list(USER)
    first = _turn(client, messages, stream)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.id) for u in uses] == [("get_weather", "get_weather:0"), ("get_time", "get_time:1")]
    assert all(isinstance(u.input, dict) and u.input for u in uses)
    assert first.content[0].type == "thinking"
    # the assistant turn goes back as it came (thinking included), then the results
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    results = [{"type": "tool_result", "tool_use_id": u.id, "content": f"result of {u.name}"} for u in uses]
    messages.append({"role": "user", "content": results})
    second = _turn(client, messages, stream)
    assert second.stop_reason == "end_turn"
    assert second.content[-1].type == "text" and second.content[-1].text
    sent = sim_bodies(sim)[-1]
    assistant = sent["messages"][1]
    assert assistant["reasoning_content"] == first.content[0].thinking  # K2 needs it back
    assert [c["id"] for c in assistant["tool_calls"]] == ["get_weather:0", "get_time:1"]
    assert [m["role"] for m in sent["messages"][2:]] == ["tool", "tool"]
    assert sent["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]


def test_tool_choice_maps_to_openai(client: Anthropic, sim: Process) -> None:
    client.messages.create(
        model="kimi-k2-thinking", max_tokens=100, tools=TOOLS, tool_choice={"type": "auto"}, messages=USER
    )
    assert sim_bodies(sim)[-1]["tool_choice"] == "auto"


def test_bearer_auth_works_too(gateway: Process) -> None:
    body = {"model": "kimi-k2-thinking", "max_tokens": 100, "messages": USER}
    reply = httpx.post(gateway.url + "/v1/messages", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and reply.json()["type"] == "message"


# ------------------------------------------------------------------------------------- errors


def _error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    return body["error"]


def test_missing_max_tokens_is_an_anthropic_400(gateway: Process) -> None:
    reply = httpx.post(
        gateway.url + "/v1/messages", json={"model": "kimi-k2-thinking", "messages": USER}, headers={"x-api-key": KEY}
    )
    assert reply.status_code == 400
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in reply.json()["error"]["message"]


def test_bad_json_is_an_anthropic_400(gateway: Process) -> None:
    reply = httpx.post(
        gateway.url + "/v1/messages",
        content=b'{"model": ',
        headers={"x-api-key": KEY, "content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": reply.json()["error"]["message"]},
    }
    assert "not valid JSON" in reply.json()["error"]["message"]


def test_wrong_key_is_an_anthropic_401(gateway: Process) -> None:
    client = gateway.anthropic("sk-wrong")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="kimi-k2-thinking", max_tokens=10, messages=USER)
    assert _error_of(caught.value)["type"] == "authentication_error"


def test_unknown_model_is_an_anthropic_404(client: Anthropic, sim: Process) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-opus-4", max_tokens=10, messages=USER)
    error = _error_of(caught.value)
    assert error["type"] == "not_found_error" and "claude-opus-4" in error["message"]
    assert sim_bodies(sim) == []


def test_invalid_tool_is_an_anthropic_400_naming_it(client: Anthropic, sim: Process) -> None:
    bad = [{"name": "Read", "description": "a schema that is not an object", "input_schema": {"type": "string"}}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="kimi-k2-thinking", max_tokens=10, tools=bad, messages=USER)
    assert "tools[0] ('Read'): input_schema must be a JSON Schema" in _error_of(caught.value)["message"]
    assert sim_bodies(sim) == []


def test_upstream_error_keeps_its_status_in_anthropic_shape(client: Anthropic, sim: Process) -> None:
    httpx.post(sim.url + "/_sim/faults", json={"status": 429})
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="kimi-k2-thinking", max_tokens=10, messages=USER)
    assert _error_of(caught.value)["type"] == "rate_limit_error"


def test_stream_cut_ends_with_an_anthropic_error_event(client: Anthropic, sim: Process) -> None:
    httpx.post(sim.url + "/_sim/faults", json={"cut_after_events": 4})
    with pytest.raises(anthropic.APIStatusError) as caught:
        for _ in client.messages.create(model="kimi-k2-thinking", max_tokens=4000, messages=USER, stream=True):
            pass
    assert "cut" in str(caught.value) or "broke" in str(caught.value)


def test_count_tokens_answers_without_calling_the_upstream(client: Anthropic, sim: Process) -> None:
    short = client.messages.count_tokens(model="kimi-k2-thinking", messages=USER)
    long = client.messages.count_tokens(model="kimi-k2-thinking", messages=USER, tools=TOOLS, system="Be brief.")
    assert 0 < short.input_tokens < long.input_tokens
    assert sim_bodies(sim) == []
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=USER)


def test_a_claude_code_shaped_request_is_served(gateway: Process, sim: Process) -> None:
    """What Claude Code sends: block system prompts and tools with cache_control, thinking settings,
    metadata.user_id, beta headers and ``?beta=true``."""
    cache = {"type": "ephemeral"}
    body = {
        "model": "kimi-k2-thinking",
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "temperature": 1,
        "metadata": {"user_id": "user_abc_account__session_1"},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": cache}],
        "tools": [{**TOOLS[0], "cache_control": cache}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": cache}]}],
    }
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"}
    reply = httpx.post(gateway.url + "/v1/messages?beta=true", json=body, headers=headers)
    assert reply.status_code == 200 and "event: message_stop" in reply.text
    sent = sim_bodies(sim)[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "You are Claude Code."},
        {"role": "user", "content": "hi"},
    ]
    assert sent["user"] == "user_abc_account__session_1"
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {k: TOOLS[0][k] for k in ("name", "description")} | {"parameters": TOOLS[0]["input_schema"]},
        }
    ]
    assert "thinking" not in sent and "metadata" not in sent
