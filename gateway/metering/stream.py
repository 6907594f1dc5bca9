"""Usage capture on a relayed SSE stream, with OpenAI's ``include_usage`` semantics for the client.

The gateway always asks upstreams for stream usage, so the client must get OpenAI's final usage chunk
(``choices: []``) only if it asked for one, and must get it even from an upstream that reports usage
elsewhere (Moonshot puts it inside the last chunk's choice). Events without a usage object pass
through as the same bytes; only the one or two events that carry usage are parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering.tokens import count_text
from gateway.upstreams.sse import last_boundary
from gateway.upstreams.usage import USAGE_RE, Usage, usage_of_response

_DONE = b"[DONE]"


def _events(block: bytes) -> list[bytes]:
    """Split a block of whole SSE events, keeping each event's bytes exactly."""
    if b"\r" not in block:  # the common case: one linear pass
        parts = block.split(b"\n\n")
        out = [p + b"\n\n" for p in parts[:-1]]
        if parts[-1]:
            out.append(parts[-1])
        return out
    out, start, n = [], 0, len(block)
    while start < n:
        lf = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start)
        if lf < 0 and crlf < 0:
            out.append(block[start:])
            break
        end = crlf + 4 if crlf >= 0 and (lf < 0 or crlf < lf) else lf + 2
        out.append(block[start:end])
        start = end
    return out


def _data(event: bytes) -> bytes:
    """The payload of an event's ``data:`` lines (joined as the SSE spec says)."""
    if event.startswith(b"data:"):
        line = event.rstrip(b"\r\n")
        if b"\n" not in line and b"\r" not in line:  # one data line: nearly every event
            return line[5:].lstrip(b" ")
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


def _usage_at(data: bytes) -> int:
    """Where the first ``"usage": {`` starts in ``data``, or -1 (memmem first, the regex only there)."""
    at = data.find(b'"usage"')
    while at >= 0:
        if USAGE_RE.match(data, at):
            return at
        at = data.find(b'"usage"', at + 7)
    return -1


def _object(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _usage_only(data: bytes) -> bool:
    """True for OpenAI's usage chunk (no choices); cheap for the usual spellings, parsed otherwise."""
    if b'"choices":[]' in data:
        return True
    if b'"choices":[{' in data:
        return False
    chunk = _object(data)
    return chunk is not None and not chunk.get("choices")


class StreamTap:
    """Watches relayed events: captures usage, drops or synthesizes the client's usage chunk.

    Usage-bearing events are kept as bytes and parsed once, when the usage is read: Moonshot repeats
    the same usage in the last chunk's choice and in OpenAI's usage chunk, and only the last counts.
    """

    __slots__ = ("_found", "_meta", "_parsed", "_seen", "_wants_usage", "blocks", "sent_usage_chunk")

    def __init__(self, client_wants_usage: bool) -> None:
        self._wants_usage = client_wants_usage
        self._meta: dict[str, Any] | None = None
        self._seen: list[bytes] = []  # data of the usage-bearing events, in arrival order
        self._parsed = 0  # how many of ``_seen`` ``_found`` accounts for
        self._found: Usage | None = None
        self.sent_usage_chunk = False
        self.blocks: list[bytes] = []  # what reached the client, kept by reference for estimates

    @property
    def usage(self) -> Usage | None:
        """The last usage the upstream reported."""
        if self._parsed < len(self._seen):
            new, self._parsed = self._seen[self._parsed :], len(self._seen)
            for data in reversed(new):  # the last parseable one wins
                chunk = _object(data)
                found = usage_of_response(chunk) if chunk is not None else None
                if found is not None:
                    self._found, self._meta = found, chunk  # the chunk's id, created, model: see _usage_chunk
                    break
        return self._found

    def split(self, block: bytes) -> tuple[bytes, bytes]:
        """``(head, tail)``: the events that pass as they are, and those from the first one that
        carries usage (or a ``[DONE]`` that needs the client's usage chunk) on, which
        :meth:`finish_tail` must see. A block whose only usage is one OpenAI usage chunk (how
        OpenAI-compatible upstreams end a stream) is finished here."""
        first = _usage_at(block)
        if self._wants_usage and not self.sent_usage_chunk and self.usage is not None:
            # usage known, its chunk not sent: it goes before the first [DONE], which may come before
            # the block's first usage. Otherwise a [DONE] passes as it is, and a stream read in one
            # block (kilobytes) is not searched for one.
            done = block.find(_DONE, 0, first if first >= 0 else len(block))
            if done >= 0:
                first = done
        if first >= 0 and (whole := self._one_usage_chunk(block, first)) is not None:
            self.blocks.append(whole)
            return whole, b""
        if first < 0:
            self.blocks.append(block)
            return block, b""
        start = last_boundary(block, first)
        head = block[:start]
        if head:
            self.blocks.append(head)
        return head, block[start:]

    def _one_usage_chunk(self, block: bytes, at: int) -> bytes | None:
        """The block as the client must see it when its only usage is one OpenAI usage chunk (an
        LF-framed event at ``at`` with ``choices: []``, nothing after it mentioning usage): what
        :meth:`finish_tail` would make of it, without taking the tail apart event by event. None
        when the block is any other shape (the general path handles it)."""
        start = last_boundary(block, at)
        end = block.find(b"\n\n", at)
        if end < 0 or block.find(b'"usage"', end) >= 0 or not block.startswith(b"data:", start):
            return None
        end += 2
        event = block[start:end]
        if b"\r" in event or (data := _data(event)) == _DONE or not _usage_only(data):
            return None
        out = self._usage_event(event, data, usage_only=True)  # kept or dropped, its usage read
        return block if out is event else block[:start] + out + block[end:]

    def finish_tail(self, tail: bytes) -> bytes:
        events = _events(tail)
        out_events = [self._event(ev) for ev in events]
        # nearly always every event passes as it came: the tail itself, not a copy of it
        out = tail if all(o is e for o, e in zip(out_events, events, strict=True)) else b"".join(out_events)
        self.blocks.append(out)
        return out

    def process(self, block: bytes) -> bytes:
        """The block as the client must see it (split and finished in one go)."""
        if not block:
            return block
        head, tail = self.split(block)
        return head + self.finish_tail(tail) if tail else head

    def _event(self, event: bytes) -> bytes:
        data = _data(event)
        if data == _DONE:
            if self._wants_usage and not self.sent_usage_chunk and self.usage is not None:
                self.sent_usage_chunk = True
                return self._usage_chunk() + event
            return event
        if _usage_at(data) < 0:
            return event
        return self._usage_event(event, data, _usage_only(data))

    def _usage_event(self, event: bytes, data: bytes, usage_only: bool) -> bytes:
        """An event carrying usage, as the client gets it: OpenAI's usage chunk (``usage_only``) is
        kept for a client that asked for it and dropped otherwise; any other passes as it came."""
        self._seen.append(data)
        if usage_only and self.usage is not None:
            if self._wants_usage:
                self.sent_usage_chunk = True
                return event
            return b""  # the client did not ask for OpenAI's usage chunk
        return event

    def _usage_chunk(self) -> bytes:
        assert self.usage is not None
        meta = self._meta or {}
        chunk = {
            "id": meta.get("id", ""),
            "object": "chat.completion.chunk",
            "created": meta.get("created", 0),
            "model": meta.get("model", ""),
            "choices": [],
            "usage": self.usage.openai_shape(),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def generated_text(self) -> str:
        """Text the model generated so far (reasoning, content, tool arguments), for estimates."""
        parts: list[str] = []
        for block in self.blocks:
            for event in _events(block):
                data = _data(event)
                if not data or data == _DONE:
                    continue
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if not isinstance(delta, dict):
                        continue
                    for key in ("reasoning_content", "reasoning", "content"):
                        if isinstance(delta.get(key), str):
                            parts.append(delta[key])
                    for call in delta.get("tool_calls") or ():
                        fn = call.get("function") if isinstance(call, dict) else None
                        if isinstance(fn, dict):
                            parts.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
        return "".join(parts)

    def estimate_completion_tokens(self) -> int:
        return count_text(self.generated_text())
