"""The record stage of a request's response transforms: it assembles the answer as the client
receives it (content, tool calls per index, finish reasons) and, once the answer is complete, keeps
the original reasoning of every choice that called tools (see ``store.py``), in every reasoning
mode. The conversation's fingerprints are computed only then, and only when a choice called tools:
most answers need none, so most requests hash nothing."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from gateway.reasoning.modes import FIELDS, Turn
from gateway.reasoning.store import ReasoningStore, calls_bytes, calls_key, remember_soon, tail_digests, turn_key
from gateway.transforms.base import Chunk
from gateway.transforms.order import RECORD

log = logging.getLogger("gateway.reasoning")


class TurnRecorder:
    stage: ClassVar[int] = RECORD

    def __init__(
        self,
        turn: Turn,
        *,
        collect_reasoning: bool = False,
        store: ReasoningStore | None = None,
        tenant: str = "",
        prefix: bytes | None = None,
        skeleton: bytes | None = None,
        history: list[Any] | None = None,
        ttl_s: float = 0,
        max_bytes: int = 0,
    ) -> None:
        self.turn = turn
        self.collect_reasoning = collect_reasoning  # no reasoning transform runs before this one
        self.store = store
        self.tenant = tenant
        # the fingerprints of the request's conversation (see store.py), or the conversation (as the
        # upstream got it, before shaping appended anything) to compute them from when needed
        self.prefix = prefix
        self.skeleton = skeleton
        self.history = history if history is not None else []
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.complete = False
        self.skipped = 0  # tool-call turns whose reasoning was too large to keep

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                continue
            record = self.turn.choice(choice.get("index", 0))
            message = choice["message"]
            if self.collect_reasoning:
                self._reasoning(record.reasoning, message)
            if isinstance(message.get("content"), str):
                record.content.append(message["content"])
            for i, call in enumerate(message.get("tool_calls") or ()):
                if isinstance(call, dict):  # a copy: later transforms rename calls for the client
                    function = call.get("function")
                    record.tool_calls[i] = {**call, "function": dict(function)} if isinstance(function, dict) else call
            record.finish_reason = choice.get("finish_reason")
        self._done()

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            record = self.turn.choice(choice.get("index", 0))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if self.collect_reasoning:
                    self._reasoning(record.reasoning, delta)
                if isinstance(delta.get("content"), str):
                    record.content.append(delta["content"])
                for part in delta.get("tool_calls") or ():
                    if isinstance(part, dict):
                        _merge_call(record.tool_calls, part)
            if choice.get("finish_reason") is not None:
                record.finish_reason = choice["finish_reason"]
        return [chunk]

    def finish(self) -> list[Chunk]:
        self._done()
        return []

    @staticmethod
    def _reasoning(into: list[str], holder: dict[str, Any]) -> None:
        for name in FIELDS:
            value = holder.get(name)
            if isinstance(value, str) and value:
                into.append(value)
                return

    def _done(self) -> None:
        if self.complete:
            return
        self.complete = True
        if self.store is None:
            return
        entries = []
        for record in self.turn.choices.values():
            calls = record.calls()
            reasoning = "".join(record.reasoning)
            if not calls or not reasoning:
                continue
            size = len(reasoning.encode("utf-8"))
            if size > self.max_bytes:
                self.skipped += 1
                log.warning(
                    "tenant %s: reasoning of a tool-call turn is %d bytes, over store_max_bytes (%d); not kept, "
                    "the next turn falls back to when_missing",
                    self.tenant,
                    size,
                    self.max_bytes,
                )
                continue
            if self.prefix is None or self.skeleton is None:
                prefix, skeleton = tail_digests(self.history)
                self.prefix = prefix if self.prefix is None else self.prefix
                self.skeleton = skeleton if self.skeleton is None else self.skeleton
            encoded = calls_bytes(calls)
            key = turn_key(self.tenant, self.prefix, encoded)
            entries.append((key, reasoning))
            entries.append((calls_key(self.tenant, self.skeleton, encoded), key))
        if entries:
            remember_soon(self.store, entries, self.ttl_s)


def _merge_call(calls: dict[int, dict[str, Any]], part: dict[str, Any]) -> None:
    """Assemble a streamed tool call from its deltas, as a client SDK does."""
    index = part.get("index", len(calls))
    if not isinstance(index, int):
        return
    call = calls.get(index)
    if call is None:
        call = calls[index] = {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
    if part.get("id"):
        call["id"] = part["id"]
    if part.get("type"):
        call["type"] = part["type"]
    function = part.get("function")
    if isinstance(function, dict):
        if function.get("name"):
            call["function"]["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            call["function"]["arguments"] += arguments
