"""Reasoning modes as units: <think> splitting, redaction, the strip/redact transform over every split
position of a stream, the store's keys, and the policy checks of redaction patterns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.policy.model import Redaction, TenantPolicy
from gateway.reasoning.inbound import put_reasoning
from gateway.reasoning.modes import ReasoningTransform, Turn
from gateway.reasoning.record import TurnRecorder
from gateway.reasoning.redact import StreamRedactor, luhn_ok, redactor_for
from gateway.reasoning.store import ReasoningStore, prefix_digests, turn_key, writes_done
from gateway.reasoning.think_tags import ThinkSplitter, split_think
from gateway.state.memory import MemoryKeyValueState
from gateway.transforms.chain import StreamChain, apply_whole
from gateway.yamlfile import ConfigError, load_model

SECRET_REASONING = "The user is alice@example.com; think hard about the weather. "
RAW = SECRET_REASONING + "</think>It is sunny."


def splits(text: str) -> list[list[str]]:
    """``text`` cut at every single position and at every pair of positions."""
    out = [[text]]
    n = len(text)
    for i in range(1, n):
        out.append([text[:i], text[i:]])
    for i in range(1, n, 3):
        for j in range(i + 1, n, 2):
            out.append([text[:i], text[i:j], text[j:]])
    return out


# -- <think> splitting


@pytest.mark.parametrize(
    ("text", "starts", "expected"),
    [
        (RAW, True, (SECRET_REASONING, "It is sunny.")),
        ("<think>hmm</think>answer", False, ("hmm", "answer")),
        ("before<think>hmm</think>after", False, ("hmm", "beforeafter")),
        ("plain answer < think >", False, ("", "plain answer < think >")),
        ("no close tag", True, ("no close tag", "")),
        ("why<|tool_calls_section_begin|>x", True, ("why", "<|tool_calls_section_begin|>x")),
    ],
)
def test_think_split_whole(text: str, starts: bool, expected: tuple[str, str]) -> None:
    assert split_think(text, starts) == expected


@pytest.mark.parametrize("starts", [True, False])
def test_think_tag_split_across_chunks_at_every_position(starts: bool) -> None:
    text = ("" if starts else "<think>") + RAW + " Then <think>again</think> done <thi"
    whole = split_think(text, starts)
    for parts in splits(text):
        splitter = ThinkSplitter(starts)
        r, c = "", ""
        for part in parts:
            a, b = splitter.feed(part)
            r, c = r + a, c + b
        a, b = splitter.finish()
        assert (r + a, c + b) == whole, parts


# -- redaction

REDACTOR = redactor_for(Redaction())


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("mail bob.smith@example.co.uk now", "email"),
        ("call +44 20 7946 0958 today", "phone"),
        ("call (415) 555-2671 today", "phone"),
        ("key sk-proj-abcdefghijklmnop1234 here", "api_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123 here", "api_key"),
        ("id AKIAIOSFODNN7EXAMPLE here", "aws_key"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_key"),
        ("Authorization: Bearer abcdefghijklmnop.qrstuvwx", "bearer_token"),
        ("card 4111 1111 1111 1111 ok", "card_number"),
        ("card 5500-0000-0000-0004 ok", "card_number"),
    ],
)
def test_builtin_detectors_redact_their_kind(text: str, kind: str) -> None:
    out = REDACTOR.redact(text)
    assert f"[REDACTED:{kind}]" in out
    assert out.count("[REDACTED:") == 1


@pytest.mark.parametrize(
    "text",
    ["card 4111 1111 1111 1112 fails Luhn", "on 2024-11-29 at 10:30", "order 123456 shipped", "version 1.2.3.4"],
)
def test_numbers_that_are_not_secrets_stay(text: str) -> None:
    assert REDACTOR.redact(text) == text


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_policy_patterns_and_detector_choice() -> None:
    rules = Redaction.model_validate(
        {"patterns": [{"kind": "employee_id", "regex": r"E\d{6}"}], "detectors": ["email"]}
    )
    r = redactor_for(rules)
    assert r.redact("E123456 mailed bob@example.com from +44 20 7946 0958") == (
        "[REDACTED:employee_id] mailed [REDACTED:email] from +44 20 7946 0958"
    )


STREAM_TEXT = (
    "Contact alice@example.com or +1 415 555 2671; key sk-abcdefghijklmnopqrstuvwx and card "
    "4111-1111-1111-1111, AKIAIOSFODNN7EXAMPLE. " + "filler " * 90 + "then bob@example.org at the end"
)


def test_redaction_across_chunk_boundaries_at_every_position() -> None:
    whole = REDACTOR.redact(STREAM_TEXT)
    assert "alice@" not in whole and "bob@" not in whole and "4111" not in whole
    for parts in splits(STREAM_TEXT)[: len(STREAM_TEXT) + 400]:
        sr = StreamRedactor(REDACTOR)
        out = "".join(sr.feed(p) for p in parts) + sr.finish()
        assert out == whole, parts


def test_stream_redactor_holds_back_a_bounded_tail() -> None:
    sr = StreamRedactor(REDACTOR)
    released = "".join(sr.feed("word ") for _ in range(1000))
    assert sr.held <= REDACTOR.hold + 64
    assert len(released) >= 5000 - REDACTOR.hold - 64


# -- the policy's checks


def write_policy(tmp_path: Path, reasoning: str) -> Path:
    file = tmp_path / "t.yaml"
    file.write_text("tenant: t\nkeys: ['sha256:" + "0" * 64 + "']\nmodels:\n  m: {candidates: [sim/m]}\n" + reasoning)
    return file


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        ("E(\\d", "does not compile"),
        ("E\\d+", "can match more than 256 characters"),
        ("x*", "can match the empty string"),
    ],
)
def test_policy_refuses_bad_patterns_with_file_line_and_path(tmp_path: Path, regex: str, message: str) -> None:
    file = write_policy(
        tmp_path, f"reasoning:\n  mode: redact\n  redact:\n    patterns:\n      - {{kind: emp, regex: '{regex}'}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_model(file, TenantPolicy)
    text = str(info.value)
    assert message in text and "reasoning.redact.patterns[0].regex" in text and f"{file}:" in text


def test_policy_refuses_unknown_mode_and_detector(tmp_path: Path) -> None:
    file = write_policy(tmp_path, "reasoning: {mode: hide, redact: {detectors: [ssn]}}\n")
    with pytest.raises(ConfigError) as info:
        load_model(file, TenantPolicy)
    assert "reasoning.mode" in str(info.value) and "reasoning.redact.detectors[0]" in str(info.value)


# -- the transform


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}  # fmt: skip


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def run_stream(transforms: list[Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chain = StreamChain(transforms)
    out = b"".join(chain.feed(b"data: " + orjson.dumps(e) + b"\n\n") for e in events)
    out += chain.feed(b"data: [DONE]\n\n") + chain.finish()
    parsed = []
    for part in out.split(b"\n\n"):
        if part.startswith(b"data: {"):
            parsed.append(orjson.loads(part[6:]))
    assert out.endswith(b"data: [DONE]\n\n")
    return parsed


def joined(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c.get("choices"))


def content_stream(parts: list[str]) -> list[dict[str, Any]]:
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": p}) for p in parts),
        chunk({}, "stop"),
        {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": usage},
    ]


@pytest.mark.parametrize("starts", [True, False])
def test_strip_never_leaks_a_think_tag_split_at_any_position(starts: bool) -> None:
    text = ("" if starts else "<think>") + RAW
    for parts in splits(text):
        turn = Turn()
        out = run_stream([ReasoningTransform("strip", "reasoning_content", "reasoning", turn, split_think=True,
                                             starts_thinking=starts)], content_stream(parts))  # fmt: skip
        body = orjson.dumps(out).decode()
        assert "alice" not in body and "think" not in body, parts
        assert joined(out, "content") == "It is sunny."
        assert out[-2]["choices"][0]["finish_reason"] == "stop" and out[-1]["usage"]["total_tokens"] == 14
        assert "".join(turn.choice(0).reasoning) == SECRET_REASONING  # kept for the store, not shown


def test_strip_removes_both_reasoning_fields_and_drops_emptied_chunks() -> None:
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "secret plan", "reasoning": "secret plan"}),
        chunk({"reasoning": " more"}),
        chunk({"content": "Hi"}),
        chunk({}, "stop", usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ]
    out = run_stream([ReasoningTransform("strip", "reasoning_content", "reasoning_content", Turn())], events)
    assert "secret" not in orjson.dumps(out).decode() and "more" not in orjson.dumps(out).decode()
    assert [joined([c], "content") for c in out] == ["", "Hi", ""]
    assert out[-1]["choices"][0]["usage"]["total_tokens"] == 3


def test_redact_mode_across_chunk_boundaries_renames_the_field() -> None:
    text = STREAM_TEXT
    whole = REDACTOR.redact(text)
    for parts in splits(text)[:: max(1, len(text) // 60)]:
        events = [chunk({"role": "assistant", "content": ""}), *(chunk({"reasoning": p}) for p in parts),
                  chunk({"content": "Answer."}), chunk({}, "stop")]  # fmt: skip
        out = run_stream(
            [ReasoningTransform("redact", "reasoning_content", "reasoning", Turn(), redactor=REDACTOR)], events
        )
        assert joined(out, "reasoning_content") == whole
        assert joined(out, "reasoning") == ""
        assert joined(out, "content") == "Answer."
        # every reasoning byte left before the answer began
        first_content = next(i for i, c in enumerate(out) if joined([c], "content"))
        assert not any(joined([c], "reasoning_content") for c in out[first_content + 1 :])


def test_redact_flushes_held_reasoning_when_the_stream_is_cut() -> None:
    events = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "mail alice@example.com"})]
    chain = StreamChain(
        [ReasoningTransform("redact", "reasoning_content", "reasoning_content", Turn(), redactor=REDACTOR)]
    )
    out = b"".join(chain.feed(b"data: " + orjson.dumps(e) + b"\n\n") for e in events) + chain.finish()
    assert b"alice" not in out and b"[REDACTED:email]" in out


def test_whole_body_strip_redact_and_pass_rename() -> None:
    body = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": "<think>mail alice@example.com</think>Done",
                    "reasoning": "field alice@example.com. ",
                },
            }
        ],
    }
    raw = orjson.dumps(body)
    stripped = orjson.loads(
        apply_whole([ReasoningTransform("strip", "reasoning_content", "reasoning", Turn(), split_think=True)], raw)
    )
    assert stripped["choices"][0]["message"] == {"role": "assistant", "content": "Done"}
    redacted = orjson.loads(
        apply_whole(
            [
                ReasoningTransform(
                    "redact", "reasoning_content", "reasoning", Turn(), redactor=REDACTOR, split_think=True
                )
            ],
            raw,
        )
    )
    assert redacted["choices"][0]["message"]["reasoning_content"] == "field [REDACTED:email]. mail [REDACTED:email]"
    assert "reasoning" not in redacted["choices"][0]["message"]
    renamed = orjson.loads(apply_whole([ReasoningTransform("pass", "reasoning_content", "reasoning", Turn())], raw))
    assert renamed["choices"][0]["message"]["reasoning_content"] == "field alice@example.com. "


# -- the store


def test_store_key_survives_arguments_serialized_again_without_the_upstreams_whitespace() -> None:
    """The Anthropic front end gives clients parsed ``input`` and serializes it again on the way
    back: ``{"city": "Oslo", "days": 2}`` returns as ``{"city":"Oslo","days":2}``."""
    prefix = prefix_digests([{"role": "user", "content": "weather"}])[-1]

    def calls(arguments: str) -> list[dict[str, Any]]:
        return [
            {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        ]

    upstream = turn_key("t", prefix, calls('{"city": "Oslo", "days": 2}'))
    assert turn_key("t", prefix, calls('{"city":"Oslo","days":2}')) == upstream
    assert turn_key("t", prefix, calls('{"days":2,"city":"Oslo"}')) == upstream
    assert turn_key("t", prefix, calls('{"city":"Bergen","days":2}')) != upstream
    assert turn_key("t", prefix, calls("not json {")) != upstream


def test_store_key_depends_on_the_conversation_not_only_on_tool_call_ids() -> None:
    calls = [{"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    a = prefix_digests([{"role": "user", "content": "first"}])
    b = prefix_digests([{"role": "user", "content": "second"}])
    assert turn_key("t", a[-1], calls) != turn_key("t", b[-1], calls)
    assert turn_key("t", a[-1], calls) != turn_key("u", a[-1], calls)
    # reasoning fields, None vs "" content and key order do not change a fingerprint
    m1 = {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "x"}
    m2 = {"tool_calls": calls, "content": "", "role": "assistant"}
    assert prefix_digests([m1]) == prefix_digests([m2])


def test_recorder_keeps_the_reasoning_of_streamed_parallel_tool_calls() -> None:
    async def go() -> None:
        kv = MemoryKeyValueState()
        store = ReasoningStore(kv)
        turn = Turn()
        prefix = prefix_digests([{"role": "user", "content": "hi"}])[-1]
        recorder = TurnRecorder(turn, store=store, tenant="t", prefix=prefix, ttl_s=60, max_bytes=10_000)
        events = [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "two calls"}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "a:0", "type": "function", "function": {"name": "a", "arguments": ""}}
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 1, "id": "b:1", "type": "function", "function": {"name": "b", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            chunk({}, "tool_calls"),
        ]
        out = run_stream(
            [ReasoningTransform("strip", "reasoning_content", "reasoning_content", turn), recorder], events
        )
        assert "two calls" not in orjson.dumps(out).decode()
        await writes_done()
        calls = [
            {"id": "a:0", "type": "function", "function": {"name": "a", "arguments": '{"x":1}'}},
            {"id": "b:1", "type": "function", "function": {"name": "b", "arguments": "{}"}},
        ]
        assert await store.recall([turn_key("t", prefix, calls)]) == ["two calls"]

    asyncio.run(go())


def test_put_reasoning_renames_in_place_keeping_key_order() -> None:
    msg = {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": []}
    assert put_reasoning(msg, "reasoning", "r")
    assert list(msg) == ["role", "reasoning", "content", "tool_calls"]
    assert not put_reasoning(msg, "reasoning", "r")


# -- the request side


def exchange(reasoning: dict[str, Any], body: dict[str, Any], capture: str = "off") -> Any:
    from types import SimpleNamespace

    from gateway.policy.model import CapturePolicy, ReasoningPolicy

    tenant = SimpleNamespace(
        name="t", reasoning=ReasoningPolicy.model_validate(reasoning), capture=CapturePolicy(mode=capture)
    )  # type: ignore[call-arg]
    raw = orjson.dumps(body)
    return SimpleNamespace(
        candidate=SimpleNamespace(upstream="u"), tenant=tenant, body=body, raw=raw, transforms=[], dirty=False
    )


def runtime(field: str = "reasoning_content") -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        upstreams={"u": SimpleNamespace(reasoning_field=field, config=None)}, kv=MemoryKeyValueState()
    )


TOOL_LOOP = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "f:0", "content": "ok"},
]  # fmt: skip


def test_pass_tenant_reading_the_upstream_field_gets_no_transform_and_untouched_bytes() -> None:
    from gateway.reasoning.inbound import prepare_reasoning

    echoed = [dict(m) for m in TOOL_LOOP]
    echoed[1]["reasoning_content"] = "its own"  # a client that sends it back is never overridden
    ex = exchange({}, {"model": "m", "messages": echoed})
    raw = ex.raw
    asyncio.run(prepare_reasoning(runtime(), ex))
    assert ex.transforms == [] and ex.raw is raw and not ex.dirty


def test_strip_without_keeping_sends_the_placeholder_and_stores_nothing() -> None:
    from gateway.reasoning.inbound import prepare_reasoning

    rt = runtime()
    ex = exchange(
        {"mode": "strip", "keep_for_tool_loops": False}, {"model": "m", "messages": [dict(m) for m in TOOL_LOOP]}
    )

    async def go() -> None:
        await prepare_reasoning(rt, ex)
        assert ex.body["messages"][1]["reasoning_content"] == " " and ex.raw == orjson.dumps(ex.body)
        calls = TOOL_LOOP[1]["tool_calls"]
        message = {"role": "assistant", "reasoning_content": "plan", "content": "", "tool_calls": calls}
        answer = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}
        out = orjson.loads(apply_whole(ex.transforms, orjson.dumps(answer)))
        assert "reasoning_content" not in out["choices"][0]["message"]
        await writes_done()
        assert len(rt.kv) == 0

    asyncio.run(go())
