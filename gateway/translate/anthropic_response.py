"""chat/completions answers → Anthropic Messages answers (protocols.md §6.4).

Reasoning (``reasoning_content``, or vLLM's ``reasoning``) becomes a ``thinking`` block with an
empty signature: with an empty text too for ``display: "omitted"``, and none at all when the
request turned thinking off (``display`` is what ``anthropic_controls.thinking_controls``
decided). Text becomes a ``text`` block, tool calls ``tool_use`` blocks with parsed input. Usage:
``input_tokens`` = prompt - cached, ``cache_read_input_tokens`` = cached, ``output_tokens`` =
completion. :class:`AnthropicStream` turns the chat/completions SSE the pipeline relays into
Anthropic's event sequence (message_start, ping, content_block_start/delta/stop, message_delta with
usage and stop_reason, message_stop); an error event stays an error event. A request with
``context_management`` gets the edits the gateway applied as ``context_management.applied_edits``
(on the message, or on the stream's ``message_delta``).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering.stream import _data, _events
from gateway.upstreams.sse import chunk_of
from gateway.upstreams.usage import Usage, parse_usage, usage_of_response

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish: Any) -> str | None:
    if finish is None:
        return None
    return STOP_REASONS.get(finish, "end_turn")


def anthropic_usage(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    return {
        "input_tokens": max(0, u.prompt_tokens - u.cached_tokens),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def _reasoning(holder: dict[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = holder.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's ``input`` is."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_message(
    response: dict[str, Any],
    model: str,
    message_id: str,
    display: str = "summarized",
    context_management: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole chat.completion → an Anthropic ``message``."""
    content: list[dict[str, Any]] = []
    finish = None
    choices = response.get("choices") or []
    choice: dict[str, Any] = choices[0] if choices and isinstance(choices[0], dict) else {}
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    thinking = _reasoning(message)
    if thinking and display != "hidden":
        shown = "" if display == "omitted" else thinking
        content.append({"type": "thinking", "thinking": shown, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {} if isinstance(call, dict) else {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": tool_input(function.get("arguments")),
            }
        )
    finish = choice.get("finish_reason")
    out: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish) or "end_turn",
        "stop_sequence": None,
        "usage": anthropic_usage(usage_of_response(response)),
    }
    if context_management is not None:
        out["context_management"] = context_management
    return out


def event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


class AnthropicStream:
    """chat/completions SSE blocks in, Anthropic SSE bytes out (choice 0; Anthropic has no ``n``)."""

    __slots__ = (
        "_block",
        "_context",
        "_display",
        "_done",
        "_id",
        "_index",
        "_model",
        "_rest",
        "_started",
        "_stop",
        "_tools",
        "_usage",
    )

    def __init__(
        self,
        model: str,
        message_id: str,
        display: str = "summarized",
        context_management: dict[str, Any] | None = None,
    ) -> None:
        self._display = display
        self._context = context_management
        self._model = model
        self._id = message_id
        self._started = False
        self._done = False
        self._block: str | None = None  # kind of the open content block
        self._index = -1  # Anthropic index of the open block
        self._tools: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._stop: str | None = None
        self._usage: Usage | None = None
        self._rest = b""

    def feed(self, block: bytes) -> bytes:
        data = self._rest + block
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._rest = data
            return b""
        self._rest = data[cut + 2 :]
        out: list[bytes] = []
        for ev in _events(data[: cut + 2]):
            self._event(_data(ev), out)
        return b"".join(out)

    def close(self) -> bytes:
        """The end of the relayed stream: finish the message if nothing else did."""
        out: list[bytes] = []
        if self._rest.strip():
            self._event(_data(self._rest), out)
        self._rest = b""
        if not self._done:
            self._finish(out)
        return b"".join(out)

    def _start(self, out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(event("message_start", {"type": "message_start", "message": message}))
        out.append(event("ping", {"type": "ping"}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._block = None

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close_block(out)
        self._index += 1
        self._block = kind
        out.append(
            event("content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block})
        )

    def _delta(self, index: int, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def _event(self, data: bytes, out: list[bytes]) -> None:
        if self._done or not data:
            return
        if data == b"[DONE]":
            self._finish(out)
            return
        chunk = chunk_of(data)
        if chunk is None:
            return
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            kind = "timeout_error" if isinstance(error, dict) and error.get("type") == "timeout_error" else "api_error"
            out.append(event("error", {"type": "error", "error": {"type": kind, "message": str(message)}}))
            self._done = True
            return
        self._start(out)
        found = parse_usage(chunk.get("usage"))
        if found is not None:
            self._usage = found
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            thinking = _reasoning(delta)
            if thinking and self._display != "hidden":
                if self._block != "thinking":
                    self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                if self._display != "omitted":
                    self._delta(self._index, {"type": "thinking_delta", "thinking": thinking}, out)
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block != "text":
                    self._open("text", {"type": "text", "text": ""}, out)
                self._delta(self._index, {"type": "text_delta", "text": text}, out)
            for frag in delta.get("tool_calls") or ():
                if isinstance(frag, dict):
                    self._tool(frag, out)
        if choice.get("finish_reason") is not None:
            self._stop = stop_reason(choice["finish_reason"])
        found = parse_usage(choice.get("usage"))  # Moonshot: usage inside the last choice
        if found is not None and self._usage is None:
            self._usage = found

    def _tool(self, frag: dict[str, Any], out: list[bytes]) -> None:
        index = frag.get("index", 0)
        found = frag.get("function")
        function: dict[str, Any] = found if isinstance(found, dict) else {}
        if index not in self._tools:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": frag.get("id") or "",
                "name": function.get("name") or "",
                "input": {},
            }
            self._open("tool_use", block, out)
            self._tools[index] = self._index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._delta(self._tools[index], {"type": "input_json_delta", "partial_json": arguments}, out)

    def _finish(self, out: list[bytes]) -> None:
        self._start(out)
        self._close_block(out)
        self._done = True
        delta = {"stop_reason": self._stop or "end_turn", "stop_sequence": None}
        payload: dict[str, Any] = {"type": "message_delta", "delta": delta, "usage": anthropic_usage(self._usage)}
        if self._context is not None:
            payload["context_management"] = self._context
        out.append(event("message_delta", payload))
        out.append(event("message_stop", {"type": "message_stop"}))
