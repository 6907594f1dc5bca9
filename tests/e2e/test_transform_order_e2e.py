"""Tool-call and reasoning transforms together, in the order gateway/transforms/order.py fixes.

The hardest upstream for that order is a vLLM with neither parser (``vllm-raw``): its content is
``<reasoning></think><answer or raw K2 tool-call markers>``. Under every reasoning mode, in a tool
loop with parallel calls, stream and non-stream, the client must get proper tool calls (no marker,
no ``</think>``, no reasoning outside what its mode shows), the reasoning store must be keyed by the
calls the client sees (so every later turn finds it), and the upstream must get the original
reasoning back on every assistant tool-call message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from simulator.text import REASONING
from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.test_reasoning_modes import FIRST_REASONING, TOOLS, expected_reasoning

KEYS = {"strip": "sk-order-strip", "redact": "sk-order-redact", "pass": "sk-order-pass"}
REDACT = {"restate": "[REDACTED:restated]", "wants": "[REDACTED:wants]"}


def redacted(text: str) -> str:
    for word, mark in REDACT.items():
        text = text.replace(word, mark)
    return text


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, raw_vllm: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("order")
    upstreams = f"""\
  raw:
    kind: openai
    base_url: {raw_vllm.url}/v1
    reasoning_field: reasoning
    think_in_content: true
    tool_call_markers: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
"""
    models = "models:\n  k2-raw: {candidates: [raw/kimi-k2-thinking]}\n"
    config = write_gateway(
        folder, upstreams, f'tenant: strip\nkeys: ["{hashed(KEYS["strip"])}"]\n{models}reasoning: {{mode: strip}}\n'
    )
    policies = config.parent / "gateway-policies"
    (policies / "redact.yaml").write_text(
        f'tenant: redact\nkeys: ["{hashed(KEYS["redact"])}"]\n{models}'
        "reasoning:\n  mode: redact\n  field: reasoning\n"
        "  redact: {patterns: [{kind: restated, regex: 'restate'}, {kind: wants, regex: 'wants'}]}\n"
    )
    (policies / "pass.yaml").write_text(
        f'tenant: pass\nkeys: ["{hashed(KEYS["pass"])}"]\n{models}reasoning: {{field: reasoning}}\n'
    )
    proc = start_gateway(config)
    yield proc
    proc.stop()


def last_request(sim: Process) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(sim.url + "/_sim/requests?limit=1", timeout=5).json()[0]["body"]
    return body


def turn(c: OpenAI, messages: list[Any], stream: bool, sim: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(the assistant message as the client got it, finish_reason, everything received as text)."""
    kwargs: dict[str, Any] = {"model": "k2-raw", "messages": messages, "tools": TOOLS, "extra_body": {"sim": sim}}
    if not stream:
        resp = c.chat.completions.create(**kwargs)
        choice = resp.choices[0]
        return choice.message.model_dump(exclude_none=True), str(choice.finish_reason), resp.model_dump_json()
    content, reasoning, finish, seen = "", "", "", []
    calls: dict[int, dict[str, Any]] = {}
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        seen.append(chunk.model_dump_json())
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            for tc in delta.tool_calls or ():
                entry = calls.setdefault(
                    tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                entry["id"] += tc.id or ""
                entry["function"]["name"] += (tc.function.name or "") if tc.function else ""
                entry["function"]["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish, "\n".join(seen)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", ["strip", "redact", "pass"])
def test_parserless_vllm_tool_loop_gives_clean_calls_and_restores_reasoning_under_every_mode(
    gateway: Process, raw_vllm: Process, mode: str, stream: bool
) -> None:
    httpx.post(raw_vllm.url + "/_sim/reset", timeout=5)
    c = gateway.openai(KEYS[mode])
    store_before = gateway.metric("gateway_reasoning_restored_total", tenant=mode, source="store")
    misses_before = gateway.metric("gateway_reasoning_restored_total", tenant=mode, source="placeholder")
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Beijing, then Shanghai, then more?"}]
    originals: list[str] = []
    turns = 5
    for n in range(turns):
        chunks = 2 + n  # a different reasoning text every turn
        message, finish, received = turn(c, messages, stream, {"tool_calls": 2, "reasoning_chunks": chunks})
        original = expected_reasoning(chunks)
        originals.append(original)
        # proper parallel tool calls, no marker and no </think> anywhere
        assert finish == "tool_calls"
        calls = message["tool_calls"]
        # K2 numbers calls across the conversation: two calls a turn
        assert [(t["id"], t["function"]["name"]) for t in calls] == [
            (f"functions.get_weather:{2 * n}", "get_weather"),
            (f"functions.get_time:{2 * n + 1}", "get_time"),
        ]
        assert all(json.loads(t["function"]["arguments"]) for t in calls)
        assert "<|" not in received and "think>" not in received
        assert not message.get("content")
        # what each mode shows of the reasoning, and nothing of it in the content
        if mode == "strip":
            assert FIRST_REASONING not in received and '"reasoning' not in received.replace('"reasoning":null', "")
        else:
            assert message["reasoning"] == (redacted(original) if mode == "redact" else original)
        messages.append(message)  # the client sends back what it got (a redacted copy for redact)
        messages += [{"role": "tool", "tool_call_id": t["id"], "content": '{"ok": true}'} for t in calls]
        sent = last_request(raw_vllm)
        assistants = [m for m in sent["messages"] if m["role"] == "assistant"]
        assert [m.get("reasoning") for m in assistants] == originals[:-1]  # the originals, every turn
        assert all("reasoning_content" not in m for m in assistants)
    final, finish, received = turn(c, messages, stream, {"reasoning_chunks": 3})
    assert finish == "stop" and final["content"] and "think>" not in received and "<|" not in received
    if mode == "strip":
        assert FIRST_REASONING not in received
    sent = last_request(raw_vllm)
    assert [m.get("reasoning") for m in sent["messages"] if m["role"] == "assistant"] == originals
    restored = gateway.metric("gateway_reasoning_restored_total", tenant=mode, source="store") - store_before
    if mode != "pass":  # turns 2..6 found 1+2+3+4+5 kept turns: the keys match the calls the client saw
        assert restored == sum(range(1, turns + 1))
    assert gateway.metric("gateway_reasoning_restored_total", tenant=mode, source="placeholder") == misses_before


def test_reasoning_texts_of_the_loop_differ_per_turn() -> None:
    """The loop above tells turns apart only because each turn's reasoning is a different text."""
    texts = {"".join(REASONING.take(n, 0)[0]) for n in range(2, 7)}
    assert len(texts) == 5


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_keeps_the_reasoning_of_a_legacy_function_call_turn(
    gateway: Process, raw_vllm: Process, stream: bool
) -> None:
    """Regression: the reasoning recorder ran after the legacy ``function_call`` shape, saw no tool
    calls and kept nothing, so the next turn of a ``functions`` client got the placeholder."""
    c = gateway.openai(KEYS["strip"])
    functions = [TOOLS[0]["function"]]
    messages: list[Any] = [{"role": "user", "content": f"Weather in Oslo? ({stream})"}]
    sim = {"tool_calls": 1, "reasoning_chunks": 4}
    before = gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="store")
    misses = gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder")
    if stream:
        name, arguments, received = "", "", []
        for chunk in c.chat.completions.create(
            model="k2-raw", messages=messages, functions=functions, stream=True, extra_body={"sim": sim}
        ):
            received.append(chunk.model_dump_json())
            call = chunk.choices[0].delta.function_call if chunk.choices else None
            if call is not None:
                name += call.name or ""
                arguments += call.arguments or ""
        text = "".join(received)
    else:
        resp = c.chat.completions.create(
            model="k2-raw", messages=messages, functions=functions, extra_body={"sim": sim}
        )
        assert resp.choices[0].message.function_call is not None
        name, arguments = resp.choices[0].message.function_call.name, resp.choices[0].message.function_call.arguments
        text = resp.model_dump_json()
    assert name == "get_weather" and json.loads(arguments)
    assert FIRST_REASONING not in text and "<|" not in text
    messages.append({"role": "assistant", "content": None, "function_call": {"name": name, "arguments": arguments}})
    messages.append({"role": "function", "name": name, "content": '{"temp": 3}'})
    c.chat.completions.create(model="k2-raw", messages=messages, functions=functions)
    sent = last_request(raw_vllm)
    assert sent["messages"][1]["reasoning"] == expected_reasoning(4)
    assert gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="store") == before + 1
    assert gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder") == misses
