"""The SSE relay forwards whole events only, whatever way TCP cut the bytes."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.upstreams.sse import SSERelay, last_boundary

EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
STREAM = b"".join(EVENTS)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_any_split_yields_the_same_bytes_at_event_boundaries(cuts: list[int]) -> None:
    relay = SSERelay()
    outs = [relay.feed(chunk) for chunk in split(STREAM, cuts)]
    outs.append(relay.finish())
    assert b"".join(outs) == STREAM
    for out in outs:
        assert out == b"" or out.endswith(b"\n\n")


def test_crlf_boundaries_are_honoured() -> None:
    relay = SSERelay()
    assert relay.feed(b"data: a\r\n\r\ndata: b") == b"data: a\r\n\r\n"
    assert relay.feed(b"\r\n\r\ndata: [DONE]\r\n\r\n") == b"data: b\r\n\r\ndata: [DONE]\r\n\r\n"
    assert relay.finish() == b""


def test_stream_without_done_is_left_for_the_caller_to_judge() -> None:
    relay = SSERelay()
    relay.feed(EVENTS[0] + EVENTS[1])
    assert relay.finish() == b""
    assert not relay.saw_done


def test_final_event_without_blank_line_is_completed() -> None:
    relay = SSERelay()
    assert relay.feed(EVENTS[2] + b"data: [DONE]") == EVENTS[2]
    assert relay.finish() == b"data: [DONE]\n\n"


def test_abort_drops_half_event_and_sends_error() -> None:
    relay = SSERelay()
    relay.feed(EVENTS[0] + EVENTS[1][:20])
    out = relay.abort("cut", "upstream_error")
    assert b"reasoning" not in out
    assert orjson.loads(out[6:])["error"]["message"] == "cut"


@given(st.binary(max_size=24).map(lambda b: bytes(b"ab\r\n"[x % 4] for x in b)), st.data())
def test_last_boundary_finds_what_a_search_of_the_whole_block_finds(data: bytes, draw: st.DataObject) -> None:
    """The CRLF boundary is looked for only after the last LF one: the answer must not change."""
    end = draw.draw(st.one_of(st.none(), st.integers(0, len(data))))
    lf = data.rfind(b"\n\n", 0, end)
    crlf = data.rfind(b"\r\n\r\n", 0, end)
    assert last_boundary(data, end) == max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
