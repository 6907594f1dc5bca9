"""Tool names the upstream refuses: deterministic aliases in, the client's names back out."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tools.aliases import NAME_RE, ClientToolNames, acceptable, alias_of, plan_aliases
from gateway.tools.calls import ToolCallRepair
from gateway.tools.inbound import prepare_tools
from gateway.tools.legacy import LegacyFunctionCall
from gateway.tools.schemas import normalize_tools
from gateway.transforms.chain import StreamChain, apply_whole

PARAMS = {"type": "object", "properties": {"path": {"type": "string"}}}
CLAUDE_CODE_NAMES = ["LS", "Bash", "mcp__server__tool.name", "x" * 80, "9lives", "get weather", "-dash"]


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": copy.deepcopy(PARAMS)}}


def exchange(body: dict[str, Any]) -> Any:
    return SimpleNamespace(body=body, dirty=False, transforms=[])


@pytest.mark.parametrize("name", CLAUDE_CODE_NAMES)
def test_refused_names_get_a_valid_alias_and_valid_names_none(name: str) -> None:
    if NAME_RE.match(name):
        assert plan_aliases([name]) == {}
        return
    alias = plan_aliases([name])[name]
    assert NAME_RE.match(alias), alias
    assert alias == alias_of(name)  # the same alias in every request: the prompt bytes stay the same


def test_aliases_keep_a_readable_base() -> None:
    assert alias_of("LS").startswith("LS_")
    assert alias_of("mcp__server__tool.name").startswith("mcp__server__tool_name_")
    assert alias_of("9lives").startswith("_9lives_")
    assert len(alias_of("x" * 200)) == 64


@given(st.text(min_size=1, max_size=100))
def test_any_name_gets_an_acceptable_alias(name: str) -> None:
    aliases = plan_aliases([name])
    assert acceptable(aliases.get(name, name))


def test_an_alias_never_collides_with_another_tools_name() -> None:
    taken = alias_of("LS")  # a client really has a tool called like LS's alias
    aliases = plan_aliases(["LS", taken])
    assert aliases["LS"] != taken and NAME_RE.match(aliases["LS"])
    assert taken not in aliases
    assert plan_aliases(["LS", taken]) == aliases  # still deterministic


def test_names_differing_only_in_refused_characters_get_distinct_aliases() -> None:
    aliases = plan_aliases(["a.b.c", "a:b:c", "a b c"])
    assert len(set(aliases.values())) == 3


def test_request_tools_tool_choice_and_history_are_rewritten() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "list"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "LS_x:0", "type": "function", "function": {"name": "LS", "arguments": "{}"}},
                {"id": "Bash:1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}},
                {"id": "old:2", "type": "function", "function": {"name": "ab", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "LS_x:0", "name": "LS", "content": "a b"},
        ],
        "tools": [tool("LS"), tool("Bash")],
        "tool_choice": {"type": "function", "function": {"name": "LS"}},
    }  # fmt: skip
    info = normalize_tools(body)
    ls = alias_of("LS")
    assert info.changed and info.aliases == {"LS": ls}
    assert [t["function"]["name"] for t in body["tools"]] == [ls, "Bash"]
    assert body["tool_choice"]["function"]["name"] == ls
    calls = body["messages"][1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == [ls, "Bash", alias_of("ab")]  # "ab": an earlier turn's tool
    assert [c["id"] for c in calls] == ["LS_x:0", "Bash:1", "old:2"]  # ids are never rewritten
    assert body["messages"][2]["name"] == ls


def test_anthropic_shaped_tools_with_refused_names_are_aliased() -> None:
    body = {"model": "m", "messages": [], "tools": [{"name": "LS", "input_schema": PARAMS}]}
    info = normalize_tools(body)
    assert body["tools"][0]["function"]["name"] == info.aliases["LS"]


def test_valid_names_keep_the_request_clean_and_add_no_name_mapping() -> None:
    ex = exchange({"model": "m", "messages": [], "tools": [tool("list_files")]})
    raw = orjson.dumps(ex.body)
    prepare_tools(ex, SimpleNamespace(tool_call_markers=False))
    assert not ex.dirty and orjson.dumps(ex.body) == raw
    assert [type(t) for t in ex.transforms] == [ToolCallRepair]


def test_aliased_request_gets_the_name_mapping_before_the_legacy_shape() -> None:
    ex = exchange({"model": "m", "messages": [], "functions": [{"name": "LS", "parameters": PARAMS}]})
    prepare_tools(ex, SimpleNamespace(tool_call_markers=False))
    assert ex.dirty
    assert [type(t) for t in ex.transforms] == [ToolCallRepair, ClientToolNames, LegacyFunctionCall]


def _answer(name: str) -> dict[str, Any]:
    call = {"id": f"{name}:0", "type": "function", "function": {"name": name, "arguments": "{}"}}
    message = {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"id": "x", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


def test_whole_answers_map_aliases_back_including_legacy_function_call() -> None:
    ls = alias_of("LS")
    out = orjson.loads(apply_whole([ToolCallRepair(), ClientToolNames({"LS": ls})], orjson.dumps(_answer(ls))))
    call = out["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "LS" and call["id"] == f"{ls}:0"
    legacy = [ToolCallRepair(), ClientToolNames({"LS": ls}), LegacyFunctionCall()]
    out = orjson.loads(apply_whole(legacy, orjson.dumps(_answer(ls))))
    assert out["choices"][0]["message"]["function_call"]["name"] == "LS"


def _sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_stream_answers_map_aliases_back_including_legacy_function_call() -> None:
    ls = alias_of("LS")
    head = {"index": 0, "id": f"{ls}:0", "type": "function", "function": {"name": ls, "arguments": ""}}
    rest = {"index": 0, "function": {"arguments": "{}"}}
    chunks = [
        {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [head]}, "finish_reason": None}]},
        {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [rest]}, "finish_reason": None}]},
        {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    for legacy in (False, True):
        transforms: list[Any] = [ToolCallRepair(), ClientToolNames({"LS": ls})]
        if legacy:
            transforms.append(LegacyFunctionCall())
        out = StreamChain(transforms).feed(_sse(copy.deepcopy(chunks))).decode()
        assert f'"name":"{ls}"' not in out and '"name":"LS"' in out
        assert ("function_call" in out) is legacy
