"""Reasoning ``strip`` over the Anthropic Messages API: no thinking block, thinking event or
reasoning text reaches the client on any path (stream, non-stream, errors, ``<think>`` text of a
parserless vLLM), and a Claude Code tool loop still gets the original reasoning back upstream on
every assistant tool-call message (asserted on what the simulator received)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import Anthropic

from gateway.tools.aliases import alias_of
from simulator.profiles import PROFILES
from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.test_reasoning_modes import FIRST_REASONING, expected_reasoning

KEY = "sk-anthropic-strip"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
MCP = "mcp__files__read.file"
TOOLS = [{"name": n, "description": f"tool {n}", "input_schema": SCHEMA} for n in ("LS", MCP, "Bash")]
USER = [{"role": "user", "content": "What is in this folder?"}]
DEFAULT_REASONING = expected_reasoning(PROFILES["instant"].reasoning_chunks)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process, raw_vllm: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("anthropic-strip")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
  raw:
    kind: openai
    base_url: {raw_vllm.url}/v1
    reasoning_field: reasoning
    think_in_content: true
    tool_call_markers: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
"""
    policy = f"""\
tenant: anthropic-strip
keys: ["{hashed(KEY)}"]
models:
  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}
  k2-raw: {{candidates: [raw/kimi-k2-thinking]}}
reasoning: {{mode: strip}}
"""
    proc = start_gateway(write_gateway(folder, upstreams, policy))
    yield proc
    proc.stop()


@pytest.fixture()
def client(gateway: Process, sim: Process) -> Anthropic:
    return gateway.anthropic(KEY)


def leaks(text: str) -> bool:
    """Whether raw response bytes carry any reasoning: a thinking block or delta (``"thinking"``,
    ``"thinking_delta"``), a reasoning field, ``<think>`` tags or the reasoning text itself."""
    return any(s in text for s in ('"thinking', '"reasoning', "think>", FIRST_REASONING))


def post(gateway: Process, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=10)


@pytest.mark.parametrize("model", ["kimi-k2-thinking", "k2-raw"], ids=["moonshot", "think-in-content"])
def test_strip_non_stream_message_has_no_thinking_block(
    gateway: Process, client: Anthropic, raw_vllm: Process, model: str
) -> None:
    reply = post(gateway, {"model": model, "max_tokens": 4000, "messages": USER})
    assert reply.status_code == 200 and not leaks(reply.text), reply.text[:400]
    message = client.messages.create(model=model, max_tokens=4000, messages=USER)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    assert message.usage.output_tokens > 0  # the reasoning tokens are still billed and reported


@pytest.mark.parametrize("model", ["kimi-k2-thinking", "k2-raw"], ids=["moonshot", "think-in-content"])
def test_strip_stream_sends_no_thinking_events(
    gateway: Process, client: Anthropic, raw_vllm: Process, model: str
) -> None:
    reply = post(gateway, {"model": model, "max_tokens": 4000, "messages": USER, "stream": True})
    assert reply.status_code == 200 and "event: message_stop" in reply.text
    assert not leaks(reply.text), reply.text[:400]
    kinds = [line[7:] for line in reply.text.splitlines() if line.startswith("event: ")]
    assert kinds.count("content_block_start") == 1  # the text block only
    with client.messages.stream(model=model, max_tokens=4000, messages=USER) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.content[0].text


def test_strip_stream_cut_inside_the_reasoning_ends_with_an_error_and_no_reasoning(
    gateway: Process, sim: Process
) -> None:
    httpx.post(sim.url + "/_sim/faults", json={"cut_after_events": 6})  # role chunk + 5 reasoning chunks
    reply = post(gateway, {"model": "kimi-k2-thinking", "max_tokens": 4000, "messages": USER, "stream": True})
    assert reply.status_code == 200 and "event: error" in reply.text
    assert not leaks(reply.text), reply.text[:400]


@pytest.mark.parametrize(
    "fault", [{"status": 503}, {"status": 400, "message": "bad request"}, {"drop": True, "count": 2}]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_error_answers_carry_no_reasoning(
    gateway: Process, sim: Process, fault: dict[str, Any], stream: bool
) -> None:
    httpx.post(sim.url + "/_sim/faults", json=fault)
    reply = post(gateway, {"model": "kimi-k2-thinking", "max_tokens": 4000, "messages": USER, "stream": stream})
    assert reply.status_code >= 400
    body = reply.json()
    assert body["type"] == "error" and body["error"]["message"]
    assert not leaks(reply.text), reply.text


def _turn(client: Anthropic, messages: list[Any], stream: bool) -> tuple[Any, str]:
    """One request: the final message, and its JSON as the client got it."""
    kwargs: dict[str, Any] = {"model": "kimi-k2-thinking", "max_tokens": 4000, "tools": TOOLS, "messages": messages}
    if stream:
        with client.messages.stream(**kwargs) as s:
            final = s.get_final_message()
        return final, final.model_dump_json()
    final = client.messages.create(**kwargs)
    return final, final.model_dump_json()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_claude_code_tool_loop_gets_the_original_reasoning_back_upstream(
    client: Anthropic, gateway: Process, sim: Process, stream: bool
) -> None:
    stored = gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="store")
    misses = gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="placeholder")
    messages: list[Any] = [{"role": "user", "content": f"What is in this folder? ({stream})"}]
    turns = 5
    for n in range(turns):
        message, seen = _turn(client, messages, stream)
        assert message.stop_reason == "tool_use"
        assert not leaks(seen), seen[:400]
        uses = [b for b in message.content if b.type == "tool_use"]
        assert [u.name for u in uses] == ["LS", MCP]  # parallel calls, under the client's names
        messages.append({"role": "assistant", "content": [b.model_dump() for b in message.content]})
        results: list[Any] = [{"type": "tool_result", "tool_use_id": u.id, "content": f"files {n}"} for u in uses]
        messages.append({"role": "user", "content": [*results, {"type": "text", "text": f"Now folder {n + 1}."}]})
        sent = httpx.get(sim.url + "/_sim/requests?limit=1", timeout=5).json()[0]["body"]["messages"]
        assistants = [m for m in sent if m["role"] == "assistant"]
        assert len(assistants) == n
        assert all(m["reasoning_content"] == DEFAULT_REASONING for m in assistants)  # never the placeholder
        assert all(
            [c["function"]["name"] for c in m["tool_calls"]] == [alias_of("LS"), alias_of(MCP)] for m in assistants
        )
    final, seen = _turn(client, [*messages[:-1], {"role": "user", "content": messages[-1]["content"][:2]}], stream)
    assert final.stop_reason == "end_turn" and final.content[-1].type == "text" and not leaks(seen)
    sent = httpx.get(sim.url + "/_sim/requests?limit=1", timeout=5).json()[0]["body"]["messages"]
    assert [m["reasoning_content"] for m in sent if m["role"] == "assistant"] == [DEFAULT_REASONING] * turns
    after = gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="store")
    assert after - stored == sum(range(turns)) + turns  # turns 2..5 and the final one, all from the store
    assert gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="placeholder") == misses


def test_strip_anthropic_sdk_raises_on_an_upstream_error_without_reasoning(client: Anthropic, sim: Process) -> None:
    httpx.post(sim.url + "/_sim/faults", json={"status": 429})
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="kimi-k2-thinking", max_tokens=100, messages=USER)
    assert not leaks(str(caught.value.body))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_turn_without_tools_after_aliased_calls_still_finds_the_kept_reasoning(
    gateway: Process, sim: Process, stream: bool
) -> None:
    """An OpenAI client that stops declaring tools once it has the results: the history still names
    ``LS``, which went upstream (and was kept) under its alias."""

    c = gateway.openai(KEY)
    tools = [{"type": "function", "function": {"name": t["name"], "parameters": SCHEMA}} for t in TOOLS]
    messages: list[Any] = [{"role": "user", "content": f"List the folder ({stream})"}]
    first = c.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=tools).choices[0].message
    calls = [tc.model_dump() for tc in first.tool_calls or ()]
    assert [tc["function"]["name"] for tc in calls] == ["LS", MCP]
    messages.append({"role": "assistant", "content": first.content or "", "tool_calls": calls})
    messages += [{"role": "tool", "tool_call_id": tc["id"], "content": "a b"} for tc in calls]
    misses = gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="placeholder")
    if stream:
        text = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model="kimi-k2-thinking", messages=messages, stream=True)
            if ch.choices
        )
    else:
        text = c.chat.completions.create(model="kimi-k2-thinking", messages=messages).choices[0].message.content or ""
    assert text and FIRST_REASONING not in text
    sent = httpx.get(sim.url + "/_sim/requests?limit=1", timeout=5).json()[0]["body"]
    assert "tools" not in sent
    assert sent["messages"][1]["reasoning_content"] == DEFAULT_REASONING
    assert [tc["function"]["name"] for tc in sent["messages"][1]["tool_calls"]] == [alias_of("LS"), alias_of(MCP)]
    assert gateway.metric("gateway_reasoning_restored_total", tenant="anthropic-strip", source="placeholder") == misses
