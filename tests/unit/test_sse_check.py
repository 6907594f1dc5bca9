"""The relay's check of streamed events: byte counts pass a block in the usual framing, anything else
is judged event by event, and both find the same first event that is no chat completion chunk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstreams.sse_check import _event_by_event, first_invalid

ROLE = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
DELTA = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"he said \\"choices\\": {}"}}]}\n\n'
FINISH = b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
SPACED = b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'  # Python's json.dumps
ERROR = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
DONE = b"data: [DONE]\n\n"
GOOD = [ROLE, DELTA, FINISH, USAGE, SPACED, ERROR, DONE]

ODD_BUT_VALID = [
    b": keep-alive\n\n",
    b"event: message\ndata: " + ROLE[6:],
    ROLE.replace(b"\n\n", b"\r\n\r\n"),
    b'data: {"id":"c1",\ndata: "choices":[]}\n\n',  # one payload over two data lines
    b'data:{"choices":[]}\n\n',  # no space after the colon
    b'data: {"usage":{"prompt_tokens":3}}\n\n',  # usage without choices (some providers' last event)
    b"id: 7\nretry: 1000\n\n",
]
BAD = {
    b"data: upstream hiccup, not json\n\n": "an event whose data is not JSON",
    b'data: {"id":"c1","choices":[{"index":0,"delta\n\n': "an event whose data is not JSON",
    b'data: {"object":"keepalive","status":"processing"}\n\n': "an event that is no chat completion chunk",
    b"data: [1, 2]\n\n": "an event whose data is not a JSON object",
    b"<html>\n<body><h1>502 Bad Gateway</h1></body>\n</html>\n\n": "a line that is no SSE field",
    b'data: {"choices":[]}\n<p>oops</p>\n\n': "a line that is no SSE field",
}


def test_usual_blocks_pass_on_counts_alone() -> None:
    block = b"".join(GOOD)
    assert first_invalid(block) is None
    for event in GOOD:
        assert first_invalid(event) is None


@pytest.mark.parametrize("event", ODD_BUT_VALID)
def test_other_framings_are_judged_event_by_event_and_pass(event: bytes) -> None:
    assert first_invalid(ROLE + event + DONE) is None


@pytest.mark.parametrize(("event", "what"), list(BAD.items()))
def test_the_first_bad_event_is_found_with_its_offset(event: bytes, what: str) -> None:
    block = ROLE + DELTA + event + FINISH + DONE
    assert first_invalid(block) == (len(ROLE + DELTA), what)
    assert first_invalid(event) == (0, what)


def test_a_block_without_its_final_blank_line_is_checked_too() -> None:
    assert first_invalid(ROLE + b"data: not json") == (len(ROLE), "an event whose data is not JSON")
    assert first_invalid(ROLE + DONE.rstrip()) is None


events = st.lists(st.sampled_from(GOOD + ODD_BUT_VALID), min_size=1, max_size=8)


@settings(max_examples=400)
@given(events, st.sampled_from(list(BAD)), st.data())
def test_counts_and_the_event_by_event_check_agree(good: list[bytes], bad: bytes, data: st.DataObject) -> None:
    block = b"".join(good)
    assert first_invalid(block) is None and _event_by_event(block) is None
    at = data.draw(st.integers(0, len(good)))
    spoiled = b"".join(good[:at]) + bad + b"".join(good[at:])
    assert first_invalid(spoiled) == _event_by_event(spoiled) == (len(b"".join(good[:at])), BAD[bad])


def test_a_cut_chunk_before_the_upstreams_own_error_is_found() -> None:
    """The error event has no "choices": counted apart, it cannot stand in for the cut chunk's lost "}"."""
    cut = b'data: {"id":"c1","choices":[{"index":0,"delta\n\n'
    assert first_invalid(ROLE + cut + ERROR) == (len(ROLE), "an event whose data is not JSON")
