"""Server-sent events relayed at event boundaries, as bytes.

Upstream chunks are cut wherever TCP cut them; the relay forwards everything up to the last
complete event and keeps the rest, so a client never sees half an event and an error event can be
appended cleanly when the upstream breaks. No event is parsed or re-encoded here.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]"


def last_boundary(data: bytes, end: int | None = None) -> int:
    """Index just past the last blank line (``\\n\\n`` or ``\\r\\n\\r\\n``) before ``end``, or 0."""
    lf = data.rfind(b"\n\n", 0, end)
    # a CRLF boundary beats the LF one only if it ends after it: look just there, not through the
    # whole block again (an LF-only stream would be scanned twice to the start for nothing)
    crlf = data.rfind(b"\r\n\r\n", max(lf - 2, 0), end)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def chunk_of(data: bytes) -> dict[str, Any] | None:
    """The JSON object an SSE ``data:`` payload holds, or None: not JSON, or not an object (a
    translator drops such an event, as the client's SDK would)."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def error_event(message: str, kind: str, code: str | None = None) -> bytes:
    """An SSE event the OpenAI SDKs raise as an APIError (``code`` defaults to ``kind``)."""
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class SSERelay:
    """Event-aligned pass-through with end-of-stream bookkeeping."""

    __slots__ = ("_last", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events now available (possibly ``b""``)."""
        data = self._tail + chunk if self._tail else chunk
        if data.endswith(b"\n\n"):  # the usual case: the chunk ends on an event boundary
            self._tail = b""
            self._last = data
            return data
        cut = last_boundary(data)
        if cut == 0:
            self._tail = data
            return b""
        if cut == len(data):
            self._tail = b""
            self._last = data
            return data
        self._tail = data[cut:]
        out = data[:cut]
        self._last = out
        return out

    @property
    def saw_done(self) -> bool:
        return DONE in self._last[-64:]

    def finish(self) -> bytes:
        """The last event, after the upstream closed the stream cleanly: completed with its blank
        line when the upstream left it out (``b""`` when there is none). Whether the stream was
        complete (``saw_done``) is the caller's to judge: one without ``[DONE]`` may still have
        finished its answer, or may have stopped in the middle of it."""
        out = b""
        if self._tail.strip():
            out = self._tail.rstrip(b"\r\n") + b"\n\n"
            self._last = out
        self._tail = b""
        return out

    def abort(self, message: str, kind: str) -> bytes:
        """Bytes that end the stream after an upstream failure: an error event, never half an event."""
        self._tail = b""
        return error_event(message, kind)
