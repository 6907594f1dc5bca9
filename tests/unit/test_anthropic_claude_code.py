"""The Messages API as Claude Code 2.1 speaks it: the captured requests translate to bodies K2's
upstreams accept, and each feature of them (mid-conversation system messages, thinking types and
display, effort, context management, deferred and typed tools, mid-conversation tool changes,
unknown fields) follows its documented rule; wrong input is a 400 naming the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from gateway.config import ModelShaping
from gateway.errors import GatewayError
from gateway.tools.schemas import normalize_tools
from gateway.translate.anthropic_controls import CLEARED
from gateway.translate.anthropic_request import Translation, translate
from gateway.translate.anthropic_response import AnthropicStream, to_message
from gateway.upstreams.shaping import shape
from simulator.profiles import PROFILES
from simulator.request import SimOptions, parse_request
from tests.conftest import ROOT

FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "claude_code_2.1.328_messages.json").read_text())
CAPTURED = FIXTURE["requests"]
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}


def tool(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": f"tool {name}", "input_schema": SCHEMA, **extra}


def request(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "kimi-k2-thinking", "max_tokens": 1000, "messages": messages, **extra}


def names(t: Translation) -> list[str]:
    return [tool["name"] for tool in t.body.get("tools", [])]


def bad(body: Any) -> str:
    with pytest.raises(GatewayError) as caught:
        translate(body)
    assert caught.value.status == 400
    return caught.value.message


# -- the captured requests ------------------------------------------------------------------------


def test_fixture_is_what_claude_code_2_1_328_sends() -> None:
    first = CAPTURED[0]
    assert first["path"] == "/v1/messages?beta=true"
    assert "x-api-key" not in first["headers"] and "authorization" not in first["headers"]
    assert "context-management-2025-06-27" in first["headers"]["anthropic-beta"]
    body = first["body"]
    assert body["messages"][1]["role"] == "system"
    assert body["thinking"] == {"type": "adaptive", "display": "omitted"}
    assert body["context_management"]["edits"][0]["type"] == "clear_thinking_20251015"
    assert body["output_config"] == {"effort": "high"}
    assert any(t.get("defer_loading") for t in body["tools"])


@pytest.mark.parametrize("index", range(len(CAPTURED)))
def test_captured_request_translates_without_loss_notes(index: int) -> None:
    body = CAPTURED[index]["body"]
    t = translate(copy.deepcopy(body))
    assert t.notes.ignored == []  # everything Claude Code sends has a rule
    assert t.display == "omitted" and t.context_management and t.applied_edits == []
    sent = t.body
    assert sent["reasoning_effort"] == "high" and "thinking" not in sent
    assert [m["role"] for m in sent["messages"][:2]] == ["system", "user"]
    assert all(m["role"] != "system" for m in sent["messages"][1:])
    assert "x-anthropic-billing-header" not in sent["messages"][0]["content"]
    assert sent["messages"][0]["content"].startswith("You are a Claude agent")
    user = sent["messages"][1]["content"]
    env = body["messages"][1]["content"]
    env_text = env if isinstance(env, str) else env[0]["text"]
    assert user.endswith(f"<system-reminder>\n{env_text}\n</system-reminder>")
    declared = [t["name"] for t in body["tools"] if not t.get("defer_loading")]
    assert [tool["name"] for tool in sent["tools"]] == declared
    assert set(sent) <= {"model", "messages", "max_tokens", "stream", "stream_options", "tools", "user"} | {
        "reasoning_effort"
    }


@pytest.mark.parametrize("index", [0, 1])
def test_captured_first_requests_are_valid_k2_requests(index: int) -> None:
    sent = translate(copy.deepcopy(CAPTURED[index]["body"])).body
    normalize_tools(sent)
    chat = parse_request(sent, PROFILES["instant"], SimOptions())
    assert chat.messages[-1]["role"] == "user" and chat.stream


def test_captured_second_request_carries_the_call_and_its_result() -> None:
    sent = translate(copy.deepcopy(CAPTURED[2]["body"])).body
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assistant, result = sent["messages"][2], sent["messages"][3]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "Read",
        "arguments": json.dumps(CAPTURED[2]["body"]["messages"][2]["content"][0]["input"], separators=(",", ":")),
    }
    assert result["tool_call_id"] == assistant["tool_calls"][0]["id"] and "pineapple" in result["content"]
    # the folded system text is the same bytes on both turns, so the prefix (and cache) holds
    assert sent["messages"][:2] == translate(copy.deepcopy(CAPTURED[1]["body"])).body["messages"][:2]


# -- system messages in messages -----------------------------------------------------------------


def test_leading_system_messages_join_the_system_prompt() -> None:
    t = translate(
        request([{"role": "system", "content": "Second."}, {"role": "user", "content": "hi"}], system="First.")
    )
    assert t.body["messages"] == [{"role": "system", "content": "First.\n\nSecond."}, {"role": "user", "content": "hi"}]


def test_system_after_an_assistant_turn_is_a_user_turn_in_order() -> None:
    t = translate(
        request(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "why?"},
                        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}},
                    ],
                },
                {"role": "system", "content": "Now in French."},
            ]
        )
    )
    m = t.body["messages"]
    assert m[2] == {"role": "user", "content": "<system-reminder>\nBe brief.\n</system-reminder>"}
    assert m[3]["content"][-1] == {"type": "text", "text": "<system-reminder>\nNow in French.\n</system-reminder>"}
    assert len(m) == 4


def test_system_after_tool_results_follows_them() -> None:
    t = translate(
        request(
            [
                {"role": "user", "content": "ls"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "LS:0", "name": "LS", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "LS:0", "content": "a b"}]},
                {"role": "system", "content": "Reminder."},
            ],
            tools=[tool("LS")],
        )
    )
    assert [m["role"] for m in t.body["messages"]] == ["user", "assistant", "tool", "user"]


def test_clear_at_next_user_message_and_per_turn_effort() -> None:
    once = {
        "role": "system",
        "content": "Only now.",
        "clear_at": "next_user_message",
        "output_config": {"effort": "low"},
    }
    t = translate(request([{"role": "user", "content": "a"}, once]))
    assert "Only now." in t.body["messages"][-1]["content"] and t.body["reasoning_effort"] == "low"
    later = translate(
        request(
            [
                {"role": "user", "content": "a"},
                once,
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            output_config={"effort": "medium"},
        )
    )
    assert "Only now." not in json.dumps(later.body["messages"]) and later.body["reasoning_effort"] == "medium"


# -- thinking, effort -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thinking", "config", "fields", "display"),
    [
        (None, None, {}, "summarized"),
        ({"type": "adaptive"}, None, {}, "summarized"),
        ({"type": "adaptive", "display": "omitted"}, {"effort": "max"}, {"reasoning_effort": "xhigh"}, "omitted"),
        ({"type": "enabled", "budget_tokens": 2048}, None, {"reasoning_effort": "low"}, "summarized"),
        ({"type": "enabled", "budget_tokens": 10000}, None, {"reasoning_effort": "medium"}, "summarized"),
        (
            {"type": "enabled", "budget_tokens": 31999, "display": "summarized"},
            None,
            {"reasoning_effort": "high"},
            "summarized",
        ),
        ({"type": "enabled", "budget_tokens": 31999}, {"effort": "low"}, {"reasoning_effort": "low"}, "summarized"),
        ({"type": "disabled"}, {"effort": "high"}, {"thinking": {"type": "disabled"}}, "hidden"),
        ({"type": "between_tools"}, None, {"thinking": {"type": "disabled"}}, "hidden"),
    ],
)
def test_thinking_and_effort(thinking: Any, config: Any, fields: dict[str, Any], display: str) -> None:
    extra = {k: v for k, v in (("thinking", thinking), ("output_config", config)) if v is not None}
    t = translate(request([{"role": "user", "content": "hi"}], **extra))
    assert {k: t.body[k] for k in ("thinking", "reasoning_effort") if k in t.body} == fields
    assert t.display == display


@pytest.mark.parametrize(
    ("form", "expected"),
    [("none", {}), ("type", {"thinking": {"type": "enabled"}}), ("effort", {"reasoning_effort": "max"})],
)
def test_effort_reaches_each_upstream_in_its_form(form: str, expected: dict[str, Any]) -> None:
    body = translate(request([{"role": "user", "content": "hi"}], output_config={"effort": "max"})).body
    shape(body, ModelShaping(thinking=form), 0)  # type: ignore[arg-type]
    assert {k: body[k] for k in ("thinking", "reasoning_effort") if k in body} == expected


def test_thinking_disabled_reaches_k2_6_as_its_switch() -> None:
    body = translate(request([{"role": "user", "content": "hi"}], thinking={"type": "disabled"})).body
    shape(body, ModelShaping(thinking="type"), 0)
    assert body["thinking"] == {"type": "disabled"} and "reasoning_effort" not in body


def test_display_shapes_the_answer() -> None:
    answer = {
        "choices": [
            {
                "message": {"role": "assistant", "reasoning_content": "secret plan", "content": "hi"},
                "finish_reason": "stop",
            }
        ]
    }
    shown = to_message(answer, "m", "msg_1")["content"]
    assert shown[0] == {"type": "thinking", "thinking": "secret plan", "signature": ""}
    omitted = to_message(answer, "m", "msg_1", "omitted")["content"]
    assert omitted[0] == {"type": "thinking", "thinking": "", "signature": ""} and omitted[1]["text"] == "hi"
    assert [b["type"] for b in to_message(answer, "m", "msg_1", "hidden")["content"]] == ["text"]


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_stream_display_and_context_management() -> None:
    data = _sse(
        {"choices": [{"index": 0, "delta": {"reasoning_content": "secret plan"}}]},
        {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
    )
    applied = {
        "applied_edits": [{"type": "clear_thinking_20251015", "cleared_thinking_turns": 1, "cleared_input_tokens": 3}]
    }
    stream = AnthropicStream("m", "msg_1", "omitted", applied)
    out = (stream.feed(data) + stream.close()).decode()
    assert "secret plan" not in out and '"type":"thinking"' in out and "text_delta" in out
    delta = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ") and "message_delta" in line]
    assert delta[0]["context_management"] == applied
    hidden = AnthropicStream("m", "msg_1", "hidden")
    assert "thinking" not in (hidden.feed(data) + hidden.close()).decode()


# -- context management ---------------------------------------------------------------------------


def _history() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "one"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "old thought", "signature": ""},
                {"type": "text", "text": "1"},
            ],
        },
        {"role": "user", "content": "two"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "loop thought", "signature": ""},
                {"type": "tool_use", "id": "Read:0", "name": "Read", "input": {"path": "a"}},
                {"type": "tool_use", "id": "Read:1", "name": "Read", "input": {"path": "b"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "Read:0", "content": "A" * 400},
                {"type": "tool_result", "tool_use_id": "Read:1", "content": "B" * 400},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "last thought", "signature": ""},
                {"type": "text", "text": "2"},
            ],
        },
        {"role": "user", "content": "three"},
    ]


def test_clear_thinking_keeps_tool_call_turns_and_the_last_turns() -> None:
    edits = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]}
    t = translate(request(_history(), tools=[tool("Read")], context_management=edits))
    reasoning = [m.get("reasoning_content") for m in t.body["messages"] if m["role"] == "assistant"]
    assert reasoning == [None, "loop thought", "last thought"]
    [applied] = t.applied_edits
    assert applied["type"] == "clear_thinking_20251015" and applied["cleared_thinking_turns"] == 1
    assert applied["cleared_input_tokens"] > 0
    keep_all = translate(
        request(
            _history(),
            tools=[tool("Read")],
            context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        )
    )
    assert keep_all.applied_edits == [] and "old thought" in json.dumps(keep_all.body)


def test_clear_tool_uses_past_the_trigger() -> None:
    edit = {
        "type": "clear_tool_uses_20250919",
        "trigger": {"type": "input_tokens", "value": 100},
        "keep": {"type": "tool_uses", "value": 1},
        "clear_tool_inputs": True,
    }
    t = translate(request(_history(), tools=[tool("Read")], context_management={"edits": [edit]}))
    results = [m["content"] for m in t.body["messages"] if m["role"] == "tool"]
    assert results == [CLEARED, "B" * 400]
    assert t.applied_edits == [
        {"type": "clear_tool_uses_20250919", "cleared_tool_uses": 1, "cleared_input_tokens": 100}
    ]
    assert t.notes.ignored == ["context_management.edits.0.clear_tool_inputs"]
    under = translate(
        request(
            _history(),
            tools=[tool("Read")],
            context_management={"edits": [{**edit, "trigger": {"type": "input_tokens", "value": 10**6}}]},
        )
    )
    assert under.applied_edits == [] and CLEARED not in json.dumps(under.body)
    excluded = translate(
        request(_history(), tools=[tool("Read")], context_management={"edits": [{**edit, "exclude_tools": ["Read"]}]})
    )
    assert excluded.applied_edits == []


def test_unknown_edit_is_named_not_refused() -> None:
    t = translate(
        request([{"role": "user", "content": "hi"}], context_management={"edits": [{"type": "compact_20260112"}]})
    )
    assert t.notes.ignored == ["context_management.edits.0 (compact_20260112)"]
    assert t.notes.header() == (b"x-gateway-ignored", b"context_management.edits.0 (compact_20260112)")


# -- tools ----------------------------------------------------------------------------------------


def test_tool_fields_accepted_and_typed_tools_left_out() -> None:
    tools = [
        tool(
            "Read",
            cache_control={"type": "ephemeral"},
            strict=True,
            eager_input_streaming=True,
            input_examples=[{"path": "x"}],
        ),
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
        tool("Write", type="custom"),
    ]
    t = translate(request([{"role": "user", "content": "hi"}], tools=tools))
    assert t.body["tools"] == [tool("Read"), tool("Write")]
    assert t.notes.ignored == ["tools.1 (web_search_20250305)", "tools.2 (tool_search_tool_regex_20251119)"]
    assert normalize_tools(t.body).has_tools


def test_deferred_tool_loads_when_referenced() -> None:
    tools = [tool("ToolSearch"), tool("WebFetch", defer_loading=True), tool("Cron", defer_loading=True)]
    first = translate(request([{"role": "user", "content": "fetch"}], tools=tools))
    assert names(first) == ["ToolSearch"]
    history = [
        {"role": "user", "content": "fetch"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "ToolSearch:0", "name": "ToolSearch", "input": {"query": "fetch"}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "ToolSearch:0",
                    "content": [{"type": "tool_reference", "tool_name": "WebFetch"}],
                }
            ],
        },
    ]
    loaded = translate(request(history, tools=tools))
    assert names(loaded) == ["ToolSearch", "WebFetch"]
    assert loaded.body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "ToolSearch:0",
        "content": "Tool available: WebFetch",
    }


def test_mid_conversation_tool_changes() -> None:
    change = {
        "role": "system",
        "content": [
            {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": tool("Monitor")}},
            {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "Bash"}},
            {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "Cron"}},
            {"type": "tool_addition", "tool": {"type": "mcp_toolset_reference", "server_name": "s"}},
            {"type": "text", "text": "Monitor is available."},
        ],
    }
    tools = [tool("Bash"), tool("Read"), tool("Cron", defer_loading=True)]
    t = translate(request([{"role": "user", "content": "go"}, change], tools=tools))
    assert names(t) == ["Read", "Cron", "Monitor"]
    assert t.notes.ignored == ["messages.1.content.3 (tool_addition mcp_toolset_reference)"]
    assert t.body["messages"][-1]["content"].endswith("<system-reminder>\nMonitor is available.\n</system-reminder>")


def test_tool_choice_without_any_upstream_tool_is_left_out() -> None:
    t = translate(
        request([{"role": "user", "content": "hi"}], tools=[tool("X", defer_loading=True)], tool_choice={"type": "any"})
    )
    assert "tools" not in t.body and "tool_choice" not in t.body


# -- the rest of the body ---------------------------------------------------------------------------


def test_unknown_fields_are_named_and_hints_are_silent() -> None:
    t = translate(
        request(
            [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
            top_k=5,
            mcp_servers=[{"name": "x"}],
            cache_control={"type": "ephemeral"},
            service_tier="auto",
            speed="fast",
            metadata={"user_id": "u1", "other": 1},
            output_config={"effort": "low", "task_budget": {"type": "tokens", "total": 10}},
        )
    )
    assert t.notes.ignored == ["output_config.task_budget", "top_k", "mcp_servers"]
    assert t.body["user"] == "u1" and "top_k" not in t.body and "metadata" not in t.body


def test_claude_codes_user_id_becomes_its_account_or_device() -> None:
    def user(user_id: str) -> str:
        return str(translate(request([{"role": "user", "content": "x"}], metadata={"user_id": user_id})).body["user"])

    captured = json.loads(CAPTURED[0]["body"]["metadata"]["user_id"])
    assert user(CAPTURED[0]["body"]["metadata"]["user_id"]) == captured["device_id"]
    assert user('{"device_id": "d1", "account_uuid": "acct-1", "session_id": "s"}') == "acct-1"
    assert user("user_abc_account__session_1") == "user_abc_account__session_1"
    assert user("{not json") == "{not json"


def test_output_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    t = translate(
        request(
            [{"role": "user", "content": "hi"}], output_config={"format": {"type": "json_schema", "schema": schema}}
        )
    )
    assert t.body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def test_documents_and_server_blocks() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "title": "notes",
                    "source": {"type": "text", "media_type": "text/plain", "data": "plain"},
                },
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
                {
                    "type": "search_result",
                    "title": "r",
                    "source": "http://s",
                    "content": [{"type": "text", "text": "found"}],
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}},
                {"type": "web_search_tool_result", "tool_use_id": "srv_1", "content": []},
                {"type": "text", "text": "ok"},
            ],
        },
        {"role": "user", "content": "more"},
    ]
    t = translate(request(messages))
    assert t.body["messages"][0] == {"role": "user", "content": "notes\nplain\nr\nhttp://s\nfound"}
    assert t.body["messages"][1] == {"role": "assistant", "content": "ok"}
    assert t.notes.ignored == [
        "messages.0.content.1 (document application/pdf)",
        "messages.1.content.0 (server_tool_use)",
        "messages.1.content.1 (web_search_tool_result)",
    ]


def test_empty_thinking_block_sends_no_reasoning() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "", "signature": ""},
                {"type": "tool_use", "id": "R:0", "name": "R", "input": {}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "R:0", "content": "x"}]},
    ]
    assistant = translate(request(messages, tools=[tool("Rx")])).body["messages"][1]
    assert "reasoning_content" not in assistant  # the reasoning step puts the kept one back


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            request([{"role": "developer", "content": "x"}]),
            "messages.0.role must be 'user', 'assistant' or 'system', got 'developer'",
        ),
        (request([{"role": "user", "content": "x"}], thinking={"type": "sometimes"}), "thinking.type must be one of"),
        (
            request([{"role": "user", "content": "x"}], thinking={"type": "adaptive", "display": "full"}),
            "thinking.display must be one of",
        ),
        (
            request([{"role": "user", "content": "x"}], thinking={"type": "enabled", "budget_tokens": "lots"}),
            "thinking.budget_tokens",
        ),
        (request([{"role": "user", "content": "x"}], thinking=True), "thinking must be an object"),
        (
            request([{"role": "user", "content": "x"}], output_config={"effort": "extreme"}),
            "output_config.effort must be one of",
        ),
        (
            request([{"role": "user", "content": "x"}], output_config={"format": {"type": "text"}}),
            "output_config.format",
        ),
        (
            request([{"role": "user", "content": "x"}], context_management={"edits": "all"}),
            "context_management.edits must be an array",
        ),
        (
            request(
                [{"role": "user", "content": "x"}],
                context_management={"edits": [{"type": "clear_tool_uses_20250919", "keep": 3}]},
            ),
            "context_management.edits.0.keep",
        ),
        (
            request([{"role": "user", "content": "x"}], tools=[{"name": "x"}]),
            "tools.0 ('x').input_schema: Field required",
        ),
        (
            request([{"role": "user", "content": "x"}, {"role": "system", "content": [{"type": "tool_addition"}]}]),
            "messages.1.content.0.tool: Field required",
        ),
        (
            request([{"role": "user", "content": "x"}, {"role": "system", "content": 5}]),
            "messages.1.content must be a string",
        ),
    ],
)
def test_mistakes_are_400s_naming_the_field(body: dict[str, Any], message: str) -> None:
    assert message in bad(body)


def test_a_nameless_tool_reaches_the_tool_steps_400() -> None:
    body = translate(request([{"role": "user", "content": "x"}], tools=[{"input_schema": SCHEMA}])).body
    with pytest.raises(GatewayError) as caught:
        normalize_tools(body)
    assert "tools[0]: the function has no name" in caught.value.message


def test_count_tokens_accepts_the_same_bodies() -> None:
    body = copy.deepcopy(CAPTURED[0]["body"])
    del body["max_tokens"], body["stream"]
    t = translate(body, counting=True)
    assert t.body["max_tokens"] == 1 and t.body["tools"]
