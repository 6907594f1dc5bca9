"""Tool schemas in: every dialect normalizes to OpenAI tools; bad tools are 400s naming the tool."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.tools.schemas import normalize_tools

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CANONICAL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}}


def body_with(tools: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools, **extra}


def test_canonical_tools_are_left_byte_identical() -> None:
    body = body_with([copy.deepcopy(CANONICAL)], tool_choice="auto", temperature=1)
    before = orjson.dumps(body)
    info = normalize_tools(body)
    assert info.has_tools and not info.changed and not info.legacy
    assert orjson.dumps(body) == before


@pytest.mark.parametrize(
    "tool",
    [
        pytest.param(
            {"function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}}, id="no-type"
        ),
        pytest.param(
            {"type": "function", "name": "get_weather", "description": "Weather", "parameters": PARAMS}, id="flat"
        ),
        pytest.param({"name": "get_weather", "description": "Weather", "input_schema": PARAMS}, id="anthropic"),
    ],
)
def test_each_dialect_normalizes_to_openai_tools(tool: dict[str, Any]) -> None:
    body = body_with([tool])
    info = normalize_tools(body)
    assert info.changed and info.has_tools
    assert body["tools"] == [CANONICAL]
    assert list(body["tools"][0]) == ["type", "function"]


def test_legacy_functions_become_tools_and_tool_choice_in_place() -> None:
    body = {
        "model": "m",
        "functions": [{"name": "get_weather", "parameters": PARAMS}],
        "function_call": {"name": "get_weather"},
        "messages": [{"role": "user", "content": "hi"}],
    }
    info = normalize_tools(body)
    assert info.legacy and info.changed
    assert list(body) == ["model", "tools", "tool_choice", "messages"]  # same positions
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_legacy_history_becomes_tool_calls_and_tool_messages() -> None:
    body = {
        "model": "m",
        "functions": [{"name": "get_weather", "parameters": PARAMS}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ],
    }
    normalize_tools(body)
    assistant, result = body["messages"][1], body["messages"][2]
    assert assistant["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert "function_call" not in assistant
    assert result == {
        "role": "tool",
        "tool_call_id": "functions.get_weather:0",
        "name": "get_weather",
        "content": "sunny",
    }


def test_missing_parameters_get_an_empty_object_schema() -> None:
    body = body_with([{"type": "function", "function": {"name": "now_utc"}}])
    assert normalize_tools(body).changed
    assert body["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_builtin_tools_pass_unchanged() -> None:
    builtin = {"type": "builtin_function", "function": {"name": "$web_search"}}
    body = body_with([builtin, copy.deepcopy(CANONICAL)])
    assert not normalize_tools(body).changed
    assert body["tools"][0] == builtin


@pytest.mark.parametrize(
    ("tools", "needle"),
    [
        ([{"type": "function", "function": {"parameters": PARAMS}}], "tools[0]: the function has no name"),
        ([{"type": "function", "function": {"name": "", "parameters": PARAMS}}], "tools[0]: the function has no name"),
        ([{"name": 7, "input_schema": PARAMS}], "tools[0]: the function has no name"),
        ([{"type": "function", "function": {"name": "$web_search"}}], "tools[0] ('$web_search'): names starting"),
        (
            [CANONICAL, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "array"}}}],
            "tools[1] ('get_time'): parameters must be a JSON Schema whose root",
        ),
        ([{"type": "function", "function": {"name": "get_time", "parameters": "x"}}], "parameters must be a JSON"),
        ([{"name": "get_time", "input_schema": {"type": "string"}}], "tools[0] ('get_time'): input_schema"),
        ([CANONICAL, CANONICAL], "tools[1] ('get_weather'): duplicate tool name"),
        ([{"type": "retrieval"}], "unsupported tool type 'retrieval'"),
        ([{"type": "builtin_function", "function": {"name": "web_search"}}], "starting with '$'"),
        ([42], "tools[0]: a tool must be an object"),
        ("nope", "'tools' must be an array"),
    ],
)
def test_invalid_tools_are_400s_naming_the_tool(tools: Any, needle: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalize_tools(body_with(tools))
    assert caught.value.status == 400
    assert needle in caught.value.message, caught.value.message


def test_more_than_128_tools_is_a_400() -> None:
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": PARAMS}} for i in range(129)]
    with pytest.raises(GatewayError) as caught:
        normalize_tools(body_with(tools))
    assert "at most 128" in caught.value.message


def test_tool_choice_naming_an_unknown_tool_is_a_400() -> None:
    body = body_with([CANONICAL], tool_choice={"type": "function", "function": {"name": "nope_tool"}})
    with pytest.raises(GatewayError) as caught:
        normalize_tools(body)
    assert caught.value.param == "tool_choice"


def _exchange(body: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(body=body, dirty=False, transforms=[])


def test_plain_requests_get_no_transforms_and_stay_clean() -> None:
    from types import SimpleNamespace

    from gateway.tools.inbound import prepare_tools

    ex = _exchange({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    prepare_tools(ex, SimpleNamespace(tool_call_markers=True))
    assert ex.transforms == [] and not ex.dirty


def test_canonical_tools_request_stays_clean_with_only_the_repair_transform() -> None:
    from types import SimpleNamespace

    from gateway.tools.calls import ToolCallRepair
    from gateway.tools.inbound import prepare_tools

    ex = _exchange(body_with([copy.deepcopy(CANONICAL)]))
    prepare_tools(ex, SimpleNamespace(tool_call_markers=False))
    assert not ex.dirty  # the client's bytes go upstream unchanged
    assert [type(t) for t in ex.transforms] == [ToolCallRepair]


def test_marker_upstream_gets_the_parser_and_keeps_special_tokens() -> None:
    from types import SimpleNamespace

    from gateway.tools.calls import ToolCallRepair
    from gateway.tools.inbound import prepare_tools
    from gateway.tools.k2_markers import K2MarkerTransform
    from gateway.tools.legacy import LegacyFunctionCall

    ex = _exchange({"model": "m", "messages": [], "functions": [CANONICAL["function"]]})
    prepare_tools(ex, SimpleNamespace(tool_call_markers=True))
    assert ex.dirty and ex.body["skip_special_tokens"] is False
    assert [type(t) for t in ex.transforms] == [K2MarkerTransform, ToolCallRepair, LegacyFunctionCall]
