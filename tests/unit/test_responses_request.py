"""The Responses request side without a server: translation to chat/completions, every refusal with
the ``param`` it names, the sealed reasoning, the response store and the prompt_cache_key hint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.responses.seal import KEY_ENTRY, Sealer, SealKeys, derive_key
from gateway.responses.store import ResponseStore, Stored
from gateway.routing import affinity
from gateway.state.memory import MemoryKeyValueState
from gateway.translate.responses_input import InputContext
from gateway.translate.responses_request import parse_request, translate
from gateway.translate.responses_types import ToolName
from tests.unit.conftest import Backend

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "codex_0.169.0_responses.json"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def chat(body: dict[str, Any], **ctx: Any) -> dict[str, Any]:
    return translate(parse_request({"model": "m", **body}), InputContext(**ctx)).chat


def refused(body: dict[str, Any], **ctx: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        translate(parse_request({"model": "m", **body}), InputContext(**ctx))
    assert info.value.status == 400
    return info.value


def test_string_input_and_instructions() -> None:
    body = chat({"input": "hi", "instructions": "Be brief.", "max_output_tokens": 300, "temperature": 0.5})
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 300 and body["temperature"] == 0.5
    assert "stream" not in body and "tools" not in body


def test_items_fold_into_chat_turns() -> None:
    items = [
        {"content": "weather?", "role": "user"},  # EasyInputMessage: no type
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be exact"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "get_weather:0", "name": "get_weather", "arguments": '{"city":"A"}'},
        {"type": "function_call", "call_id": "get_weather:1", "name": "get_weather", "arguments": '{"city":"B"}'},
        {"type": "function_call_output", "id": "fco_1", "call_id": "get_weather:0", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "get_weather:1",
            "output": [{"type": "input_text", "text": "rain"}],
        },
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "sum"}], "content": None},
        {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}", "status": "completed"},
        {"type": "function_call_output", "call_id": "c3", "output": "ok"},
    ]
    body = chat({"input": items, "tools": [WEATHER]})
    m = body["messages"]
    assert [x["role"] for x in m] == ["user", "system", "assistant", "tool", "tool", "assistant", "tool"]
    assert m[2]["content"] == "Let me check." and m[2]["reasoning_content"] == "think"
    assert [c["id"] for c in m[2]["tool_calls"]] == ["get_weather:0", "get_weather:1"]
    assert m[2]["tool_calls"][1]["function"] == {"name": "get_weather", "arguments": '{"city":"B"}'}
    assert m[4] == {"role": "tool", "tool_call_id": "get_weather:1", "content": "rain"}
    assert m[5]["reasoning_content"] == "sum" and m[5]["content"] == ""
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]


def test_images_and_text_formats() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}
    body = chat(
        {
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "what"}, image]}],
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
            "reasoning": {"effort": "low", "summary": "auto"},
            "user": "u1",
            "prompt_cache_key": "session-1",
            "stream": True,
        }
    )
    assert body["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AA", "detail": "low"},
    }
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert body["reasoning_effort"] == "low" and body["user"] == "u1"
    assert body["prompt_cache_key"] == "session-1"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert chat({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in chat({"input": "x", "text": {"format": {"type": "text"}, "verbosity": "low"}})
    assert chat({"input": "x", "safety_identifier": "s1"})["user"] == "s1"


def test_namespace_tools_flatten_and_map_back() -> None:
    ns = {
        "type": "namespace",
        "name": "crm",
        "description": "CRM tools",
        "tools": [
            {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
            {"type": "function", "name": "get_weather", "parameters": None},
        ],
    }
    items = [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "r"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "namespace": "crm", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "lookup", "namespace": "crm", "arguments": "{}"},
    ]
    req = parse_request({"model": "m", "input": items, "tools": [WEATHER, ns, {"type": "web_search"}]})
    t = translate(req, InputContext())
    assert [tool["function"]["name"] for tool in t.chat["tools"]] == ["get_weather", "lookup", "crm__get_weather"]
    assert t.names == {"lookup": ToolName("lookup", "crm"), "crm__get_weather": ToolName("get_weather", "crm")}
    calls = t.chat["messages"][0]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["crm__get_weather", "lookup"]
    assert t.omitted_tools == ["web_search"]
    named = chat(
        {"input": "x", "tools": [ns], "tool_choice": {"type": "function", "name": "lookup", "namespace": "crm"}}
    )
    assert named["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}


def test_tool_choice_forms() -> None:
    other = {**WEATHER, "name": "get_time"}
    assert chat({"input": "x", "tools": [WEATHER], "tool_choice": "required"})["tool_choice"] == "required"
    allowed = chat(
        {
            "input": "x",
            "tools": [WEATHER, other],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "get_time"}],
            },
        }
    )
    assert allowed["tool_choice"] == "required" and [t["function"]["name"] for t in allowed["tools"]] == ["get_time"]
    serial = chat({"input": "x", "tools": [WEATHER], "parallel_tool_calls": False})
    assert serial["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in chat({"input": "x", "tools": [WEATHER], "parallel_tool_calls": True})


def test_hosted_tools_and_items_rejected_for_a_reject_tenant() -> None:
    e = refused({"input": "x", "tools": [WEATHER, {"type": "file_search", "vector_store_ids": []}]}, hosted="reject")
    assert e.param == "tools[1].type" and e.code == "unsupported_tool"
    ns = {"type": "namespace", "name": "n", "tools": [{"type": "custom", "name": "patch"}]}
    assert refused({"input": "x", "tools": [ns]}, hosted="reject").param == "tools[0].tools[0].type"
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    assert refused({"input": ["x", item][1:]}, hosted="reject").param == "input[0].type"
    t = translate(parse_request({"model": "m", "input": [item, {"role": "user", "content": "hi"}]}), InputContext())
    assert t.omitted_items == ["web_search_call"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"background": True, "input": "x"}, "background"),
        ({"conversation": "conv_1", "input": "x"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}, "input": "x"}, "prompt"),
        ({"context_management": [{"type": "compaction"}], "input": "x"}, "context_management"),
        ({"moderation": {"model": "omni"}, "input": "x"}, "moderation"),
        ({"top_logprobs": 3, "input": "x"}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"], "input": "x"}, "include[0]"),
        ({"include": "reasoning.encrypted_content", "input": "x"}, "include"),
        ({}, "input"),
        ({"input": 3}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "stream": "yes"}, "stream"),
        ({"input": "x", "store": 1}, "store"),
        ({"input": "x", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
        ({"input": "x", "instructions": ["a"]}, "instructions"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "top_p": "1"}, "top_p"),
        ({"input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"input": "x", "user": 7}, "user"),
        ({"input": "x", "prompt_cache_key": 7}, "prompt_cache_key"),
        ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"input": "x", "reasoning": "high"}, "reasoning"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": 1}}}, "text.format.schema"),
        ({"input": "x", "text": "json"}, "text"),
        ({"input": "x", "tools": {}}, "tools"),
        ({"input": "x", "tools": ["t"]}, "tools[0]"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "x", "tools": [{**WEATHER, "parameters": []}]}, "tools[0].parameters"),
        ({"input": "x", "tools": [{**WEATHER, "description": 1}]}, "tools[0].description"),
        ({"input": "x", "tools": [{"type": "namespace", "name": "n"}]}, "tools[0]"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": 5}, "tool_choice"),
        (
            {
                "input": "x",
                "tools": [WEATHER],
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "z"}]},
            },
            "tool_choice.tools[0]",
        ),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": [5]}, "input[0]"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "message", "role": "user", "content": 5}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [5]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content[0].text"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "namespace": 1}]}, "input[0].namespace"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
            "input[0].output[0]",
        ),
        ({"input": [{"type": "reasoning", "summary": "s"}]}, "input[0].summary"),
        ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]}, "input[0].summary[0]"),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]}, "input[0].encrypted_content"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),
        ({"input": [{"type": "item_reference"}]}, "input[0].id"),
        ({"input": [{"type": "telepathy"}]}, "input[0].type"),
    ],
)
def test_every_mistake_names_its_param(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


def test_model_and_body_shape() -> None:
    with pytest.raises(GatewayError) as info:
        parse_request([1])
    assert info.value.param == "body"
    with pytest.raises(GatewayError) as info:
        parse_request({"input": "x"})
    assert info.value.param == "model" and info.value.code == "missing_required_parameter"


def test_ignored_fields_are_listed_and_harmless_ones_are_not() -> None:
    req = parse_request(
        {
            "model": "m",
            "input": "x",
            "truncation": "auto",
            "service_tier": "flex",
            "client_metadata": {"a": "b"},
            "max_tool_calls": 3,
            "include": ["web_search_call.results"],
            "brand_new_field": 1,
        }
    )
    assert req.ignored == ["brand_new_field"]
    t = translate(req, InputContext())
    assert t.echo["truncation"] == "auto" and t.echo["service_tier"] == "default"
    assert set(t.chat) == {"model", "messages"}


def test_codex_fixture_translates() -> None:
    capture = json.loads(FIXTURE.read_text())
    req = parse_request(capture["requests"][1]["body"])
    assert req.stream and not req.store and req.include_encrypted and req.sealed_items() and req.ignored == []
    t = translate(req, InputContext(unseal=lambda blob: f"opened {blob}"))
    roles = [m["role"] for m in t.chat["messages"]]
    assert roles == ["system", "system", "user", "user", "assistant", "tool"]
    turn = t.chat["messages"][4]
    assert turn["reasoning_content"] == "opened SEALED-BLOB-1"
    assert turn["tool_calls"][0]["id"] == "call_1"
    assert t.omitted_tools == ["web_search"]
    assert {n.namespace for n in t.names.values()} == {"multi_agent_v1"}
    assert t.chat["prompt_cache_key"] == capture["requests"][1]["body"]["prompt_cache_key"]


# --------------------------------------------------------------------------------------- sealing


def test_sealed_reasoning_opens_only_for_its_tenant_and_unchanged() -> None:
    sealer = Sealer(derive_key("a long random secret for the tests"))
    blob = sealer.seal("acme", "K2 thought about the weather in Beijing")
    assert "Beijing" not in blob and "weather" not in blob and blob.startswith("kgw1.")
    assert sealer.unseal("acme", blob) == "K2 thought about the weather in Beijing"
    assert sealer.unseal("other", blob) is None
    flipped = blob[:-3] + ("A" if blob[-3] != "A" else "B") + blob[-2:]
    assert sealer.unseal("acme", flipped) is None
    assert sealer.unseal("acme", "kgw1.!!!") is None and sealer.unseal("acme", "SEALED-BLOB-1") is None
    assert Sealer(derive_key("another secret")).unseal("acme", blob) is None


def test_forged_encrypted_content_is_a_400_naming_the_item() -> None:
    sealer = Sealer(derive_key("secret"))
    items = [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": sealer.seal("other", "x")},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
    e = refused({"input": items}, unseal=lambda blob: sealer.unseal("acme", blob))
    assert e.param == "input[1].encrypted_content" and e.code == "invalid_encrypted_content"


def test_shared_key_is_agreed_once_and_survives_a_new_process() -> None:
    async def run() -> None:
        kv = MemoryKeyValueState()
        first = await SealKeys(kv, None).sealer()
        second = await SealKeys(kv, None).sealer()  # another process on the same state
        assert second.unseal("t", first.seal("t", "same key")) == "same key"
        assert len(await kv.get(KEY_ENTRY) or b"") == 32
        secret = await SealKeys(kv, "configured").sealer()
        assert secret.unseal("t", first.seal("t", "x")) is None

    asyncio.run(run())


# ----------------------------------------------------------------------------------------- store


def _response(rid: str, text: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "output": [
            {"type": "reasoning", "id": f"rs_{rid}", "summary": [], "encrypted_content": "kgw1.x"},
            {
                "type": "message",
                "id": f"msg_{rid}",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text}],
            },
        ],
    }


def test_store_chains_conversations_per_tenant() -> None:
    async def run() -> None:
        store = ResponseStore(MemoryKeyValueState())
        first = Stored(_response("r1", "one"), [{"id": "msg_a", "type": "message", "role": "user", "content": "a"}])
        first.originals = {"rs_r1": "original thought"}
        await store.save("acme", first, 600)
        second = Stored(
            _response("r2", "two"), [{"id": "msg_b", "type": "message", "role": "user", "content": "b"}], ["r1"]
        )
        await store.save("acme", second, 600)
        conv = await store.conversation("acme", "r2", 600)
        assert conv.ancestors == ["r1", "r2"]
        assert [i["id"] for i in conv.items] == ["msg_a", "rs_r1", "msg_r1", "msg_b", "rs_r2", "msg_r2"]
        assert "encrypted_content" not in conv.items[1] and conv.originals == {"rs_r1": "original thought"}
        messages = translate(
            parse_request({"model": "m", "input": "c", "previous_response_id": "r2"}),
            InputContext(originals=conv.originals),
            conv.items,
        ).chat["messages"]
        assert messages[1] == {"role": "assistant", "content": "one", "reasoning_content": "original thought"}
        assert messages[-1] == {"role": "user", "content": "c"}
        with pytest.raises(GatewayError) as info:
            await store.conversation("other", "r2", 600)
        assert info.value.param == "previous_response_id"
        found, originals = await store.referenced("acme", ["msg_r2"], ["rs_r1"], [])
        assert set(found) == {"msg_r2"} and originals == {"rs_r1": "original thought"}
        found, _ = await store.referenced("acme", ["msg_a"], [], conv.items)
        assert found == {"msg_a": conv.items[0]}
        assert await store.delete("acme", "r1") and not await store.delete("acme", "r1")
        with pytest.raises(GatewayError) as info:
            await store.conversation("acme", "r2", 600)  # an earlier turn is gone
        assert "r1" in info.value.message

    asyncio.run(run())


# ------------------------------------------------------------------------------ affinity hint


def test_prompt_cache_key_keeps_a_changed_conversation_with_its_upstream() -> None:
    async def run() -> None:
        kv = MemoryKeyValueState()
        one = {"messages": [{"role": "user", "content": "long history"}], "prompt_cache_key": "s1"}
        await affinity.remember(kv, "t", affinity.prefix_chain(one), "up/a", 900, 300, 1000.0)
        compacted = {"messages": [{"role": "user", "content": "summary"}], "prompt_cache_key": "s1"}
        assert await affinity.held_prefixes(kv, "t", affinity.prefix_chain(compacted), 1001.0) == {"up/a": 900}
        unkeyed = {"messages": compacted["messages"]}
        assert await affinity.held_prefixes(kv, "t", affinity.prefix_chain(unkeyed), 1001.0) == {}
        assert await affinity.held_prefixes(kv, "other", affinity.prefix_chain(compacted), 1001.0) == {}

    asyncio.run(run())


def test_openai_agents_fixture_translates() -> None:
    capture = json.loads((FIXTURE.parent / "openai_agents_0.24.0_responses.json").read_text())
    for request in capture["requests"]:
        req = parse_request(request["body"])
        assert req.ignored == [] and not req.include_encrypted and req.store
        t = translate(req, InputContext(unseal=lambda blob: "opened"))
        assert t.chat["messages"][0]["role"] == "system" and t.chat["messages"][1]["role"] == "user"
        for message in t.chat["messages"]:
            if message.get("tool_calls"):
                assert message["reasoning_content"] == "opened"


def test_stored_response_paths() -> None:
    from gateway.api.responses_items import split_path

    assert split_path("/v1/responses/resp_1") == ("resp_1", "")
    assert split_path("/v1/responses/resp_1/") == ("resp_1", "")
    assert split_path("/v1/responses/resp_1/input_items") == ("resp_1", "input_items")
    assert split_path("/v1/responses/resp_1/cancel") == ("resp_1", "cancel")
    assert split_path("/v1/responses/resp_1/other") is None
    assert split_path("/v1/responses/") is None and split_path("/v1/chat/completions") is None


async def test_put_if_absent_keeps_the_first_value(backend: Backend) -> None:
    """The sealing key's set-if-absent, on memory and on a real Redis: every process gets the first."""
    kv = backend.kv()
    assert await kv.put_if_absent("responses:seal-key", b"first", 60) == b"first"
    assert await kv.put_if_absent("responses:seal-key", b"second", 60) == b"first"
    assert await kv.get("responses:seal-key") == b"first"
    one, two = [await SealKeys(kv, None).sealer() for _ in range(2)]  # b"first" is no key: replaced once
    assert two.unseal("t", one.seal("t", "shared")) == "shared"
    assert len(await kv.get("responses:seal-key") or b"") == 32
