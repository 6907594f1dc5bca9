"""Tool calling end to end: the openai SDK against ``kimi-gateway serve`` in front of simulator
processes, one speaking Moonshot's dialect and one a vLLM without tool parsers (raw K2 markers)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.test_dropin import TOOLS, USER

KEY = "sk-tools-tenant"
PARAMS = TOOLS[0]["function"]["parameters"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process, raw_vllm: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("tools")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
  raw:
    kind: openai
    base_url: {raw_vllm.url}/v1
    reasoning_field: reasoning
    tool_call_markers: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
"""
    policy = f"""\
tenant: tools
keys: ["{hashed(KEY)}"]
models:
  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}
  k2-raw: {{candidates: [raw/kimi-k2-thinking]}}
"""
    proc = start_gateway(write_gateway(folder, upstreams, policy))
    yield proc
    proc.stop()


@pytest.fixture()
def client(gateway: Process, sim: Process) -> OpenAI:
    return gateway.openai(KEY)


def collect(stream: Any) -> tuple[str, list[dict[str, str]], str | None]:
    text, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


def test_raw_k2_markers_become_tool_calls_non_stream(client: OpenAI, raw_vllm: Process) -> None:
    reply = client.chat.completions.create(model="k2-raw", messages=USER, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name) for c in calls] == [
        ("functions.get_weather:0", "get_weather"),
        ("functions.get_time:1", "get_time"),
    ]
    assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    assert "<|tool_call" not in (choice.message.content or "")
    # a parser-less vLLM drops the markers unless asked to keep special tokens
    seen = httpx.get(raw_vllm.url + "/_sim/requests").json()[-1]["body"]
    assert seen["skip_special_tokens"] is False


def test_raw_k2_markers_become_tool_calls_stream(client: OpenAI) -> None:
    text, calls, finish = collect(
        client.chat.completions.create(model="k2-raw", messages=USER, tools=TOOLS, stream=True)
    )
    assert finish == "tool_calls"
    assert [(c["id"], c["name"]) for c in calls] == [
        ("functions.get_weather:0", "get_weather"),
        ("functions.get_time:1", "get_time"),
    ]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls)
    assert "<|" not in text


def test_raw_k2_markers_stream_through_the_sdk_stream_helper(client: OpenAI) -> None:
    with client.chat.completions.stream(model="k2-raw", messages=USER, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert final.choices[0].finish_reason == "tool_calls"


DIALECTS = {
    "no-type": [{"function": t["function"]} for t in TOOLS],
    "flat": [{"type": "function", **t["function"]} for t in TOOLS],
    "anthropic": [
        {"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": PARAMS}
        for t in TOOLS
    ],
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("stream", [False, True])
def test_each_tool_dialect_reaches_moonshot_as_openai_tools(
    client: OpenAI, sim: Process, dialect: str, stream: bool
) -> None:
    tools: Any = DIALECTS[dialect]
    if stream:
        _, calls, finish = collect(
            client.chat.completions.create(model="kimi-k2-thinking", messages=USER, tools=tools, stream=True)
        )
        names = [c["name"] for c in calls]
    else:
        reply = client.chat.completions.create(model="kimi-k2-thinking", messages=USER, tools=tools)
        finish = reply.choices[0].finish_reason
        names = [c.function.name for c in reply.choices[0].message.tool_calls or []]
    assert finish == "tool_calls"
    assert names == ["get_weather", "get_time"]
    seen = httpx.get(sim.url + "/_sim/requests").json()[-1]["body"]
    assert seen["tools"] == TOOLS


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_functions_get_function_call_back(client: OpenAI, sim: Process, stream: bool) -> None:
    functions = [t["function"] for t in TOOLS[:1]]
    kwargs: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": USER, "functions": functions}
    if stream:
        name, arguments, finish = "", "", None
        for chunk in client.chat.completions.create(**kwargs, function_call="auto", stream=True):
            for choice in chunk.choices:
                fc = choice.delta.function_call
                assert not choice.delta.tool_calls
                if fc is not None:
                    name += fc.name or ""
                    arguments += fc.arguments or ""
                finish = choice.finish_reason or finish
    else:
        choice = client.chat.completions.create(**kwargs, function_call="auto").choices[0]
        assert choice.message.tool_calls is None and choice.message.function_call is not None
        name, arguments, finish = (
            choice.message.function_call.name,
            choice.message.function_call.arguments,
            choice.finish_reason,
        )
    assert (name, finish) == ("get_weather", "function_call")
    assert isinstance(json.loads(arguments), dict)
    seen = httpx.get(sim.url + "/_sim/requests").json()[-1]["body"]
    assert "functions" not in seen and seen["tools"] == TOOLS[:1] and seen["tool_choice"] == "auto"


def test_legacy_function_loop_turns_history_into_tool_messages(client: OpenAI) -> None:
    """A legacy client's second turn (function_call + role function) is accepted by a Moonshot upstream."""
    messages: list[Any] = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "call it",
            "function_call": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'},
    ]
    reply = client.chat.completions.create(
        model="kimi-k2-thinking", messages=messages, functions=[TOOLS[0]["function"]]
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_tool_is_a_400_naming_it_before_the_upstream_is_called(
    client: OpenAI, sim: Process, stream: bool
) -> None:
    bad = [TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": {"type": "array"}}}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="kimi-k2-thinking", messages=USER, tools=bad, stream=stream)
    error = caught.value.body
    assert isinstance(error, dict) and "tools[1] ('get_time')" in error["message"]
    assert error["param"] == "tools[1].parameters" and error["code"] == "invalid_tool"
    assert httpx.get(sim.url + "/_sim/requests").json() == []


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_loop_over_a_vllm_without_tool_parser(gateway: Process, raw_vllm: Process, stream: bool) -> None:
    """/v1/messages in, raw K2 markers out of vLLM: the loop sees proper tool_use blocks."""

    client = gateway.anthropic(KEY)
    tools = [{"name": t["function"]["name"], "input_schema": PARAMS} for t in TOOLS]

    def turn(messages: list[Any]) -> Any:
        kwargs: dict[str, Any] = {"model": "k2-raw", "max_tokens": 4000, "tools": tools, "messages": messages}
        if not stream:
            return client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as s:
            return s.get_final_message()

    messages: list[Any] = list(USER)
    first = turn(messages)
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    assert [u.id for u in uses] == ["functions.get_weather:0", "functions.get_time:1"]
    assert all(u.input for u in uses)
    assert all("<|" not in b.text for b in first.content if b.type == "text")
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "ok"} for u in uses]}
    )
    second = turn(messages)
    assert second.stop_reason == "end_turn" and second.content[-1].type == "text"
    sent = httpx.get(raw_vllm.url + "/_sim/requests").json()[-1]["body"]
    assert [c["id"] for c in sent["messages"][1]["tool_calls"]] == ["functions.get_weather:0", "functions.get_time:1"]
