"""Reading a Responses API event stream in tests: its events, checked for framing and numbering, and
the same events with consecutive deltas of one item joined (the gateway may join deltas that arrive
together; a client reads the same text either way)."""

from __future__ import annotations

from typing import Any

import orjson

DELTAS = frozenset(
    ("response.output_text.delta", "response.reasoning_summary_text.delta", "response.function_call_arguments.delta")
)


def parsed(stream: bytes) -> list[dict[str, Any]]:
    """The events of a Responses stream, each checked to be framed as ``event: <type>`` + its data."""
    events = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        head, data = block.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert head == b"event: " + event["type"].encode()
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def joined(stream: bytes) -> list[dict[str, Any]]:
    """The events with consecutive deltas of one item joined into one, numbered again."""
    out: list[dict[str, Any]] = []
    for event in parsed(stream):
        last = out[-1] if out else None
        if (
            last is not None
            and event["type"] in DELTAS
            and last["type"] == event["type"]
            and last["item_id"] == event["item_id"]
        ):
            last["delta"] += event["delta"]
            continue
        out.append(dict(event))
    for n, event in enumerate(out):
        event["sequence_number"] = n
    return out
