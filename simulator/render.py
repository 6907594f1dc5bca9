"""Wire rendering of a planned reply: a non-stream JSON body or a list of SSE events.

The plan (what the model "says") is dialect-free; this module puts it into the exact shape each
upstream uses:

* Moonshot (protocols.md §1.3-1.5, §2.5): ``reasoning_content``; the last chunk carries an empty delta,
  the finish_reason and ``choices[0].usage``; with ``stream_options.include_usage`` an extra
  ``choices: []`` chunk follows, with top-level usage (both ``cached_tokens`` and
  ``prompt_tokens_details.cached_tokens``).
* vLLM with parsers (§4.4, §4.6): ``reasoning``; usage only in the ``choices: []`` chunk and only when
  asked for; cached tokens under ``prompt_tokens_details``; the reasoning parser's count of reasoning
  tokens under ``completion_tokens_details.reasoning_tokens`` (current vLLM reports it when a
  reasoning parser runs). Moonshot has no reasoning-token field: its reasoning is inside
  ``completion_tokens`` and nowhere else.
* vLLM without parsers (§4.3): everything in ``content``: reasoning, ``</think>``, then the answer or
  the raw K2 tool-call markers; finish_reason ``stop``; no ``tool_calls``.

SSE events are assembled from byte templates (one per reply and choice index) plus a tiny orjson dump
per delta, so a long stream costs little more than the bytes it sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .text import approx_tokens

DONE_EVENT = b"data: [DONE]\n\n"
ROLE_DELTA = b'{"role":"assistant","content":""}'

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
THINK_END = "</think>"


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    type: str = "function"
    tokens: int = 0


@dataclass(slots=True)
class ChoicePlan:
    """One choice: the pieces it streams, in order, and how it ends."""

    reasoning: list[str] = field(default_factory=list)
    reasoning_tokens: list[int] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    content_tokens: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0

    @property
    def reasoning_count(self) -> int:
        """Reasoning tokens generated (part of ``completion_tokens``)."""
        return sum(self.reasoning_tokens)


@dataclass(slots=True)
class Plan:
    id: str
    created: int
    model: str
    choices: list[ChoicePlan]
    prompt_tokens: int
    cached_tokens: int
    include_usage: bool = False
    show_reasoning: bool = True  # reasoning text is returned (vLLM include_reasoning=false hides it)
    skip_special_tokens: bool | None = None  # vLLM without parsers: True strips the K2 markers

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.reasoning_count for c in self.choices)


def usage(
    plan: Plan, dialect: str, completion: int, *, both_cached_fields: bool = False, parsers: bool = True
) -> dict[str, Any]:
    """The usage object as the dialect reports it (prompt_tokens includes cached tokens in both)."""
    prompt, cached = plan.prompt_tokens, plan.cached_tokens
    if dialect == "vllm":
        reported: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if parsers:  # counted by the reasoning parser; a server without one cannot tell
            reported["completion_tokens_details"] = {"reasoning_tokens": plan.reasoning_tokens}
        return reported
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
    }
    if both_cached_fields:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def raw_call_text(call: ToolCall, markers: bool) -> str:
    """One call as K2 emits it without a tool parser (markers stripped if skip_special_tokens)."""
    if markers:
        return f"{CALL_BEGIN}{call.id}{ARG_BEGIN}{call.arguments}{CALL_END}"
    return f"{call.id}{call.arguments}"


def _raw_content(choice: ChoicePlan, plan: Plan) -> list[str]:
    """The content pieces of a parser-less vLLM reply: reasoning</think>answer-or-markers."""
    pieces = list(choice.reasoning) if plan.show_reasoning else []
    if choice.reasoning:
        pieces.append(THINK_END)
    pieces.extend(choice.content)
    markers = plan.skip_special_tokens is not True
    last = len(choice.tool_calls) - 1
    for i, call in enumerate(choice.tool_calls):
        text = raw_call_text(call, markers)
        if markers and i == 0:
            text = SECTION_BEGIN + text
        if markers and i == last:
            text += SECTION_END
        pieces.append(text)
    return pieces


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": call.arguments}}


def render_body(plan: Plan, dialect: str, parsers: bool = True) -> bytes:
    """The non-stream ``chat.completion`` body."""
    choices = []
    for index, choice in enumerate(plan.choices):
        finish = choice.finish_reason
        message: dict[str, Any]
        if dialect == "vllm" and not parsers:
            message = {"role": "assistant", "content": "".join(_raw_content(choice, plan)), "tool_calls": []}
            if finish == "tool_calls":
                finish = "stop"
        elif dialect == "vllm":
            content = "".join(choice.content)
            reasoning = "".join(choice.reasoning) if plan.show_reasoning else ""
            message = {
                "role": "assistant",
                "content": content if content or not choice.tool_calls else None,
                "reasoning": reasoning or None,
                "tool_calls": [_call_dict(c) for c in choice.tool_calls],
            }
        else:
            message = {"role": "assistant", "content": "".join(choice.content)}
            if choice.reasoning:
                message["reasoning_content"] = "".join(choice.reasoning)
            if choice.tool_calls:
                message["tool_calls"] = [_call_dict(c) for c in choice.tool_calls]
        entry: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
        if dialect == "vllm":
            entry["logprobs"] = None
            entry["stop_reason"] = None
        choices.append(entry)
    return orjson.dumps(
        {
            "id": plan.id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            "usage": usage(plan, dialect, plan.completion_tokens, parsers=parsers),
        }
    )


def _split_arguments(arguments: str) -> list[str]:
    """Arguments stream in a few fragments, like a decoder emitting tokens."""
    if not arguments:
        return []
    size = max(8, -(-len(arguments) // 3))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _deltas(choice: ChoicePlan, plan: Plan, dialect: str, parsers: bool) -> list[tuple[bytes, int]]:
    """(delta JSON, tokens) for each content-bearing chunk of one choice."""
    dumps = orjson.dumps
    out: list[tuple[bytes, int]] = []
    if dialect == "vllm" and not parsers:
        for piece in _raw_content(choice, plan):
            out.append((dumps({"content": piece}), approx_tokens(piece.encode())))
        return out
    if plan.show_reasoning:
        key = "reasoning" if dialect == "vllm" else "reasoning_content"
        for piece, tokens in zip(choice.reasoning, choice.reasoning_tokens, strict=True):
            out.append((dumps({key: piece}), tokens))
    for piece, tokens in zip(choice.content, choice.content_tokens, strict=True):
        out.append((dumps({"content": piece}), tokens))
    for index, call in enumerate(choice.tool_calls):
        head = {"index": index, "id": call.id, "type": call.type, "function": {"name": call.name, "arguments": ""}}
        out.append((dumps({"tool_calls": [head]}), 1))
        for part in _split_arguments(call.arguments):
            out.append(
                (
                    dumps({"tool_calls": [{"index": index, "function": {"arguments": part}}]}),
                    approx_tokens(part.encode()),
                )
            )
    return out


def render_stream(plan: Plan, dialect: str, parsers: bool = True) -> tuple[list[bytes], list[int]]:
    """All SSE events of a stream, ending with ``data: [DONE]``, and the tokens each one carries.

    With n > 1, chunks of the choices are interleaved step by step, as servers that decode them in
    parallel do.
    """
    vllm = dialect == "vllm"
    head = b"".join(
        (
            b'data: {"id":"',
            plan.id.encode(),
            b'","object":"chat.completion.chunk","created":',
            str(plan.created).encode(),
            b',"model":',
            orjson.dumps(plan.model),
            b',"choices":[',
        )
    )
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n' if vllm else b',"finish_reason":null}]}\n\n'
    per_choice: list[list[tuple[bytes, int]]] = []
    opens: list[bytes] = []
    for index, choice in enumerate(plan.choices):
        opens.append(head + b'{"index":%d,"delta":' % index)
        per_choice.append([(ROLE_DELTA, 0), *_deltas(choice, plan, dialect, parsers)])
    if len(per_choice) == 1:  # the common case, kept to two comprehensions
        first = opens[0]
        events = [first + delta + tail for delta, _ in per_choice[0]]
        tokens = [count for _, count in per_choice[0]]
    else:
        events, tokens = [], []
        for step in range(max(len(d) for d in per_choice)):
            for index, deltas in enumerate(per_choice):
                if step < len(deltas):
                    delta, count = deltas[step]
                    events.append(opens[index] + delta + tail)
                    tokens.append(count)
    for index, choice in enumerate(plan.choices):
        finish = choice.finish_reason
        if vllm:
            if not parsers and finish == "tool_calls":
                finish = "stop"
            events.append(
                b'%s{},"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n' % (opens[index], finish.encode())
            )
        else:
            choice_usage = orjson.dumps(usage(plan, dialect, choice.completion_tokens))
            events.append(
                b'%s{},"finish_reason":"%s","usage":%s}]}\n\n' % (opens[index], finish.encode(), choice_usage)
            )
        tokens.append(0)
    if plan.include_usage:
        total = orjson.dumps(usage(plan, dialect, plan.completion_tokens, both_cached_fields=True, parsers=parsers))
        events.append(head + b'],"usage":' + total + b"}\n\n")
        tokens.append(0)
    events.append(DONE_EVENT)
    tokens.append(0)
    return events, tokens
