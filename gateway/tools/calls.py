"""Tool calls out: repair the defects upstreams and proxies put into tool calls.

Every call leaves with an ``id`` (the upstream's own, never rewritten: K2 is trained on
``functions.NAME:IDX`` and degrades when ids change, protocols.md §2.2; minted as
``functions.NAME:IDX`` only when missing), ``type: "function"``, and ``arguments`` as a JSON string
(objects serialized, empty → ``"{}"``). Streamed deltas come out well-formed per ``index``: an
index on every fragment, ``id``/``type``/``name`` only on a call's first fragment (OpenAI's SDK
concatenates repeated strings), and a turn that made calls ends with ``finish_reason: tool_calls``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from gateway.transforms.base import Chunk
from gateway.transforms.order import REPAIR

BUILTIN = "builtin_function"


def mint_id(name: Any, index: int) -> str:
    return f"functions.{name if isinstance(name, str) and name else 'call'}:{index}"


def arguments_text(value: Any) -> str:
    """Arguments as the JSON string OpenAI's wire format carries."""
    if isinstance(value, str):
        return value if value.strip() else "{}"
    if value is None:
        return "{}"
    return orjson.dumps(value).decode()


def repair_call(call: dict[str, Any], index: int) -> None:
    """One complete (non-stream) tool call, in place."""
    function = call.get("function")
    if not isinstance(function, dict):
        function = call["function"] = {}
    if not isinstance(call.get("id"), str) or not call["id"]:
        call["id"] = mint_id(function.get("name"), index)
    if call.get("type") not in ("function", BUILTIN):
        call["type"] = "function"
    function["arguments"] = arguments_text(function.get("arguments"))


class ToolCallRepair:
    """Response transform for requests that declared tools."""

    stage: ClassVar[int] = REPAIR

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        # per choice index: tool index -> [id, name], and the fragments' ids seen -> tool index
        self._streams: dict[int, _ChoiceCalls] = {}

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            calls = message.get("tool_calls")
            if not isinstance(calls, list) or not calls:
                continue
            for i, call in enumerate(calls):
                if isinstance(call, dict):
                    repair_call(call, i)
            if choice.get("finish_reason") == "stop":
                choice["finish_reason"] = "tool_calls"

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            calls = delta.get("tool_calls")
            state = self._streams.get(index)
            if isinstance(calls, list) and calls:
                if state is None:
                    state = self._streams[index] = _ChoiceCalls()
                delta["tool_calls"] = [state.fragment(c) for c in calls if isinstance(c, dict)]
            if state is not None and state.calls and choice.get("finish_reason") is not None:
                if choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
                empty = state.without_arguments()
                if empty:  # calls that never got arguments get "{}"
                    delta["tool_calls"] = [*(delta.get("tool_calls") or ()), *empty]
        return [chunk]

    def finish(self) -> list[Chunk]:
        return []


class _ChoiceCalls:
    """The tool calls of one streamed choice, by index."""

    __slots__ = ("by_id", "calls", "filled", "last")

    def __init__(self) -> None:
        self.calls: dict[int, str] = {}  # tool index -> id sent
        self.by_id: dict[str, int] = {}
        self.filled: set[int] = set()  # indexes that got non-empty arguments
        self.last = -1

    def without_arguments(self) -> list[dict[str, Any]]:
        missing = [i for i in self.calls if i not in self.filled]
        self.filled.update(missing)
        return [{"index": i, "function": {"arguments": "{}"}} for i in missing]

    def _index_of(self, fragment: dict[str, Any]) -> int:
        index = fragment.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            return index
        call_id = fragment.get("id")
        if isinstance(call_id, str) and call_id:
            if call_id in self.by_id:
                return self.by_id[call_id]
            return max(self.calls, default=-1) + 1
        function = fragment.get("function")
        if isinstance(function, dict) and function.get("name") and self.last in self.calls:
            return max(self.calls) + 1  # a new name without an id: a new call
        return self.last if self.last >= 0 else 0

    def fragment(self, fragment: dict[str, Any]) -> dict[str, Any]:
        index = self._index_of(fragment)
        self.last = index
        function = fragment.get("function")
        if not isinstance(function, dict):
            function = {}
        out: dict[str, Any] = {"index": index}
        if index not in self.calls:  # a call's first fragment: id, type and name, once
            call_id = fragment.get("id")
            if not isinstance(call_id, str) or not call_id:
                call_id = mint_id(function.get("name"), index)
            self.calls[index] = call_id
            self.by_id[call_id] = index
            out["id"] = call_id
            out["type"] = fragment["type"] if fragment.get("type") in ("function", BUILTIN) else "function"
            head: dict[str, Any] = {"name": function.get("name") or ""}
            args = function.get("arguments")
            head["arguments"] = self._arguments(index, args)
            out["function"] = head
            return out
        args = function.get("arguments")
        if args is not None:
            out["function"] = {"arguments": self._arguments(index, args)}
        return out

    def _arguments(self, index: int, args: Any) -> str:
        if args is None or args == "":
            return ""
        text = args if isinstance(args, str) else arguments_text(args)
        self.filled.add(index)
        return text
