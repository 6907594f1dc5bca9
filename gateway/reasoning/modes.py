"""The reasoning modes as a response transform: pass (under the client's field name), strip, redact.

The transform reads the reasoning from whichever field the upstream used (``reasoning_content``,
``reasoning``, both during vLLM's rename window) and, when the upstream has no reasoning parser or
writes ``<think>`` into the content, from the content itself. It writes what the tenant's clients
may see under the field they expect, and hands the original to a :class:`Turn` so it can be kept
for the next tool-loop request and for capture. A stream chunk left with nothing to say is dropped;
the chunk that carries ``finish_reason`` or usage always goes out, with any held-back text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from gateway.reasoning.redact import Redactor, StreamRedactor
from gateway.reasoning.think_tags import ThinkSplitter
from gateway.transforms.base import Chunk
from gateway.transforms.order import REASONING

Mode = Literal["pass", "strip", "redact"]
FIELDS = ("reasoning_content", "reasoning")


@dataclass(slots=True)
class ChoiceRecord:
    """One choice of the answer as assembled so far: the original reasoning, and what the client got."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def calls(self) -> list[dict[str, Any]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]


@dataclass(slots=True)
class Turn:
    """The answer of one request, per choice index (filled by the transforms as it passes)."""

    choices: dict[int, ChoiceRecord] = field(default_factory=dict)

    def choice(self, index: int) -> ChoiceRecord:
        record = self.choices.get(index)
        if record is None:
            record = self.choices[index] = ChoiceRecord()
        return record


def take_reasoning(holder: dict[str, Any], preferred: str) -> str | None:
    """Remove every reasoning field from a delta or message; the text (the upstream's own field first)."""
    text = None
    for name in (preferred, *(f for f in FIELDS if f != preferred)):
        if name in holder:
            value = holder.pop(name)
            if text is None and isinstance(value, str):
                text = value
    return text


class _ChoiceState:
    __slots__ = ("redactor", "splitter")

    def __init__(self, splitter: ThinkSplitter | None, redactor: StreamRedactor | None) -> None:
        self.splitter = splitter
        self.redactor = redactor


class ReasoningTransform:
    """One request's reasoning mode (see the module docstring)."""

    stage: ClassVar[int] = REASONING

    def __init__(
        self,
        mode: Mode,
        client_field: str,
        upstream_field: str,
        turn: Turn,
        *,
        redactor: Redactor | None = None,
        split_think: bool = False,
        starts_thinking: bool = False,
    ) -> None:
        if mode == "redact" and redactor is None:
            raise ValueError("redact mode needs a redactor")
        self.mode = mode
        self.client_field = client_field
        self.upstream_field = upstream_field
        self.turn = turn
        self.redactor = redactor
        self.split_think = split_think
        self.starts_thinking = starts_thinking
        self._states: dict[int, _ChoiceState] = {}
        self._template: dict[str, Any] | None = None

    def _state(self, index: int) -> _ChoiceState:
        st = self._states.get(index)
        if st is None:
            st = self._states[index] = _ChoiceState(
                ThinkSplitter(self.starts_thinking) if self.split_think else None,
                StreamRedactor(self.redactor) if self.mode == "redact" and self.redactor is not None else None,
            )
        return st

    def _shown(self, text: str) -> str | None:
        """What the client may see of a whole reasoning text."""
        if self.mode == "strip":
            return None
        if self.mode == "redact":
            assert self.redactor is not None
            return self.redactor.redact(text)
        return text

    # -- non-stream

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            reasoning = take_reasoning(message, self.upstream_field)
            content = message.get("content")
            if self.split_think and isinstance(content, str) and content:
                splitter = ThinkSplitter(self.starts_thinking)
                r1, c1 = splitter.feed(content)
                r2, c2 = splitter.finish()
                if r1 or r2 or splitter.thinking or c1 + c2 != content:
                    reasoning = (reasoning or "") + r1 + r2
                    message["content"] = c1 + c2
            if reasoning:
                self.turn.choice(choice.get("index", 0)).reasoning.append(reasoning)
            shown = self._shown(reasoning) if reasoning is not None else None
            if shown is not None:
                message[self.client_field] = shown

    # -- stream

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return [chunk]
        if self._template is None:
            self._template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        keep = chunk.get("usage") is not None
        for choice in choices:
            if not isinstance(choice, dict):
                keep = True
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(choice.get("index", 0), delta, choice.get("finish_reason") is not None)
            keep = keep or _meaningful(choice)
        return [chunk] if keep else []

    def _delta(self, index: int, delta: dict[str, Any], last: bool) -> None:
        st = self._state(index)
        reasoning = take_reasoning(delta, self.upstream_field) or ""
        content = delta.get("content")
        if st.splitter is not None:
            r, c = st.splitter.feed(content) if isinstance(content, str) and content else ("", "")
            if last:
                r2, c2 = st.splitter.finish()
                r, c = r + r2, c + c2
            reasoning += r
            if isinstance(content, str) or c:
                delta["content"] = c
        if reasoning:
            self.turn.choice(index).reasoning.append(reasoning)
        if self.mode == "strip":
            return
        if self.mode == "pass":
            if reasoning:
                delta[self.client_field] = reasoning
            return
        assert st.redactor is not None
        shown = st.redactor.feed(reasoning) if reasoning else ""
        answer_started = bool(delta.get("content")) or bool(delta.get("tool_calls"))
        if last or answer_started:
            shown += st.redactor.finish()
        if shown:
            delta[self.client_field] = shown

    def finish(self) -> list[Chunk]:
        """A stream that ended without a finish chunk: release held-back text in one last chunk."""
        out: list[Chunk] = []
        for index, st in sorted(self._states.items()):
            delta: dict[str, Any] = {}
            self._flush(index, st, delta)
            if delta:
                chunk = dict(self._template or {})
                chunk["choices"] = [{"index": index, "delta": delta, "finish_reason": None}]
                out.append(chunk)
        return out

    def _flush(self, index: int, st: _ChoiceState, delta: dict[str, Any]) -> None:
        reasoning = ""
        if st.splitter is not None:
            r, c = st.splitter.finish()
            reasoning += r
            if c:
                delta["content"] = c
        if reasoning:
            self.turn.choice(index).reasoning.append(reasoning)
        if self.mode == "pass" and reasoning:
            delta[self.client_field] = reasoning
        elif st.redactor is not None:
            shown = st.redactor.feed(reasoning) + st.redactor.finish()
            if shown:
                delta[self.client_field] = shown


def _meaningful(choice: dict[str, Any]) -> bool:
    """A choice worth a chunk: it ends, or its delta carries something besides empty text."""
    if choice.get("finish_reason") is not None or choice.get("usage") is not None:
        return True
    if choice.get("logprobs"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return True
    return any(value not in (None, "", []) for value in delta.values())
