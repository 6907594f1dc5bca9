"""Tool calls out: each defect repaired, raw K2 markers parsed at every split point, legacy shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.tools.calls import ToolCallRepair
from gateway.tools.k2_markers import SECTION_BEGINS, K2MarkerTransform, MarkerParser
from gateway.tools.legacy import LegacyFunctionCall
from gateway.transforms.base import ResponseTransform
from gateway.transforms.chain import StreamChain, apply_whole

RAW = (
    "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|>\n<|tool_call_begin|> functions.get_time:1 '
    '<|tool_call_argument_begin|> {"city": "Shanghai"} <|tool_call_end|><|tool_calls_section_end|>'
)
EXPECTED_CALLS = [
    {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
    },
    {
        "id": "functions.get_time:1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"city": "Shanghai"}'},
    },
]


def whole(transforms: list[ResponseTransform], message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    return orjson.loads(apply_whole(transforms, orjson.dumps(body)))["choices"][0]


def chunk_event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def run_stream(transforms: list[ResponseTransform], events: list[bytes]) -> list[dict[str, Any]]:
    chain = StreamChain(transforms)
    out = b"".join(chain.feed(e) for e in [*events, b"data: [DONE]\n\n"]) + chain.finish()
    assert out.endswith(b"data: [DONE]\n\n")
    return [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]


def accumulate(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    """What a client assembles from a stream, insisting on OpenAI's per-index rules."""
    text, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for frag in delta.get("tool_calls") or ():
                index = frag["index"]  # required on every fragment
                if index not in calls:
                    assert frag["id"] and frag["type"] == "function" and "name" in frag["function"], frag
                    calls[index] = {"id": frag["id"], "type": frag["type"], "function": dict(frag["function"])}
                else:
                    assert "id" not in frag and "name" not in frag.get("function", {}), frag
                    calls[index]["function"]["arguments"] += frag["function"].get("arguments", "")
            finish = choice.get("finish_reason") or finish
    return text, [calls[i] for i in sorted(calls)], finish


# -- defects out, non-stream -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(
            {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {
                "id": "functions.get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            },
            id="missing-id-minted",
        ),
        pytest.param(
            {"id": "get_weather:0", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            id="missing-type",
        ),
        pytest.param(
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "X"}}},
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"X"}'}},
            id="object-arguments-serialized",
        ),
        pytest.param(
            {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
            {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            id="empty-arguments",
        ),
    ],
)
def test_tool_call_defects_are_repaired_in_whole_answers(call: dict[str, Any], expected: dict[str, Any]) -> None:
    choice = whole([ToolCallRepair()], {"role": "assistant", "content": "", "tool_calls": [call]})
    assert choice["message"]["tool_calls"] == [expected]
    assert choice["finish_reason"] == "tool_calls"  # a "stop" with calls is corrected


def test_upstream_ids_are_never_rewritten() -> None:
    calls = [
        {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
        {"id": "call_x9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    choice = whole([ToolCallRepair()], {"role": "assistant", "tool_calls": [dict(c) for c in calls]}, "tool_calls")
    assert [c["id"] for c in choice["message"]["tool_calls"]] == ["get_weather:0", "call_x9"]


# -- defects out, stream ---------------------------------------------------------------------------


def test_stream_fragments_without_index_or_with_repeated_ids_come_out_per_index() -> None:
    events = [
        chunk_event({"role": "assistant", "content": ""}),
        chunk_event({"tool_calls": [{"id": "a:0", "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk_event({"tool_calls": [{"id": "a:0", "function": {"name": "get_weather", "arguments": '{"ci'}}]}),
        chunk_event({"tool_calls": [{"function": {"arguments": 'ty": 1}'}}]}),
        chunk_event({"tool_calls": [{"id": "b:1", "function": {"name": "get_time", "arguments": {"city": 2}}}]}),
        chunk_event({}, "stop"),
    ]
    _text, calls, finish = accumulate(run_stream([ToolCallRepair()], events))
    assert calls == [
        {"id": "a:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": 1}'}},
        {"id": "b:1", "type": "function", "function": {"name": "get_time", "arguments": '{"city":2}'}},
    ]
    assert finish == "tool_calls"


def test_stream_call_without_id_gets_a_minted_id_and_empty_arguments_become_an_object() -> None:
    events = [
        chunk_event({"tool_calls": [{"index": 0, "function": {"name": "now_utc"}}]}),
        chunk_event({}, "tool_calls"),
    ]
    _, calls, _ = accumulate(run_stream([ToolCallRepair()], events))
    assert calls == [
        {"id": "functions.now_utc:0", "type": "function", "function": {"name": "now_utc", "arguments": "{}"}}
    ]


# -- raw K2 markers ----------------------------------------------------------------------------------


def test_raw_markers_in_a_whole_answer_become_tool_calls() -> None:
    choice = whole([K2MarkerTransform(), ToolCallRepair()], {"role": "assistant", "content": RAW, "tool_calls": []})
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == EXPECTED_CALLS
    assert choice["finish_reason"] == "tool_calls"


def test_text_without_markers_passes_unchanged() -> None:
    choice = whole([K2MarkerTransform()], {"role": "assistant", "content": "a < b and <|im_end"})
    assert choice["message"] == {"role": "assistant", "content": "a < b and <|im_end"}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("split", range(1, len(RAW)))
def test_raw_markers_split_at_every_position_in_a_stream(split: int) -> None:
    events = [
        chunk_event({"role": "assistant", "content": ""}),
        chunk_event({"content": RAW[:split]}),
        chunk_event({"content": RAW[split:]}),
        chunk_event({}, "stop"),
    ]
    text, calls, finish = accumulate(run_stream([K2MarkerTransform(), ToolCallRepair()], events))
    assert (text, calls, finish) == ("Let me check.", EXPECTED_CALLS, "tool_calls")


def test_raw_markers_one_character_per_chunk() -> None:
    events = [chunk_event({"content": c}) for c in RAW] + [chunk_event({}, "stop")]
    chunks = run_stream([K2MarkerTransform(), ToolCallRepair()], events)
    assert accumulate(chunks) == ("Let me check.", EXPECTED_CALLS, "tool_calls")
    assert len(chunks) < len(RAW)  # chunks held entirely inside markers are dropped, not sent empty


def test_markers_tolerate_singular_section_and_a_missing_section_end_at_end_of_stream() -> None:
    raw = 'ok<|tool_call_section_begin|><|tool_call_begin|>functions.f_x:0<|tool_call_argument_begin|>{"a": 1}'
    events = [chunk_event({"content": raw[:30]}), chunk_event({"content": raw[30:]})]  # cut: no finish chunk
    text, calls, _ = accumulate(run_stream([K2MarkerTransform()], events))
    assert text == "ok"
    assert calls == [
        {"id": "functions.f_x:0", "type": "function", "function": {"name": "f_x", "arguments": '{"a": 1}'}}
    ]


def test_a_held_marker_prefix_that_never_completes_is_released_as_text() -> None:
    parser = MarkerParser()
    assert parser.feed("price <|tool") == ("price ", [])
    assert parser.finish() == ("<|tool", [])


def test_calls_without_a_k2_id_are_dropped() -> None:
    parser = MarkerParser()
    text, calls = parser.feed("<|tool_call_begin|>3f2a-uuid<|tool_call_argument_begin|>{}<|tool_call_end|>after")
    assert calls == [] and text == "after"


# -- legacy function_call ------------------------------------------------------------------------------


def test_legacy_clients_get_function_call_in_whole_answers() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [dict(EXPECTED_CALLS[0])]}
    choice = whole([ToolCallRepair(), LegacyFunctionCall()], message, "tool_calls")
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Beijing"}'}
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "function_call"


def test_legacy_clients_get_function_call_deltas_in_streams() -> None:
    events = [
        chunk_event(
            {
                "tool_calls": [
                    {"index": 0, "id": "a:0", "type": "function", "function": {"name": "f_x", "arguments": ""}}
                ]
            }
        ),
        chunk_event({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk_event({}, "tool_calls"),
    ]
    chunks = run_stream([ToolCallRepair(), LegacyFunctionCall()], events)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["function_call"] == {"name": "f_x", "arguments": ""}
    assert deltas[1]["function_call"] == {"arguments": "{}"}
    assert all("tool_calls" not in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def test_markers_leaked_into_reasoning_become_tool_calls_numbered_with_content_calls() -> None:
    section = (
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"a": 1}'
        "<|tool_call_end|><|tool_calls_section_end|>"
    )
    later = '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"b": 2}<|tool_call_end|>'
    message = {"role": "assistant", "reasoning_content": "thinking" + section, "content": "answer" + later}
    choice = whole([K2MarkerTransform()], message)
    assert choice["message"]["reasoning_content"] == "thinking" and choice["message"]["content"] == "answer"
    assert [c["id"] for c in choice["message"]["tool_calls"]] == ["functions.get_weather:0", "functions.get_time:1"]
    events = [chunk_event({"reasoning_content": section[:40]}), chunk_event({"reasoning_content": section[40:]})]
    events += [chunk_event({"content": "answer" + later}), chunk_event({}, "stop")]
    text, calls, finish = accumulate(run_stream([K2MarkerTransform(), ToolCallRepair()], events))
    assert text == "answer" and finish == "tool_calls"
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("functions.get_weather:0", '{"a": 1}'),
        ("functions.get_time:1", '{"b": 2}'),
    ]


SNIFF_BEGIN = SECTION_BEGINS[0]


def _parse_pieces(pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    from gateway.tools.k2_markers import _assemble

    parser = MarkerParser()
    text, deltas = "", []
    for piece in pieces:
        t, d = parser.feed(piece)
        text, deltas = text + t, deltas + d
    t, d = parser.finish()
    return text + t, _assemble(deltas + d)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_raw_markers_split_into_any_number_of_pieces(cuts: list[int]) -> None:
    assert _parse_pieces(_split(RAW, cuts)) == ("Let me check.", EXPECTED_CALLS)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab <|>_tolcegin", max_size=60), st.lists(st.integers(min_value=0), max_size=6))
def test_text_without_a_whole_marker_comes_out_unchanged(text: str, cuts: list[int]) -> None:
    assume(SNIFF_BEGIN not in text and "<|tool_call_begin|>" not in text)
    assert _parse_pieces(_split(text, cuts)) == (text, [])
