"""Raw K2 tool-call sections inside ``content`` (or leaked into reasoning) become ``tool_calls``.

A vLLM serving Kimi K2 without ``--tool-call-parser`` (protocols.md §4.3) leaves the model's own
markers in the text::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
    {"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>

:class:`MarkerParser` reads that text incrementally: it releases text as soon as it cannot be the
start of a marker (holding back only a possible marker prefix), so a stream keeps flowing and a
marker split across chunks at any position is still recognised. Tolerated as the SGLang and vLLM
parsers do: whitespace between tokens, the singular ``tool_call_section`` spelling, a call opened
without its section, and a missing section end at end of stream. Calls whose id is not of the form
``NAME:IDX`` (``functions.NAME:IDX``) are dropped. The raw id becomes ``tool_calls[].id``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gateway.transforms.base import Chunk
from gateway.transforms.order import MARKERS

SECTION_BEGINS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
ALL_MARKERS = (*SECTION_BEGINS, *SECTION_ENDS, CALL_BEGIN, ARG_BEGIN, CALL_END)
_LONGEST = max(len(m) for m in ALL_MARKERS)
SNIFF = "<|tool_call"  # every section and call marker starts with this

_TEXT, _SECTION, _ID, _ARGS = range(4)
_TEXT_MARKERS = (*SECTION_BEGINS, CALL_BEGIN)
_SECTION_MARKERS = (CALL_BEGIN, *SECTION_ENDS)
_ID_MARKERS = (ARG_BEGIN, CALL_END)
_ARGS_MARKERS = (CALL_END, *SECTION_ENDS, CALL_BEGIN)


def _find(buf: str, markers: tuple[str, ...]) -> tuple[int, str]:
    best, found = -1, ""
    for marker in markers:
        pos = buf.find(marker)
        if pos >= 0 and (best < 0 or pos < best):
            best, found = pos, marker
    return best, found


def _held(buf: str) -> int:
    """Length of the longest suffix of ``buf`` that could be the start of a marker."""
    start = max(0, len(buf) - _LONGEST + 1)
    pos = buf.find("<", start)
    while pos >= 0:
        tail = buf[pos:]
        if any(m.startswith(tail) for m in ALL_MARKERS):
            return len(buf) - pos
        pos = buf.find("<", pos + 1)
    return 0


def call_name(call_id: str) -> str | None:
    """``functions.get_weather:0`` → ``get_weather``; None when the id is not a K2 call id."""
    head, sep, tail = call_id.rpartition(":")
    if not sep or not head or not tail:
        return None
    name = head.split(".")[-1]
    return name or None


class CallCounter:
    """Tool indexes of one choice, shared by the parsers of its text fields."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class MarkerParser:
    """Splits text into plain content and tool-call deltas, one piece of text at a time."""

    __slots__ = ("_buf", "_count", "_counter", "_current", "_implicit", "_started", "_state")

    def __init__(self, counter: CallCounter | None = None) -> None:
        self._state = _TEXT
        self._buf = ""
        self._counter = counter if counter is not None else CallCounter()
        self._count = 0  # calls emitted by this parser
        self._current = -1  # index of the call whose arguments are streaming; -1 = a dropped call
        self._started = False  # the current call's arguments have begun (leading space skipped)
        self._implicit = False  # a call opened without a section: text follows its end

    @property
    def calls(self) -> int:
        return self._count

    @property
    def idle(self) -> bool:
        """Nothing held and outside any section: plain text may pass untouched."""
        return self._state == _TEXT and not self._buf

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        while self._step(out, calls):
            pass
        return "".join(out), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Flush at end of stream: held text is text after all; an unterminated call ends here."""
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        buf, self._buf = self._buf, ""
        if self._state == _TEXT:
            out.append(buf)
        elif self._state == _ARGS:
            self._args(buf.strip() if not self._started else buf.rstrip(), calls)
        self._state = _TEXT
        return "".join(out), calls

    def _args(self, piece: str, calls: list[dict[str, Any]]) -> None:
        if piece and self._current >= 0:
            calls.append({"index": self._current, "function": {"arguments": piece}})

    def _step(self, out: list[str], calls: list[dict[str, Any]]) -> bool:
        """Consume what can be decided in the buffer; True when the loop should run again."""
        buf, state = self._buf, self._state
        if state == _TEXT:
            pos, marker = _find(buf, _TEXT_MARKERS)
            if pos < 0:
                keep = _held(buf)
                out.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return False
            out.append(buf[:pos])
            self._buf = buf[pos + len(marker) :]
            self._implicit = marker == CALL_BEGIN
            self._state = _ID if self._implicit else _SECTION
            return True
        if state == _SECTION:
            pos, marker = _find(buf, _SECTION_MARKERS)
            if pos < 0:
                keep = _held(buf)
                self._buf = buf[len(buf) - keep :]  # whitespace between calls is dropped
                return False
            self._buf = buf[pos + len(marker) :]
            self._state = _ID if marker == CALL_BEGIN else _TEXT
            return True
        if state == _ID:
            pos, marker = _find(buf, _ID_MARKERS)
            if pos < 0:
                return False  # ids are short: wait for the rest
            call_id = buf[:pos].strip()
            self._buf = buf[pos + len(marker) :]
            if marker == CALL_END:  # a call without arguments marker: nothing usable
                self._state = _TEXT if self._implicit else _SECTION
                return True
            name = call_name(call_id)
            if name is None:
                self._current = -1
            else:
                self._current = self._counter.value
                self._counter.value += 1
                self._count += 1
                calls.append(
                    {
                        "index": self._current,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                )
            self._state, self._started = _ARGS, False
            return True
        # _ARGS
        pos, marker = _find(buf, _ARGS_MARKERS)
        if pos < 0:
            keep = _held(buf)
            piece = buf[: len(buf) - keep]
            if not self._started:
                piece = piece.lstrip()  # leading space before the arguments is dropped
            emit = piece.rstrip()  # trailing space may precede the end marker: hold it too
            self._buf = piece[len(emit) :] + buf[len(buf) - keep :]
            if emit:
                self._started = True
                self._args(emit, calls)
            return False
        piece = buf[:pos].rstrip()
        if not self._started:
            piece = piece.lstrip()
        self._args(piece, calls)
        self._buf = buf[pos + len(marker) :]
        if marker == CALL_END:
            self._state = _TEXT if self._implicit else _SECTION
        else:
            self._state = _ID if marker == CALL_BEGIN else _TEXT
        return True


# reasoning first: resellers leak the markers into reasoning as well (protocols.md §4.3)
FIELDS = ("reasoning_content", "reasoning", "content")


def _has_marker_start(delta: dict[str, Any]) -> bool:
    return any(isinstance(delta.get(f), str) and "<" in delta[f] for f in FIELDS)


class _ChoiceMarkers:
    """The parsers of one streamed choice, one per text field, numbering calls together."""

    __slots__ = ("counter", "parsers")

    def __init__(self) -> None:
        self.counter = CallCounter()
        self.parsers: dict[str, MarkerParser] = {}

    def parser(self, field: str) -> MarkerParser:
        parser = self.parsers.get(field)
        if parser is None:
            parser = self.parsers[field] = MarkerParser(self.counter)
        return parser

    @property
    def idle(self) -> bool:
        return all(p.idle for p in self.parsers.values())


class K2MarkerTransform:
    """Response transform for upstreams configured with ``tool_call_markers: true``."""

    stage: ClassVar[int] = MARKERS

    __slots__ = ("_choices", "_meta")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceMarkers] = {}
        self._meta: dict[str, Any] = {}

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            counter = CallCounter()
            deltas: list[dict[str, Any]] = []
            for field in FIELDS:
                text = message.get(field)
                if not isinstance(text, str) or SNIFF not in text:
                    continue
                parser = MarkerParser(counter)
                rest, found = parser.feed(text)
                tail, more = parser.finish()
                if parser.calls:
                    message[field] = rest + tail
                    deltas += found + more
            if not counter.value:
                continue
            existing = message.get("tool_calls")
            calls = list(existing) if isinstance(existing, list) else []
            calls.extend(_assemble(deltas))
            message["tool_calls"] = calls
            if choice.get("finish_reason") in ("stop", None):
                choice["finish_reason"] = "tool_calls"

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return [chunk]
        if not self._meta:
            self._meta = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        emptied = 0
        for choice in choices:
            if isinstance(choice, dict) and self._choice(choice):
                emptied += 1
        if emptied == len(choices) and "usage" not in chunk:
            return []
        return [chunk]

    def _choice(self, choice: dict[str, Any]) -> bool:
        """Rewrite one streamed choice; True when it was left with nothing to say."""
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        finish = choice.get("finish_reason")
        state = self._choices.get(index)
        if finish is None and (state is None or state.idle) and not _has_marker_start(delta):
            return False  # the common case: plain text, nothing held
        if state is None:
            state = self._choices[index] = _ChoiceMarkers()
        calls: list[dict[str, Any]] = []
        emptied: set[str] = set()
        for field in FIELDS:
            value = delta.get(field)
            if isinstance(value, str):
                text, found = state.parser(field).feed(value)
                calls += found
                delta[field] = text
                if value and not text:
                    emptied.add(field)
        if finish is not None:
            for field, parser in state.parsers.items():
                tail, found = parser.finish()
                calls += found
                if tail:
                    delta[field] = (delta.get(field) or "") + tail
                    emptied.discard(field)
            if state.counter.value and finish == "stop":
                choice["finish_reason"] = "tool_calls"
            del self._choices[index]
        if calls:
            delta["tool_calls"] = [*(delta.get("tool_calls") or ()), *calls]
        return bool(emptied) and not calls and finish is None and set(delta) <= emptied and "usage" not in choice

    def finish(self) -> list[Chunk]:
        """Streams that ended without a finish_reason: what the parsers still hold."""
        out: list[Chunk] = []
        for index, state in sorted(self._choices.items()):
            delta: dict[str, Any] = {}
            calls: list[dict[str, Any]] = []
            for field, parser in state.parsers.items():
                text, found = parser.finish()
                calls += found
                if text:
                    delta[field] = text
            if calls:
                delta["tool_calls"] = calls
            if delta:
                out.append({**self._meta, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        self._choices.clear()
        return out


def _assemble(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream-shaped tool-call deltas → complete calls (non-stream messages)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        index = d["index"]
        if "id" in d:
            calls[index] = {
                "id": d["id"],
                "type": "function",
                "function": {"name": d["function"]["name"], "arguments": ""},
            }
        elif index in calls:
            calls[index]["function"]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]
