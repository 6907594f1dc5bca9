"""The Messages API features Claude Code 2.1 uses, driven by the official anthropic SDK's beta client
(stream and non-stream) against ``kimi-gateway serve`` in front of the simulator: a system message
inside ``messages``, adaptive thinking with omitted display, effort, context management, deferred
and server tools, beta headers. Asserted on the SDK's parsed answer, the response headers and what
the simulator received."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anthropic import Anthropic

from tests.conftest import Process, hashed, start_gateway, write_gateway

KEY = "sk-anthropic-claude-code-features"
MODEL = "kimi-k2-thinking"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
BETAS = ["interleaved-thinking-2025-05-14", "context-management-2025-06-27", "effort-2025-11-24"]
HISTORY: list[Any] = [
    {"role": "user", "content": "one"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "old thought", "signature": ""}, "1"]},
    {"role": "user", "content": "two"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "last thought", "signature": ""}, "2"]},
    {"role": "user", "content": "three"},
    {"role": "system", "content": "Answer in one line."},
]


def _history() -> list[Any]:
    out = []
    for message in HISTORY:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "text", "text": b} if isinstance(b, str) else b for b in content]
        out.append({**message, "content": content})
    return out


FEATURES: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 4000,
    "betas": BETAS,
    "thinking": {"type": "adaptive", "display": "omitted"},
    "output_config": {"effort": "low"},
    "context_management": {
        "edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]
    },
    "tools": [
        {"name": "Read", "description": "Read a file", "input_schema": SCHEMA, "cache_control": {"type": "ephemeral"}},
        {"name": "WebFetch", "description": "Fetch", "input_schema": SCHEMA, "defer_loading": True},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 1},
    ],
    "tool_choice": {"type": "none"},
    "extra_body": {"top_k": 5},
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("anthropic-claude-code")
    upstreams = f"  sim:\n    kind: openai\n    base_url: {simulator.url}/v1\n    models: [{MODEL}]\n"
    policy = f'tenant: cc-features\nkeys: ["{hashed(KEY)}"]\nmodels:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\n'
    proc = start_gateway(write_gateway(folder, upstreams, policy))
    yield proc
    proc.stop()


@pytest.fixture()
def client(gateway: Process, sim: Process) -> Anthropic:
    return gateway.anthropic(KEY)


def last_upstream_body(sim: Process) -> dict[str, Any]:
    return httpx.get(sim.url + "/_sim/requests", timeout=5).json()[-1]["body"]


def assert_upstream_request(sent: dict[str, Any]) -> None:
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert sent["messages"][-1]["content"] == "three\n\n<system-reminder>\nAnswer in one line.\n</system-reminder>"
    assistants = [m for m in sent["messages"] if m["role"] == "assistant"]
    assert "reasoning_content" not in assistants[0]  # cleared by the edit
    assert assistants[1]["reasoning_content"] == "last thought"
    assert sent["reasoning_effort"] == "low" and "thinking" not in sent
    assert [t["function"]["name"] for t in sent["tools"]] == ["Read"]
    assert "top_k" not in sent and "context_management" not in sent and "output_config" not in sent


IGNORED = "tools.2 (web_search_20250305), top_k"


def test_non_stream_features(client: Anthropic, sim: Process) -> None:
    raw = client.beta.messages.with_raw_response.create(messages=_history(), **FEATURES)
    message = raw.parse()
    assert raw.headers["x-gateway-ignored"] == IGNORED
    thinking = [b for b in message.content if b.type == "thinking"]
    assert thinking and all(b.thinking == "" for b in thinking)  # display: omitted
    assert [b.type for b in message.content][-1] == "text" and message.stop_reason == "end_turn"
    assert message.context_management is not None
    [edit] = message.context_management.applied_edits
    assert edit.type == "clear_thinking_20251015" and edit.cleared_thinking_turns == 1
    assert edit.cleared_input_tokens > 0
    assert_upstream_request(last_upstream_body(sim))


def test_stream_features(client: Anthropic, sim: Process) -> None:
    with client.beta.messages.stream(messages=_history(), **FEATURES) as stream:
        assert stream.response.headers["x-gateway-ignored"] == IGNORED
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        message = stream.get_final_message()
    assert "thinking_delta" not in deltas and "text_delta" in deltas
    thinking = [b for b in message.content if b.type == "thinking"]
    assert thinking and all(b.thinking == "" for b in thinking)
    assert message.context_management is not None
    assert [e.type for e in message.context_management.applied_edits] == ["clear_thinking_20251015"]
    assert_upstream_request(last_upstream_body(sim))


def test_thinking_disabled_answers_without_thinking_blocks(client: Anthropic, sim: Process) -> None:
    message = client.beta.messages.create(
        model=MODEL,
        max_tokens=4000,
        betas=BETAS,
        thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert [b.type for b in message.content] == ["text"]
    assert message.context_management is None
    assert last_upstream_body(sim)["thinking"] == {"type": "disabled"}


def test_tool_loop_with_a_mid_conversation_tool_addition(client: Anthropic, sim: Process) -> None:
    """The tool a system message adds is the one the model can call; the loop's second turn goes
    through with the call's reasoning put back by the gateway (the SDK sent none)."""
    addition = {
        "role": "system",
        "content": [{"type": "tool_addition", "tool": {"type": "tool_definition", "definition": FEATURES["tools"][0]}}],
    }
    messages: list[Any] = [{"role": "user", "content": "read a file"}, addition]
    first = client.beta.messages.create(model=MODEL, max_tokens=4000, betas=BETAS, messages=messages)
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "Read" and first.stop_reason == "tool_use"
    messages += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "file text"}]},
    ]
    second = client.beta.messages.create(model=MODEL, max_tokens=4000, betas=BETAS, messages=messages)
    assert second.stop_reason == "end_turn"
    sent = last_upstream_body(sim)
    assert [t["function"]["name"] for t in sent["tools"]] == ["Read"]
    [turn] = [m for m in sent["messages"] if m.get("tool_calls")]
    assert turn["reasoning_content"].strip()
