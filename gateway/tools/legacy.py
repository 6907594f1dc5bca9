"""Answers for clients that sent legacy ``functions``: ``function_call`` instead of ``tool_calls``.

The request went upstream as ``tools`` (Moonshot refuses ``functions``); the answer comes back in the
shape the client asked in: ``message.function_call`` and ``finish_reason: "function_call"``. Legacy
clients take one call per turn, so only the first call (tool index 0) is kept.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gateway.transforms.base import Chunk
from gateway.transforms.order import LEGACY


class LegacyFunctionCall:
    """Response transform: ``tool_calls`` → ``function_call``."""

    stage: ClassVar[int] = LEGACY

    __slots__ = ()

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            calls = message.pop("tool_calls", None)
            if isinstance(calls, list) and calls and isinstance(calls[0], dict):
                function = calls[0].get("function") or {}
                message["function_call"] = {"name": function.get("name"), "arguments": function.get("arguments", "{}")}
            if choice.get("finish_reason") == "tool_calls":
                choice["finish_reason"] = "function_call"

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and "tool_calls" in delta:
                calls = delta.pop("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if not isinstance(call, dict) or call.get("index", 0) != 0:
                        continue
                    function = call.get("function") or {}
                    out = delta.setdefault("function_call", {})
                    if "name" in function:
                        out["name"] = function["name"]
                    out["arguments"] = out.get("arguments", "") + (function.get("arguments") or "")
            if choice.get("finish_reason") == "tool_calls":
                choice["finish_reason"] = "function_call"
        return [chunk]

    def finish(self) -> list[Chunk]:
        return []
