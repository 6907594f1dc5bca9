"""Per-upstream request shaping: clamps, reasoning forms, default max_tokens, tool_choice required."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import ModelShaping
from gateway.errors import GatewayError
from gateway.upstreams.shaping import TOOL_NUDGE, shape

MESSAGES = [{"role": "user", "content": "hi"}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(MESSAGES), **extra, "x_unknown": {"keep": True}}


def test_temperature_is_clamped_into_the_upstream_range_keeping_key_order() -> None:
    b = body(temperature=1.7, top_p=0.9)
    assert shape(b, ModelShaping(temperature=(0, 1)), 32768)
    assert list(b) == ["model", "messages", "temperature", "top_p", "x_unknown"]
    assert b["temperature"] == 1
    inside = body(temperature=0.4)
    assert not shape(inside, ModelShaping(temperature=(0, 1)), 32768)


def test_k2_thinking_takes_no_reasoning_controls() -> None:
    b = body(thinking={"type": "enabled"}, reasoning_effort="high")
    assert shape(b, ModelShaping(thinking="none"), 32768)
    assert "thinking" not in b and "reasoning_effort" not in b


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"reasoning_effort": "high"}, {"thinking": {"type": "enabled"}}),
        ({"reasoning_effort": "none"}, {"thinking": {"type": "disabled"}}),
        ({"thinking": True}, {"thinking": {"type": "enabled"}}),
        ({"thinking": False}, {"thinking": {"type": "disabled"}}),
    ],
)
def test_k26_takes_thinking_type(given: dict[str, Any], expected: dict[str, Any]) -> None:
    b = body(**given)
    assert shape(b, ModelShaping(thinking="type"), 32768)
    assert {k: b[k] for k in ("thinking", "reasoning_effort") if k in b} == expected


def test_k26_thinking_object_passes_untouched() -> None:
    b = body(thinking={"type": "enabled", "keep": "all"})
    raw = orjson.dumps(b)
    assert not shape(b, ModelShaping(thinking="type"), 32768)
    assert orjson.dumps(b) == raw


@pytest.mark.parametrize(
    ("given", "effort"),
    [
        ({"thinking": {"type": "enabled"}}, "high"),
        ({"thinking": {"type": "disabled"}}, "low"),
        ({"reasoning_effort": "medium"}, "high"),
        ({"reasoning_effort": "minimal"}, "low"),
        ({"reasoning_effort": "max"}, "max"),
    ],
)
def test_k3_takes_reasoning_effort(given: dict[str, Any], effort: str) -> None:
    b = body(**given)
    shape(b, ModelShaping(thinking="effort"), 32768)
    assert "thinking" not in b and b["reasoning_effort"] == effort


def test_thinking_model_gets_the_default_max_tokens_only_when_absent() -> None:
    b = body()
    assert shape(b, ModelShaping(default_max_tokens=True), 16000)
    assert b["max_tokens"] == 16000
    asked = body(max_completion_tokens=500)
    assert not shape(asked, ModelShaping(default_max_tokens=True), 16000)
    assert "max_tokens" not in asked


def test_tool_choice_required_is_emulated_with_a_nudge_without_touching_the_client_list() -> None:
    b = body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")
    original = b["messages"]
    assert shape(b, ModelShaping(tool_choice_required="emulate"), 32768)
    assert "tool_choice" not in b
    assert b["messages"][-1] == {"role": "user", "content": TOOL_NUDGE}
    assert original == MESSAGES  # a failover to another candidate starts from the client's list


def test_tool_choice_required_rejected_with_a_clear_400() -> None:
    b = body(tool_choice={"type": "function", "function": {"name": "f"}})
    with pytest.raises(GatewayError) as info:
        shape(b, ModelShaping(tool_choice_required="reject"), 32768)
    assert info.value.status == 400 and info.value.param == "tool_choice"
    assert info.value.code == "unsupported_tool_choice"
    assert not shape(body(tool_choice="auto"), ModelShaping(tool_choice_required="reject"), 32768)
