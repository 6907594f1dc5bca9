"""Is every event of a relayed block a chat completion chunk? Checked in C-speed scans, not parses.

An upstream's 200 stream can carry what no client can read: a ``data:`` line that is not JSON, JSON
of another shape, a proxy's HTML page between two events. The relay checks every block before it
leaves, so this must cost next to nothing on the hot path: a block in the usual framing (``data:
{...}`` events, one line each, LF line ends, the ``[DONE]`` event) is judged by a few C-speed passes
over bytes the relay already holds (the separators taken out, one newline search, one substring
count), whatever the number of events, with no event split out and none parsed. Only a block in
another framing (CRLF, comments, ``event:`` lines, multi-line data) or one the counts reject is
looked at event by event, and each of its data payloads parsed.

The counts check framing and shape (each event is one ``data: {`` ... ``}`` line naming ``choices``
once, or an error event); they do not parse what is between the braces. Where the gateway parses
events anyway (usage, transforms, the Messages and Responses translators) a body that still is not
JSON is dropped there, as before; a byte-relayed one reaches the client as the upstream wrote it.
"""

from __future__ import annotations

import orjson

_FIELDS = frozenset((b"data", b"event", b"id", b"retry"))
_SEPARATOR = b"}\n\ndata: {"  # between two events of the usual framing


def first_invalid(block: bytes) -> tuple[int, str] | None:
    """``(offset, what)`` of the first event in ``block`` (whole events, as :class:`SSERelay` hands
    them over) that is no chat completion chunk, ``[DONE]``, comment or error event; None when there
    is none. ``what`` names the kind of problem, never the upstream's bytes (they may hold anything:
    the caller logs them, redacted)."""
    # The usual framing, in a few passes over the bytes. Take the "}\n\ndata: {" separators out of a
    # block that starts with "data: {" and ends with "}\n\n" (or a "[DONE]" event after one): when
    # no newline is left before the ending, every event is one "data: {...}" line, for anything else
    # between them ("data: hiccup", HTML, a chunk cut before its "}") leaves one. Each of those
    # events names "choices" once, or is an error event; one of another shape names neither.
    # (The newline search is memchr; counting newlines would be a byte-at-a-time loop, the dearest
    # part of the check: bench/RESULTS.md, "Invalid upstream answers".)
    if block.startswith(b"data: {") and b"\r" not in block:
        rest = block.replace(_SEPARATOR, b"")
        if block.endswith(b"}\n\n"):
            lines = rest.find(b"\n") == len(rest) - 2
        else:
            lines = block.endswith(b"}\n\ndata: [DONE]\n\n") and rest.find(b"\n") == len(rest) - 16
        if lines:
            events = (len(block) - len(rest)) // len(_SEPARATOR) + 1
            choices = block.count(b'"choices":')
            if choices == events or (choices < events and choices + block.count(b'data: {"error":') == events):
                return None
    return _event_by_event(block)


def _event_by_event(block: bytes) -> tuple[int, str] | None:
    start, n = 0, len(block)
    while start < n:
        lf = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start)
        # the first blank line, CRLF or LF; the last event of a block may lack its own
        end = crlf + 4 if crlf >= 0 and (lf < 0 or crlf < lf) else (lf + 2 if lf >= 0 else n)
        what = _invalid_event(block[start:end])
        if what is not None:
            return start, what
        start = end
    return None


def _invalid_event(event: bytes) -> str | None:
    """What is wrong with one event, or None."""
    data: list[bytes] = []
    for line in event.splitlines():
        if not line or line.startswith(b":"):  # a blank line or a comment (keep-alives)
            continue
        name, colon, value = line.partition(b":")
        if not colon or name not in _FIELDS:
            return "a line that is no SSE field"
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    payload = b"\n".join(data)
    if payload == b"[DONE]":
        return None
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "an event whose data is not JSON"
    if not isinstance(chunk, dict):
        return "an event whose data is not a JSON object"
    if isinstance(chunk.get("choices"), list) or "error" in chunk or isinstance(chunk.get("usage"), dict):
        return None
    return "an event that is no chat completion chunk"
