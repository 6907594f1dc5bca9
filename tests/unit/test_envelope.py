"""The client-facing envelope (gateway/transforms/envelope.py) on the bodies and chunks each upstream
dialect really sends: Moonshot (top-level ``cached_tokens``, usage inside the last chunk's choice), vLLM
(``prompt_tokens_details``, ``tool_calls: []``, ``stop_reason: null``, usage only in the
``include_usage`` chunk) and an OpenRouter-style aggregator (its own model id, extra fields). Stream
and non-stream; what already has the envelope's shape must come out as the very same bytes."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.policy.model import TenantPolicy
from gateway.transforms.envelope import (
    EnvelopeTransform,
    add_envelope,
    body_envelope,
    normalize,
    stream_envelope,
)
from gateway.transforms.order import ENVELOPE, LEGACY, add_transform, stage_of

VIRTUAL = "kimi-k2-thinking"
VLLM_ID = "moonshotai/Kimi-K2-Thinking"


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else orjson.dumps(c)) + b"\n\n" for c in (*chunks, "[DONE]")
    )


def events(block: bytes) -> list[Any]:
    out = []
    for ev in block.split(b"\n\n"):
        if ev.startswith(b"data: "):
            data = ev[6:]
            out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return out


def head(model: str, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, **extra}


# -- upstream bodies as each dialect sends them (protocols.md §1.3, §4.4, §5.1)

MOONSHOT_BODY = {
    "id": "chatcmpl-7f3a",
    "object": "chat.completion",
    "created": 1762400000,
    "model": VIRTUAL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "reasoning_content": "The user greets me."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1210, "completion_tokens": 184, "total_tokens": 1394, "cached_tokens": 1024},
}

VLLM_BODY = {
    "id": "chatcmpl-ab12",
    "object": "chat.completion",
    "created": 1,
    "model": VLLM_ID,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello",
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "service_tier": None,
    "usage": {"prompt_tokens": 980, "total_tokens": 1041, "completion_tokens": 61, "prompt_tokens_details": None},
    "prompt_logprobs": None,
    "kv_transfer_params": None,
}

AGGREGATOR_BODY = {
    "id": "gen-1",
    "provider": "Moonshot AI",
    "model": "moonshotai/kimi-k2-thinking",
    "object": "chat.completion",
    "created": 1,
    "choices": [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "tool_calls",
            "native_finish_reason": None,
            "message": {
                "role": "assistant",
                "content": None,
                "reasoning": "Call the tool.",
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
        }
    ],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "cost": 0.0001,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 12},
    },
}


def whole(body: dict[str, Any]) -> dict[str, Any]:
    out = body_envelope(VIRTUAL, "normalized")
    assert out is not None
    result: dict[str, Any] = orjson.loads(out.whole(orjson.dumps(body)))
    return result


def test_moonshot_body_gets_openai_usage_and_keeps_its_own_cached_tokens() -> None:
    out = whole(MOONSHOT_BODY)
    assert out["usage"] == {
        "prompt_tokens": 1210,
        "completion_tokens": 184,
        "total_tokens": 1394,
        "cached_tokens": 1024,  # Moonshot's own field stays where it was
        "prompt_tokens_details": {"cached_tokens": 1024},
    }
    assert "completion_tokens_details" not in out["usage"]  # Moonshot does not report reasoning tokens
    assert list(out) == list(MOONSHOT_BODY) and out["choices"] == MOONSHOT_BODY["choices"]


def test_vllm_body_says_the_virtual_model_and_loses_its_placeholders() -> None:
    out = whole(VLLM_BODY)
    assert out["model"] == VIRTUAL
    choice = out["choices"][0]
    # OpenAI's own always-present fields stay, null or not
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello", "refusal": None, "annotations": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert list(out) == ["id", "object", "created", "model", "choices", "usage"]
    assert out["usage"] == {
        "prompt_tokens": 980,
        "total_tokens": 1041,
        "completion_tokens": 61,
        "prompt_tokens_details": {"cached_tokens": 0},  # null became the OpenAI shape, in its place
    }


def test_tool_call_answer_keeps_null_content_and_the_calls() -> None:
    out = whole(AGGREGATOR_BODY)
    assert out["model"] == VIRTUAL and out["provider"] == "Moonshot AI"
    choice = out["choices"][0]
    assert "native_finish_reason" not in choice and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == AGGREGATOR_BODY["choices"][0]["message"]["tool_calls"]
    assert out["usage"] == AGGREGATOR_BODY["usage"]  # already OpenAI's shape; cost stays


def test_reasoning_tokens_come_through_where_reported() -> None:
    body = {**VLLM_BODY, "usage": {**VLLM_BODY["usage"], "completion_tokens_details": {"reasoning_tokens": 40}}}
    assert whole(body)["usage"]["completion_tokens_details"] == {"reasoning_tokens": 40}
    body["usage"]["completion_tokens_details"] = None  # a placeholder: nothing is known
    assert "completion_tokens_details" not in whole(body)["usage"]


def test_body_already_in_the_envelope_is_the_same_bytes() -> None:
    body = orjson.dumps({**AGGREGATOR_BODY, "model": VIRTUAL, "choices": [MOONSHOT_BODY["choices"][0]]})
    envelope = body_envelope(VIRTUAL, "normalized")
    assert envelope is not None and envelope.whole(body) is body
    assert envelope.whole(b"not json") == b"not json"


def test_raw_tenant_gets_no_envelope() -> None:
    assert body_envelope(VIRTUAL, "raw") is None
    assert stream_envelope(VIRTUAL, {}, "raw") is None
    transforms: list[Any] = [object()]
    add_envelope(transforms, VIRTUAL, "raw")
    assert len(transforms) == 1


# -- streams


def moonshot_stream(model: str = VIRTUAL) -> bytes:
    usage = {"prompt_tokens": 19, "completion_tokens": 13, "total_tokens": 32, "cached_tokens": 8}
    return sse(
        head(model, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        head(model, choices=[{"index": 0, "delta": {"reasoning_content": "Greeting"}, "finish_reason": None}]),
        head(model, choices=[{"index": 0, "delta": {"content": 'He said "model":"x"'}, "finish_reason": None}]),
        head(model, choices=[{"index": 0, "delta": {}, "finish_reason": "stop", "usage": usage}]),
    )


def vllm_stream(model: str = VLLM_ID, reasoning_tokens: bool = True) -> bytes:
    usage: dict[str, Any] = {
        "prompt_tokens": 34,
        "total_tokens": 203,
        "completion_tokens": 169,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    if reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": 112}
    delta = {"logprobs": None, "finish_reason": None}
    return sse(
        head(model, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, **delta}]),
        head(model, choices=[{"index": 0, "delta": {"reasoning": "Let me think"}, **delta}]),
        head(model, choices=[{"index": 0, "delta": {"content": "Hello"}, **delta}]),
        head(
            model, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}]
        ),
        head(model, choices=[], usage=usage),
    )


def feed(stream: bytes, body: dict[str, Any] | None = None, cuts: list[int] | None = None) -> bytes:
    """The stream through the byte envelope, in blocks cut at the given event boundaries."""
    envelope = stream_envelope(VIRTUAL, body or {}, "normalized")
    assert envelope is not None
    evs = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
    bounds = sorted({0, *(cuts or ()), len(evs)})
    return b"".join(envelope.feed(b"".join(evs[a:b])) for a, b in itertools.pairwise(bounds))


def test_same_name_openai_shaped_stream_passes_byte_for_byte() -> None:
    stream = vllm_stream(VIRTUAL).replace(b',"stop_reason":null', b"")
    envelope = stream_envelope(VIRTUAL, {}, "normalized")
    assert envelope is not None
    evs = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
    for ev in evs:
        assert envelope.feed(ev) is ev or envelope.feed(ev) == ev
    assert feed(stream) == stream


def test_vllm_stream_renamed_at_byte_level_and_stop_reason_dropped() -> None:
    stream = vllm_stream()
    out = feed(stream)
    assert VLLM_ID.encode() not in out
    got = events(out)
    assert all(c["model"] == VIRTUAL for c in got if isinstance(c, dict))
    assert got[3]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert got[4]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 112}
    assert got[4]["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    # the events before the finish chunk differ from the upstream's only in the model's bytes
    want = [e.replace(VLLM_ID.encode(), VIRTUAL.encode()) for e in stream.split(b"\n\n")[:3]]
    assert out.split(b"\n\n")[:3] == want
    assert got[-1] == "[DONE]"


def test_moonshot_stream_usage_in_the_choice_gets_the_openai_shape() -> None:
    stream = moonshot_stream()
    out = feed(stream)
    got = events(out)
    usage = got[3]["choices"][0]["usage"]
    assert usage == {
        "prompt_tokens": 19,
        "completion_tokens": 13,
        "total_tokens": 32,
        "cached_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    # text that quotes "model":"..." is inside a JSON string: never touched
    assert got[2]["choices"][0]["delta"]["content"] == 'He said "model":"x"'
    assert out.split(b"\n\n")[:3] == stream.split(b"\n\n")[:3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), max_size=4))
def test_any_block_boundaries_give_the_same_stream(cuts: list[int]) -> None:
    for stream in (vllm_stream(), moonshot_stream("kimi-k2-thinking-turbo"), vllm_stream(VIRTUAL)):
        assert events(feed(stream, cuts=cuts)) == events(feed(stream))


def test_stream_with_spaces_takes_the_exact_path() -> None:
    spaced = b"".join(
        b"data: " + orjson.dumps(c).replace(b'":', b'": ').replace(b',"', b', "') + b"\n\n"
        if isinstance(c, dict)
        else b""
        for c in events(vllm_stream())
    )
    got = events(feed(spaced + b"data: [DONE]\n\n"))
    assert all(c["model"] == VIRTUAL for c in got if isinstance(c, dict))
    assert "stop_reason" not in got[3]["choices"][0]


def test_several_choices_each_finish_normalized() -> None:
    fin = {"logprobs": None, "finish_reason": "stop", "stop_reason": None}
    stream = sse(
        head(VLLM_ID, choices=[{"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}]),
        head(VLLM_ID, choices=[{"index": 0, "delta": {}, **fin}]),
        head(VLLM_ID, choices=[{"index": 1, "delta": {"content": "b"}, "logprobs": None, "finish_reason": None}]),
        head(VLLM_ID, choices=[{"index": 1, "delta": {}, **fin}]),
    )
    got = events(feed(stream, {"n": 2}))
    assert [c["choices"][0].get("stop_reason", "gone") for c in got[:4]] == ["gone"] * 4
    assert all(c["model"] == VIRTUAL for c in got[:4])


def test_continuous_usage_stats_every_chunk_normalized() -> None:
    usage = {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1}
    stream = sse(
        head(VLLM_ID, choices=[{"index": 0, "delta": {"content": "a"}, "finish_reason": None}], usage=usage),
        head(VLLM_ID, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], usage=usage),
    )
    got = events(feed(stream, {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    assert [c["usage"]["prompt_tokens_details"] for c in got[:2]] == [{"cached_tokens": 0}] * 2


def test_error_events_and_done_pass_unchanged() -> None:
    error = b'data: {"error":{"message":"cut","type":"upstream_error"}}\n\n'
    envelope = stream_envelope(VIRTUAL, {}, "normalized")
    assert envelope is not None
    assert envelope.feed(error) == error
    assert envelope.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert envelope.feed(b"") == b""


# -- the transform for answers other transforms already parse


def test_transform_runs_last_and_edits_parsed_chunks() -> None:
    transforms: list[Any] = []
    add_envelope(transforms, VIRTUAL, "normalized")
    assert transforms == []  # nothing parses the answer: the byte envelope does the work
    legacy = type("Legacy", (), {"stage": LEGACY})()
    transforms.append(legacy)
    add_envelope(transforms, VIRTUAL, "normalized")
    assert [stage_of(t) for t in transforms] == [LEGACY, ENVELOPE]
    add_transform(transforms, type("Late", (), {"stage": LEGACY})())
    assert stage_of(transforms[-1]) == ENVELOPE
    transform = EnvelopeTransform(VIRTUAL)
    chunk = head(VLLM_ID, choices=[{"index": 0, "delta": {"content": "x", "tool_calls": []}, "finish_reason": None}])
    assert transform.chunk(chunk) == [chunk]
    assert chunk["model"] == VIRTUAL and chunk["choices"][0]["delta"] == {"content": "x"}
    response = dict(VLLM_BODY)
    transform.whole(response)
    assert response["model"] == VIRTUAL and "stop_reason" not in response["choices"][0]
    assert transform.finish() == []


def test_normalize_reports_whether_anything_changed() -> None:
    clean = orjson.loads(orjson.dumps({**AGGREGATOR_BODY, "model": VIRTUAL}))
    clean["choices"][0].pop("native_finish_reason")
    assert normalize(clean, VIRTUAL) is False
    assert normalize(orjson.loads(orjson.dumps(MOONSHOT_BODY)), VIRTUAL) is True


def test_policy_option() -> None:
    base = {"tenant": "t", "keys": ["sha256:" + "0" * 64], "models": {"m": {"candidates": ["u/m"]}}}
    assert TenantPolicy.model_validate(base).envelope == "normalized"
    assert TenantPolicy.model_validate({**base, "envelope": "raw"}).envelope == "raw"
    with pytest.raises(ValidationError):
        TenantPolicy.model_validate({**base, "envelope": "upstream"})
