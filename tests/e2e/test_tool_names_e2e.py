"""Tool names Moonshot refuses (Claude Code's ``LS``, MCP names with dots, names over 64
characters) work end to end: the simulator, which applies Moonshot's name rule, only ever sees
aliases; the anthropic and openai SDKs only ever see their own names, stream and non-stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI

from gateway.tools.aliases import NAME_RE, alias_of
from tests.conftest import Process, hashed, start_gateway, write_gateway

KEY = "sk-tool-names"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
MCP = "mcp__files__read.file"
LONG = "mcp__a_very_long_server_name__" + "and_an_even_longer_tool_name_" * 2
NAMES = ["LS", MCP, "Bash", LONG]  # the simulator calls the first two
ANTHROPIC_TOOLS = [{"name": n, "description": f"tool {n}", "input_schema": SCHEMA} for n in NAMES]
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"tool {n}", "parameters": SCHEMA}} for n in NAMES
]
USER = [{"role": "user", "content": "List the files, then read one."}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process, raw_vllm: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("tool-names")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking, kimi-k3]
  raw:
    kind: openai
    base_url: {raw_vllm.url}/v1
    reasoning_field: reasoning
    tool_call_markers: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
"""
    policy = f"""\
tenant: tool-names
keys: ["{hashed(KEY)}"]
models:
  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}
  kimi-k3: {{candidates: [sim/kimi-k3]}}
  k2-raw: {{candidates: [raw/kimi-k2-thinking]}}
"""
    proc = start_gateway(write_gateway(folder, upstreams, policy))
    yield proc
    proc.stop()


def sent(sim: Process) -> list[dict[str, Any]]:
    return [r["body"] for r in httpx.get(sim.url + "/_sim/requests").json()]


def _message_turn(client: Anthropic, messages: list[Any], stream: bool, **extra: Any) -> Any:
    kwargs: dict[str, Any] = {
        "model": "kimi-k2-thinking",
        "max_tokens": 4000,
        "tools": ANTHROPIC_TOOLS,
        "messages": messages,
        **extra,
    }
    if stream:
        with client.messages.stream(**kwargs) as s:
            return s.get_final_message()
    return client.messages.create(**kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_claude_code_tool_names_work_through_messages(gateway: Process, sim: Process, stream: bool) -> None:
    client = gateway.anthropic(KEY)
    messages: list[Any] = list(USER)
    first = _message_turn(client, messages, stream)
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    assert [u.name for u in uses] == ["LS", MCP]  # the client's own names
    assert all(u.input for u in uses)
    up = sent(sim)[-1]
    upstream_names = [t["function"]["name"] for t in up["tools"]]
    assert upstream_names == [alias_of("LS"), alias_of(MCP), "Bash", alias_of(LONG)]
    assert all(NAME_RE.match(n) for n in upstream_names)
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "ok"} for u in uses]}
    )
    second = _message_turn(client, messages, stream)
    assert second.stop_reason == "end_turn" and second.content[-1].type == "text"
    again = sent(sim)[-1]
    # the same aliases every turn: the upstream's prompt cache sees the same tool bytes
    assert json.dumps(again["tools"]) == json.dumps(up["tools"])
    history = again["messages"][1]
    assert [c["function"]["name"] for c in history["tool_calls"]] == [alias_of("LS"), alias_of(MCP)]
    assert [c["id"] for c in history["tool_calls"]] == [u.id for u in uses]  # ids untouched
    assert history["reasoning_content"] == first.content[0].thinking


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_named_tool_choice_with_a_refused_name_is_aliased_and_answered_with_the_clients_name(
    gateway: Process, sim: Process, stream: bool
) -> None:
    client = gateway.anthropic(KEY)
    reply = _message_turn(client, USER, stream, model="kimi-k3", tool_choice={"type": "tool", "name": MCP})
    assert [b.name for b in reply.content if b.type == "tool_use"] == [MCP]
    assert sent(sim)[-1]["tool_choice"] == {"type": "function", "function": {"name": alias_of(MCP)}}


def _openai_turn(client: OpenAI, messages: list[Any], stream: bool, **extra: Any) -> tuple[dict[str, Any], str]:
    kwargs: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": messages, **extra}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.model_dump(exclude_none=True), str(choice.finish_reason)
    calls: dict[int, dict[str, Any]] = {}
    legacy: dict[str, str] = {"name": "", "arguments": ""}
    finish, reasoning, content = "", "", ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            for tc in choice.delta.tool_calls or ():
                entry = calls.setdefault(
                    tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                entry["id"] += tc.id or ""
                entry["function"]["name"] += (tc.function.name or "") if tc.function else ""
                entry["function"]["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if choice.delta.function_call is not None:
                legacy["name"] += choice.delta.function_call.name or ""
                legacy["arguments"] += choice.delta.function_call.arguments or ""
            finish = choice.finish_reason or finish
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:  # a pass tenant's client sends the reasoning back itself
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if legacy["name"]:
        message["function_call"] = legacy
    return message, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_clients_get_their_own_tool_names_back(gateway: Process, sim: Process, stream: bool) -> None:
    client = gateway.openai(KEY)
    message, finish = _openai_turn(client, USER, stream, tools=OPENAI_TOOLS)
    assert finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["LS", MCP]
    messages = [*USER, message] + [
        {"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in message["tool_calls"]
    ]
    follow, finish = _openai_turn(client, messages, stream, tools=OPENAI_TOOLS)
    assert finish == "stop" and follow["content"]
    history = sent(sim)[-1]["messages"][1]
    assert [c["function"]["name"] for c in history["tool_calls"]] == [alias_of("LS"), alias_of(MCP)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_legacy_function_call_gets_the_clients_name_back(gateway: Process, sim: Process, stream: bool) -> None:
    client = gateway.openai(KEY)
    functions = [{"name": "LS", "description": "list files", "parameters": SCHEMA}]
    message, finish = _openai_turn(client, USER, stream, functions=functions)
    assert finish == "function_call"
    assert message["function_call"]["name"] == "LS" and json.loads(message["function_call"]["arguments"])
    assert sent(sim)[-1]["tools"][0]["function"]["name"] == alias_of("LS")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_raw_k2_marker_calls_under_an_alias_come_back_under_the_clients_name(
    gateway: Process, raw_vllm: Process, stream: bool
) -> None:
    """A parserless vLLM writes ``functions.<alias>:0`` in its markers: the call is still the client's."""
    client = gateway.openai(KEY)
    message, finish = _openai_turn(client, USER, stream, model="k2-raw", tools=OPENAI_TOOLS)
    assert finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["LS", MCP]
    assert [c["id"] for c in message["tool_calls"]] == [f"functions.{alias_of('LS')}:0", f"functions.{alias_of(MCP)}:1"]
    assert "<|" not in (message.get("content") or "")


def test_what_cannot_be_aliased_is_still_an_anthropic_400(gateway: Process, sim: Process) -> None:
    client = gateway.anthropic(KEY)
    cases = [
        ([{"name": "", "input_schema": SCHEMA}], "tools[0]: the function has no name"),
        ([{"name": "LS", "input_schema": {"type": "array"}}], "tools[0] ('LS'): input_schema must be a JSON Schema"),
        ([{"name": f"t{i}", "input_schema": SCHEMA} for i in range(129)], "at most 128"),
        ([{"name": "LS", "input_schema": SCHEMA}, {"name": "LS", "input_schema": SCHEMA}], "duplicate tool name"),
    ]
    for tools, needle in cases:
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model="kimi-k2-thinking", max_tokens=10, tools=tools, messages=USER)
        body = caught.value.body
        assert isinstance(body, dict) and needle in body["error"]["message"], body
    assert sent(sim) == []
