"""The Responses answer side: chat/completions answers and streams → the Responses object and event
sequence, checked against the openai SDK's own types and stream accumulator and openai-agents'
Responses model, whatever way the network cut the chat stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.translate.responses_input import InputContext
from gateway.translate.responses_request import parse_request, translate
from gateway.translate.responses_response import ResponsesStream as Reexported
from gateway.translate.responses_response import error_body, to_response
from gateway.translate.responses_stream import ResponsesStream
from gateway.translate.responses_types import ResponseContext, ToolName, default_echo
from tests.responses_events import joined

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
MOONSHOT_USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150, "cached_tokens": 100}
VLLM_USAGE = {
    "prompt_tokens": 98,
    "completion_tokens": 61,
    "total_tokens": 159,
    "prompt_tokens_details": {"cached_tokens": 96},
    "completion_tokens_details": {"reasoning_tokens": 40},
}


def ctx(**kw: Any) -> ResponseContext:
    kw.setdefault("names", {"multi_agent_v1__spawn": ToolName("spawn", "multi_agent_v1")})
    return ResponseContext("resp_0123", "kimi-k2-thinking", 1_700_000_000, **kw)


def answer(
    *,
    reasoning: str | None = None,
    field: str = "reasoning_content",
    text: str | None = None,
    calls: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
    finish: str = "stop",
    usage: dict[str, Any] | None = MOONSHOT_USAGE,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        message[field] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": n, "arguments": a}} for cid, n, a in calls
        ]
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up"}
    out["choices"] = [{"index": 0, "message": message, "finish_reason": finish}]
    if usage is not None:
        out["usage"] = usage
    return out


def chunks(chat: dict[str, Any], *, piece: int = 3, vllm: bool = False) -> bytes:
    """The chat stream that carries ``chat`` (Moonshot: usage in the last choice; vLLM: a usage chunk)."""
    choice = chat["choices"][0]
    message = choice["message"]
    events: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    for key in ("reasoning_content", "reasoning", "content"):
        value = message.get(key) or ""
        events += [{key: value[i : i + piece]} for i in range(0, len(value), piece)]
    for index, call in enumerate(message.get("tool_calls") or ()):
        args = call["function"]["arguments"]
        head = {"index": index, "id": call["id"], "type": "function"}
        events.append({"tool_calls": [{**head, "function": {"name": call["function"]["name"], "arguments": ""}}]})
        events += [
            {"tool_calls": [{"index": index, "function": {"arguments": args[i : i + piece]}}]}
            for i in range(0, len(args), piece)
        ]
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    raw = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in events]
    last: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    if chat.get("usage") and not vllm:
        last["usage"] = chat["usage"]
    raw.append({**base, "choices": [last]})
    if chat.get("usage") and vllm:
        raw.append({**base, "choices": [], "usage": chat["usage"]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in raw) + b"data: [DONE]\n\n"


def parse(sse: bytes) -> list[dict[str, Any]]:
    """Every event, checked: framing, SDK type, sequence numbers, ids consistent per output_index."""
    out: list[dict[str, Any]] = []
    items: dict[int, str | None] = {}
    for block in sse.split(b"\n\n")[:-1]:
        head, data = block.split(b"\n", 1)
        assert data.startswith(b"data: ")
        event = orjson.loads(data[6:])
        assert head == b"event: " + event["type"].encode()
        EVENTS.validate_python(event)
        assert event["sequence_number"] == len(out)
        if event["type"] == "response.output_item.added":
            assert event["output_index"] == len(items)
            items[event["output_index"]] = event["item"].get("id")
        elif "output_index" in event:
            assert event["output_index"] in items
            want = items[event["output_index"]]
            got = event.get("item_id", event.get("item", {}).get("id"))
            assert got == want
        out.append(event)
    assert sse.endswith(b"\n\n") and out
    return out


def run(context: ResponseContext, sse: bytes, cut: int | None = None) -> list[dict[str, Any]]:
    stream = ResponsesStream(context)
    parts = [sse] if cut is None else [sse[i : i + cut] for i in range(0, len(sse), cut)]
    return parse(b"".join(stream.feed(p) for p in parts) + stream.close())


def final_equals_non_stream(
    chat: dict[str, Any], make: Callable[..., ResponseContext] = ctx, **kw: Any
) -> dict[str, Any]:
    done: list[dict[str, Any]] = []
    events = run(make(on_done=done.append), chunks(chat, **kw))
    final = events[-1]["response"]
    assert done == [final]
    assert final == to_response(chat, make())
    Response.model_validate(final)
    return final


# -- non-stream


def test_text_answer_is_a_completed_response_with_echo_defaults_and_usage() -> None:
    done: list[dict[str, Any]] = []
    req = {"model": "x", "input": "hi", "instructions": "be brief", "store": False, "metadata": {"k": "v"}}
    echo = translate(parse_request(req), InputContext()).echo
    assert list(echo) == list(default_echo())  # every field, in the API's order
    c = ctx(echo=echo, on_done=done.append)
    r = to_response(answer(text="Hello!"), c)
    Response.model_validate(r)
    assert done == [r]
    assert (r["id"], r["object"], r["status"], r["model"]) == ("resp_0123", "response", "completed", "kimi-k2-thinking")
    assert r["error"] is None and r["incomplete_details"] is None
    assert r["output"] == [
        {
            "id": "msg_0123_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
        }
    ]
    assert (r["instructions"], r["store"], r["metadata"]) == ("be brief", False, {"k": "v"})
    assert (r["tool_choice"], r["tools"], r["parallel_tool_calls"], r["truncation"]) == ("auto", [], True, "disabled")
    assert r["text"] == {"format": {"type": "text"}} and r["temperature"] == 1.0
    assert r["usage"] == {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 150,
    }
    assert "output_text" not in r


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_shown_becomes_a_summary_item_first(field: str) -> None:
    r = to_response(answer(reasoning="Think.", field=field, text="Hi"), ctx())
    assert r["output"][0] == {
        "id": "rs_0123_0",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Think."}],
    }
    assert r["output"][1]["id"] == "msg_0123_1"


def test_stripped_reasoning_without_seal_leaves_no_reasoning_item() -> None:
    r = to_response(answer(text="Hi"), ctx(original_reasoning=lambda: "secret"))
    assert [i["type"] for i in r["output"]] == ["message"]


def test_sealed_reasoning_seals_the_original_even_when_stripped_or_redacted() -> None:
    seal = "sealed:{}".format
    stripped = to_response(answer(text="Hi"), ctx(seal=seal, original_reasoning=lambda: "K2 own text"))
    assert stripped["output"][0] == {
        "id": "rs_0123_0",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": "sealed:K2 own text",
    }
    redacted = to_response(answer(reasoning="[redacted]", text="Hi"), ctx(seal=seal, original_reasoning=lambda: "raw"))
    assert redacted["output"][0]["summary"][0]["text"] == "[redacted]"
    assert redacted["output"][0]["encrypted_content"] == "sealed:raw"
    shown = to_response(answer(reasoning="plain", text="Hi"), ctx(seal=seal))
    assert shown["output"][0]["encrypted_content"] == "sealed:plain"
    nothing = to_response(answer(text="Hi"), ctx(seal=seal, original_reasoning=lambda: None))
    assert [i["type"] for i in nothing["output"]] == ["message"]


def test_tool_calls_map_back_namespaces_and_keep_call_ids() -> None:
    calls = [("call_a", "exec_command", '{"cmd":"ls"}'), ("call_b", "multi_agent_v1__spawn", "{}")]
    r = to_response(answer(reasoning="r", calls=calls, finish="tool_calls"), ctx())
    Response.model_validate(r)
    assert [i["type"] for i in r["output"]] == ["reasoning", "function_call", "function_call"]
    first, second = r["output"][1:]
    assert first == {
        "id": "fc_0123_1",
        "type": "function_call",
        "status": "completed",
        "arguments": '{"cmd":"ls"}',
        "call_id": "call_a",
        "name": "exec_command",
    }
    assert (second["name"], second["namespace"], second["call_id"]) == ("spawn", "multi_agent_v1", "call_b")


def test_odd_tool_calls_get_an_id_and_string_arguments() -> None:
    chat = answer(finish="tool_calls")
    chat["choices"][0]["message"]["tool_calls"] = [
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    ]
    (item,) = to_response(chat, ctx())["output"]
    assert (item["call_id"], item["arguments"]) == ("call_0123_0", '{"a":1}')


def test_length_is_incomplete_with_max_output_tokens() -> None:
    r = to_response(answer(reasoning="long", text="cut he", finish="length"), ctx())
    Response.model_validate(r)
    assert r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["output"][-1]["status"] == "incomplete"
    only_reasoning = to_response(answer(reasoning="long", finish="length"), ctx())
    assert [i["type"] for i in only_reasoning["output"]] == ["reasoning"]


def test_vllm_usage_shape_and_missing_usage() -> None:
    u = to_response(answer(text="x", usage=VLLM_USAGE), ctx())["usage"]
    assert (u["input_tokens"], u["input_tokens_details"]["cached_tokens"]) == (98, 96)
    assert (u["output_tokens"], u["output_tokens_details"]["reasoning_tokens"], u["total_tokens"]) == (61, 40, 159)
    assert to_response(answer(text="x", usage=None), ctx())["usage"]["total_tokens"] == 0


def test_empty_answer_is_an_empty_message() -> None:
    r = to_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}, ctx())
    assert r["output"][0]["content"][0]["text"] == "" and r["status"] == "completed"


def test_error_body_is_openai_shaped() -> None:
    assert error_body(400, "bad", "invalid_value", "tools[2]") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "tools[2]", "code": "invalid_value"}
    }
    assert error_body(404, "no such response")["error"]["type"] == "invalid_request_error"
    assert error_body(429, "slow")["error"]["type"] == "rate_limit_error"
    assert error_body(502, "up", kind="upstream_error")["error"]["type"] == "upstream_error"


# -- stream


def test_stream_event_sequence_for_reasoning_text_and_tools() -> None:
    assert Reexported is ResponsesStream  # the front end imports both from responses_response
    chat = answer(
        reasoning="Let me think.",
        text="Calling.",
        calls=[("call_1", "f", '{"x": 1}'), ("call_2", "g", "{}")],
        finish="tool_calls",
    )
    events = run(ctx(), chunks(chat))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    rs = ["response.output_item.added", "response.reasoning_summary_part.added"]
    rs += ["response.reasoning_summary_text.delta"]  # the chunks of one block: one delta per item
    rs += ["response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done"]
    msg = ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    msg += ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    fc1 = ["response.output_item.added", *["response.function_call_arguments.delta"] * 3]
    fc1 += ["response.function_call_arguments.done", "response.output_item.done"]
    fc2 = ["response.output_item.added", "response.function_call_arguments.delta"]
    fc2 += ["response.function_call_arguments.done", "response.output_item.done"]
    assert kinds[2:] == [*rs, *msg, *fc1, *fc2, "response.completed"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert added[2]["item"]["arguments"] == "" and added[2]["item"]["status"] == "in_progress"
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "Calling."
    args_done = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args_done == ['{"x": 1}', "{}"]
    final_equals_non_stream(chat)


@pytest.mark.parametrize("vllm", [False, True])
@pytest.mark.parametrize(
    "chat",
    [
        answer(text="Hello there, friend."),
        answer(reasoning="hmm", field="reasoning", text="ok", usage=VLLM_USAGE),
        answer(reasoning="r", calls=[("c1", "multi_agent_v1__spawn", '{"a":"b"}')], finish="tool_calls"),
        answer(reasoning="way too long", text="trunc", finish="length"),
        answer(reasoning="only thinking", finish="length"),
        answer(text="a", calls=[("c1", "f", '{"cut": "he')], finish="length"),
        answer(text="filtered", finish="content_filter"),
        answer(text=None, usage=None),
    ],
)
def test_stream_final_object_equals_the_non_stream_one(chat: dict[str, Any], vllm: bool) -> None:
    final_equals_non_stream(chat, vllm=vllm)


def test_stream_sealing_pass_strip_and_redact() -> None:
    def sealed_ctx(original: str | None) -> Callable[..., ResponseContext]:
        return lambda **kw: ctx(seal="S({})".format, original_reasoning=lambda: original, **kw)

    strip = final_equals_non_stream(answer(text="Hi"), sealed_ctx("K2 thought"))
    assert strip["output"][0] == {
        "id": "rs_0123_0",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": "S(K2 thought)",
    }
    redact = final_equals_non_stream(
        answer(reasoning="[x]", calls=[("c", "f", "{}")], finish="tool_calls"), sealed_ctx("raw")
    )
    assert redact["output"][0]["encrypted_content"] == "S(raw)"
    passed = final_equals_non_stream(answer(reasoning="mine", text="Hi"), sealed_ctx(None))
    assert passed["output"][0]["encrypted_content"] == "S(mine)"
    events = run(sealed_ctx("K2 thought")(), chunks(answer(text="Hi")))
    done = next(e for e in events if e["type"] == "response.output_item.done")
    assert done["item"]["encrypted_content"] == "S(K2 thought)"


def test_length_stream_ends_with_response_incomplete() -> None:
    events = run(ctx(), chunks(answer(text="abc", finish="length")))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_upstream_error_mid_stream_is_response_failed_with_the_partial_output() -> None:
    whole = chunks(answer(reasoning="abcdef", text="Hello world"))
    cut = whole[: whole.index(b"wor")]
    cut = cut[: cut.rfind(b"\n\n") + 2]
    err = b'data: {"error":{"message":"upstream timed out","type":"timeout_error","code":"timeout_error"}}\n\n'
    done: list[dict[str, Any]] = []
    events = run(ctx(on_done=done.append), cut + err)
    last = events[-1]
    assert last["type"] == "response.failed" and done == [last["response"]]
    assert last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "server_error", "message": "upstream timed out"}
    reasoning, message = last["response"]["output"]
    assert reasoning["summary"][0]["text"] == "abcdef"
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "Hello "
    limited = run(ctx(), cut + b'data: {"error":{"message":"slow down","type":"rate_limit_error"}}\n\n')
    assert limited[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_stream_cut_without_finish_fails_and_error_after_finish_completes() -> None:
    whole = chunks(answer(text="Hello"))
    body = whole[: whole.index(b'"finish_reason":"stop"')]
    body = body[: body.rfind(b"\n\n") + 2]
    failed = run(ctx(), body)
    assert failed[-1]["type"] == "response.failed"
    assert "before the answer was complete" in failed[-1]["response"]["error"]["message"]
    tail = (
        whole[: whole.index(b"data: [DONE]")] + b'data: {"error":{"message":"no [DONE]","type":"upstream_error"}}\n\n'
    )
    assert run(ctx(), tail)[-1]["type"] == "response.completed"
    assert run(ctx(), b"")[-1]["type"] == "response.failed"


def test_parallel_tool_call_fragments_by_index() -> None:
    base = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[%s]},"finish_reason":null}]}\n\n'
    frags = [
        b'{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":"{\\"q\\":"}}',
        b'{"index":0,"function":{"arguments":"1}"}}',
        b'{"index":1,"id":"b","type":"function","function":{"name":"g","arguments":""}},{"index":1,"function":{"arguments":"{}"}}',
    ]
    end = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n'
    events = run(ctx(), b"".join(base % f for f in frags) + end)
    out = events[-1]["response"]["output"]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in out] == [("a", "f", '{"q":1}'), ("b", "g", "{}")]


def test_crlf_framed_chat_stream() -> None:
    sse = chunks(answer(text="Hi")).replace(b"\n\n", b"\r\n\r\n")
    assert run(ctx(), sse, cut=7)[-1]["response"]["output"][0]["content"][0]["text"] == "Hi"


STREAM = chunks(
    answer(reasoning="why not", text="Yes — 日本語 ok", calls=[("c", "f", '{"k": "v"}')], finish="tool_calls"), piece=2
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_split_of_the_chat_stream_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    parts = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    stream = ResponsesStream(ctx())
    out = b"".join(stream.feed(p) for p in parts) + stream.close()
    whole = ResponsesStream(ctx())
    assert joined(out) == joined(whole.feed(STREAM) + whole.close())
    parse(out)


def test_whole_calls_under_one_index_stay_separate_calls() -> None:
    head = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"%s","type":"function",'
    call = head + b'"function":{"name":"%s","arguments":"{}"}}]},"finish_reason":null}]}\n\n'
    end = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n'
    out = run(ctx(), call % (b"a", b"f") + call % (b"b", b"g") + end)[-1]["response"]["output"]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in out] == [("a", "f", "{}"), ("b", "g", "{}")]


def test_a_plain_json_error_body_fed_as_the_stream_fails_with_its_message() -> None:
    stream = ResponsesStream(ctx())
    body = b'{"error":{"message":"budget exceeded","type":"budget_exceeded","param":null,"code":"budget"}}'
    events = parse(stream.feed(body) + stream.close())
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "budget exceeded"
