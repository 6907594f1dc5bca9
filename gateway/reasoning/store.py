"""The reasoning of tool-call turns, kept server-side so a tool loop can go on without it.

K2 Thinking rejects a tool loop whose assistant tool-call messages come back without their
reasoning (protocols.md §2.1). A client that was shown none cannot send it back, and most agent
frameworks (openai-agents' chat model, langchain-openai, Anthropic loops that drop thinking blocks)
drop it even when they were shown it. So the gateway keeps what it served, for every tenant, under
two keys a later request can recompute from what the client sends back:

    reasoning:<tenant>:<hash of the conversation before the message + its tool calls>
    reasoning:<tenant>:calls:<hash of the user messages and tool-call turns before it + its tool calls>

The first (exact) key holds the reasoning. Tool-call ids alone do not do: Moonshot ids such as
``get_weather:0`` repeat in every turn, and K2 repeats the same arguments too. The second is the
fallback for clients that change the conversation around a turn without changing the turn: a
system prompt rebuilt every step (openai-agents' dynamic instructions, a date in the prompt),
system messages inserted mid-conversation, tool results cleared or shortened. It leaves out system
messages, tool results and answers without tool calls, and holds the first key, so the reasoning is
stored once. Within a tenant two conversations whose user messages and tool calls are the same up
to a turn share its fallback key (the later answer wins); the exact key still tells them apart.

Fingerprints are taken over what identifies a message (role, text, name, tool-call id, tool calls
with arguments as parsed JSON), never the reasoning fields, so they are the same whether or not a
client echoes reasoning, whether it sends ``content`` as None, "" or text parts, and whatever key
order or JSON spacing its SDK uses. Entries live in :class:`~gateway.state.base.KeyValueState`
(memory, or Redis across replicas) with the tenant's TTL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import xxhash

from gateway.state.base import KeyValueState

log = logging.getLogger("gateway.reasoning.store")

REASONING_FIELDS = ("reasoning_content", "reasoning")
DOMAIN = b"kimi-gateway conversation"


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


def calls_bytes(calls: Any) -> bytes:
    """The canonical bytes of a message's tool calls (computed once per turn, used three times)."""
    return orjson.dumps(calls_shape(calls), option=orjson.OPT_SORT_KEYS)


def _head(msg: dict[str, Any], content: str) -> bytes:
    """What identifies a message besides its text, and the text's length, as canonical JSON."""
    return orjson.dumps((msg.get("role"), msg.get("name"), msg.get("tool_call_id"), len(content)))


def message_shape(msg: Any, calls: bytes | None = None) -> bytes:
    """The bytes a message contributes to a fingerprint: its role, name, tool-call id and text (None
    and "" alike, text parts joined), and its tool calls' bytes (``calls`` when the caller has them)."""
    if not isinstance(msg, dict):
        return b"~" + orjson.dumps(msg, option=orjson.OPT_SORT_KEYS)
    content = msg.get("content")
    if not isinstance(content, str):
        content = _text(content)
        if not isinstance(content, str):  # images and other parts: their canonical JSON
            content = orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    tool_calls = msg.get("tool_calls")
    tail = (calls if calls is not None else calls_bytes(tool_calls)) if tool_calls else b""
    return _head(msg, content) + content.encode("utf-8", "surrogatepass") + tail


class Fingerprints:
    """The fingerprints of a conversation, fed one message at a time, in one pass whatever number of
    turns it has: a running hash over every message's shape (``prefix``), and one over the user
    messages and tool-call turns only (``skeleton``). Each shape starts with its own JSON header,
    which gives the text's length, so the stream of shapes has one reading.

    The hash is XXH3-128, not SHA-256: it runs over the whole conversation on every request of a
    tool loop, and SHA-256 cost ~2 µs per KB on a loaded machine here (bench/reasoning_restore.py).
    A key is only ever compared with keys the gateway computed itself and is never shown to a
    client, so nobody can aim a collision at another conversation's key without knowing it."""

    __slots__ = ("_all", "_skeleton")

    def __init__(self) -> None:
        self._all = xxhash.xxh3_128(DOMAIN)
        self._skeleton = xxhash.xxh3_128(DOMAIN)

    def feed(self, msg: Any, calls: bytes | None = None) -> None:
        data = message_shape(msg, calls)
        self._all.update(data)
        if isinstance(msg, dict):
            role = msg.get("role")
            if role == "user" or (role == "assistant" and msg.get("tool_calls")):
                self._skeleton.update(data)

    def prefix(self) -> bytes:
        """The fingerprint of everything fed so far."""
        return self._all.digest()

    def skeleton(self) -> bytes:
        """The fingerprint of the user messages and tool-call turns fed so far."""
        return self._skeleton.digest()


def prefix_digests(messages: list[Any]) -> list[bytes]:
    """``out[i]`` fingerprints ``messages[:i]`` (so ``out[-1]`` is the whole conversation)."""
    return conversation_digests(messages)[0]


def conversation_digests(messages: list[Any], upto: int | None = None) -> tuple[list[bytes], list[bytes]]:
    """The prefix and skeleton fingerprints of ``messages[:i]`` for ``i`` in ``0..upto`` (default:
    the whole conversation)."""
    stop = len(messages) if upto is None else upto
    fp = Fingerprints()
    prefixes = [fp.prefix()]
    skeletons = [fp.skeleton()]
    for msg in messages[:stop]:
        fp.feed(msg)
        prefixes.append(fp.prefix())
        skeletons.append(fp.skeleton())
    return prefixes, skeletons


def tail_digests(messages: list[Any]) -> tuple[bytes, bytes]:
    """(prefix, skeleton) of the whole conversation."""
    fp = Fingerprints()
    for msg in messages:
        fp.feed(msg)
    return fp.prefix(), fp.skeleton()


def _encoded(calls: Any) -> bytes:
    return calls if isinstance(calls, bytes) else calls_bytes(calls)


def turn_key(tenant: str, prefix: bytes, calls: Any) -> str:
    """The store key of an assistant tool-call message (``calls``: its tool calls, or their
    :func:`calls_bytes`) that follows the conversation ``prefix``."""
    return f"reasoning:{tenant}:{xxhash.xxh3_128_hexdigest(prefix + _encoded(calls))}"


def calls_key(tenant: str, skeleton: bytes, calls: Any) -> str:
    """The fallback key of the same message: the conversation's user messages and tool-call turns
    before it (``skeleton``), and its tool calls."""
    return f"reasoning:{tenant}:calls:{xxhash.xxh3_128_hexdigest(skeleton + _encoded(calls))}"


class ReasoningStore:
    """Reads and writes kept reasoning (UTF-8 text) through the state interface."""

    def __init__(self, kv: KeyValueState) -> None:
        self.kv = kv

    async def recall(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        values = await self.kv.get_many(keys)
        return [None if v is None else v.decode("utf-8", "replace") for v in values]

    async def recall_turns(self, keys: list[tuple[str, str]]) -> list[str | None]:
        """The reasoning of each (exact key, fallback key) pair: the exact entry, else the one the
        fallback points at. One round trip, a second only for turns found by their fallback."""
        if not keys:
            return []
        values = await self.kv.get_many([k for pair in keys for k in pair])
        found: list[str | None] = []
        pointers: dict[int, str] = {}
        for i in range(len(keys)):
            exact, pointer = values[2 * i], values[2 * i + 1]
            found.append(None if exact is None else exact.decode("utf-8", "replace"))
            if exact is None and pointer is not None:
                pointers[i] = pointer.decode("utf-8", "replace")
        if pointers:
            followed = await self.kv.get_many(list(pointers.values()))
            for i, value in zip(pointers, followed, strict=True):
                if value is not None:
                    found[i] = value.decode("utf-8", "replace")
        return found

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
