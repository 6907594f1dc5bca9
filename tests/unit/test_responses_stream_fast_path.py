"""The Responses stream's byte test for delta-only chunks gives the events the general path (which
parses every chunk) gives, whatever the upstream's chunk shape and wherever the network cuts: the
same events, except that the consecutive text or reasoning deltas of one item that arrive in one
block may be joined into one delta event (the same text, fewer events)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.translate.responses_stream import ResponsesStream
from gateway.translate.responses_types import ResponseContext
from tests.responses_events import DELTAS, joined, parsed


def chunk(delta: dict[str, Any], finish: str | None = None, *, vllm: bool = False, **extra: Any) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": delta}
    if vllm:
        choice["logprobs"] = None
    choice["finish_reason"] = finish
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "kimi-k2-thinking"}
    body.update(extra)
    body["choices"] = [choice]
    return b"data: " + orjson.dumps(body) + b"\n\n"


TEXTS = ["plain ", 'a "quoted" word, ', "back\\slash ", "line\nbreak ", "caf\u00e9 \u6771\u4eac ", "emoji \U0001f600 "]


def answer(vllm: bool) -> list[bytes]:
    field = "reasoning" if vllm else "reasoning_content"
    events = [chunk({"role": "assistant", "content": ""}, vllm=vllm)]
    events += [chunk({field: t}, vllm=vllm) for t in TEXTS]
    events += [chunk({"content": t}, vllm=vllm) for t in TEXTS]
    events.append(chunk({"content": ""}, vllm=vllm))  # an empty delta: nothing to write
    events.append(chunk({"content": "x", field: "both fields"}, vllm=vllm))  # general path
    events.append(chunk({"content": "after"}, vllm=vllm, usage=None))  # a usage key before choices
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    events.append(chunk({}, "stop", vllm=vllm))
    events.append(b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def translate(blocks: list[bytes], fast: bool, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(ResponsesStream, "fast", fast)
        stream = ResponsesStream(ResponseContext("resp_test", "kimi-k2-thinking", 1))
        return b"".join(stream.feed(b) for b in blocks) + stream.close()


@pytest.mark.parametrize("vllm", [False, True], ids=["moonshot", "vllm"])
def test_delta_only_chunks_translate_as_the_general_path_does(vllm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    events = answer(vllm)
    general = translate(events, False, monkeypatch)
    assert translate(events, True, monkeypatch) == general  # one chunk per block: byte for byte
    assert translate(events, False, monkeypatch) == general
    whole = translate([b"".join(events)], True, monkeypatch)  # one block with every event
    assert joined(whole) == joined(general)
    data = b"".join(events)
    rnd = random.Random(7)
    for _ in range(100):  # cut anywhere, as the network does
        cuts = sorted(rnd.sample(range(1, len(data)), 9))
        parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert joined(translate(parts, True, monkeypatch)) == joined(general)


def test_deltas_that_arrive_together_go_out_as_one_event_per_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast upstream's burst costs one delta event per item, not one per chunk: the reasoning
    chunks of one block are one reasoning delta, the text chunks one text delta."""
    events = answer(False)
    per_chunk = [e for e in parsed(translate(events, True, monkeypatch)) if e["type"] in DELTAS]
    burst = [e for e in parsed(translate([b"".join(events)], True, monkeypatch)) if e["type"] in DELTAS]
    assert len(per_chunk) == 2 * len(TEXTS) + 3
    # reasoning run | text run | the two-field chunk (general path: reasoning, then text) | "after"
    assert [(e["type"].split(".")[1], e["delta"]) for e in burst] == [
        ("reasoning_summary_text", "".join(TEXTS)),
        ("output_text", "".join(TEXTS)),
        ("reasoning_summary_text", "both fields"),
        ("output_text", "x"),
        ("output_text", "after"),
    ]


def test_the_fast_path_is_taken_for_plain_deltas_and_reuses_the_upstream_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    general: list[bytes] = []
    original = ResponsesStream._event

    def counted(self: ResponsesStream, data: bytes, out: list[bytes]) -> None:
        general.append(data)
        original(self, data, out)

    monkeypatch.setattr(ResponsesStream, "_event", counted)
    stream = ResponsesStream(ResponseContext("resp_test", "kimi-k2-thinking", 1))
    escaped = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\u00e9t\\u00e9"},"finish_reason":null}]}\n\n'
    out = stream.feed(chunk({"content": "hello"})) + stream.feed(escaped)
    assert general == []  # neither chunk was parsed whole
    assert b'"delta":"\\u00e9t\\u00e9"' in out  # the upstream's own (valid) encoding, not re-encoded
    tail = stream.feed(chunk({}, "stop")) + stream.close()
    done = [orjson.loads(line[6:]) for line in tail.split(b"\n") if line.startswith(b"data: ")]
    text_done = next(e for e in done if e["type"] == "response.output_text.done")
    assert text_done["text"] == "hello\u00e9t\u00e9"


def test_a_chunk_whose_delta_string_does_not_decode_is_dropped_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\q"},"finish_reason":null}]}\n\n'
    events = [chunk({"content": "ok"}), bad, chunk({}, "stop"), b"data: [DONE]\n\n"]
    general = translate(events, False, monkeypatch)
    assert translate(events, True, monkeypatch) == general
    assert b"\\q" not in general
