"""The reasoning of tool-call turns, kept server-side for tenants whose clients never see it.

K2 Thinking rejects a tool loop whose assistant tool-call messages come back without their
reasoning (protocols.md §2.1), and a client that was shown none cannot send it back. So the gateway
keeps it, under a key a later request can recompute from what the client sends back:

    reasoning:<tenant>:<sha256(conversation before the message + the message's tool calls)>

Tool-call ids alone do not do: Moonshot ids such as ``get_weather:0`` repeat in every turn, and
the simulator (like K2) repeats the same arguments too. The conversation fingerprint is taken over
what identifies a message (role, text, name, tool-call id, tool calls), never the reasoning fields,
so it is the same whether or not a client echoes reasoning, and whatever key order its SDK uses.
Entries live in :class:`~gateway.state.base.KeyValueState` (memory, or Redis across replicas) with
the tenant's TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import orjson

from gateway.state.base import KeyValueState

log = logging.getLogger("gateway.reasoning.store")

REASONING_FIELDS = ("reasoning_content", "reasoning")
EMPTY = hashlib.sha256(b"kimi-gateway conversation").digest()


def _text(content: Any) -> Any:
    """Message content as the fingerprint sees it: None and "" alike, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    return content


def _arguments(value: Any) -> Any:
    """Arguments as a value, not as text: the Anthropic front end hands clients parsed ``input``
    and serializes it again on the way back, without the upstream's whitespace (``{"a": 1}`` comes
    back as ``{"a":1}``); keys are sorted when the shape is hashed."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def calls_shape(calls: Any) -> list[Any]:
    """What identifies a message's tool calls: id, name and arguments of each, in order."""
    out: list[Any] = []
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            out.append(call)
            continue
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        out.append([call.get("id"), function.get("name"), _arguments(function.get("arguments"))])
    return out


def message_digest(msg: Any) -> bytes:
    if not isinstance(msg, dict):
        shape: Any = msg
    else:
        shape = [
            msg.get("role"),
            _text(msg.get("content")),
            msg.get("name"),
            msg.get("tool_call_id"),
            calls_shape(msg.get("tool_calls")) if msg.get("tool_calls") else None,
        ]
    return hashlib.sha256(orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)).digest()


def prefix_digests(messages: list[Any]) -> list[bytes]:
    """``out[i]`` fingerprints ``messages[:i]`` (so ``out[-1]`` is the whole conversation)."""
    out = [EMPTY]
    for msg in messages:
        out.append(hashlib.sha256(out[-1] + message_digest(msg)).digest())
    return out


def turn_key(tenant: str, prefix: bytes, calls: Any) -> str:
    """The store key of an assistant tool-call message that follows the conversation ``prefix``."""
    digest = hashlib.sha256(prefix + orjson.dumps(calls_shape(calls), option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"reasoning:{tenant}:{digest}"


class ReasoningStore:
    """Reads and writes kept reasoning (UTF-8 text) through the state interface."""

    def __init__(self, kv: KeyValueState) -> None:
        self.kv = kv

    async def recall(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        values = await self.kv.get_many(keys)
        return [None if v is None else v.decode("utf-8", "replace") for v in values]

    async def remember(self, entries: list[tuple[str, str]], ttl_s: float) -> None:
        for key, reasoning in entries:
            await self.kv.put(key, reasoning.encode("utf-8"), ttl_s)


_WRITES: set[asyncio.Task[None]] = set()


def remember_soon(store: ReasoningStore, entries: list[tuple[str, str]], ttl_s: float) -> None:
    """Start storing at once without holding up the response; the write is issued before the
    client can send its next turn, so that turn finds it."""

    async def write() -> None:
        try:
            await store.remember(entries, ttl_s)
        except Exception:  # the answer already went out; the next turn falls back to a placeholder
            log.exception("could not keep the reasoning of %d tool-call turns", len(entries))

    task = asyncio.get_running_loop().create_task(write())
    _WRITES.add(task)
    task.add_done_callback(_WRITES.discard)


async def writes_done() -> None:
    """Wait for the writes in flight (shutdown and tests)."""
    while _WRITES:
        await asyncio.gather(*list(_WRITES), return_exceptions=True)
