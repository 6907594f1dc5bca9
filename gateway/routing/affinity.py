"""Prefix affinity: which upstream recently served which conversation prefix.

A prompt is a chain of elements (the tools, then each message); ``h_i = blake2b(h_{i-1} || json_i)``
over the canonical JSON (sorted keys) of element ``i`` identifies the prefix ending there. After a
request is served, the hash of its whole prompt is stored under ``affinity:<tenant>:<hash>`` with
the upstreams that served it and how many prompt tokens they reported, for that provider's cache
lifetime. The next turn of a tool loop repeats that prompt and appends to it, so one ``get_many``
over its chain finds the longest prefix each upstream holds.

Hashing is for routing only: the bytes forwarded upstream are never re-serialized for it.

A request that names its conversation with ``prompt_cache_key`` (the Responses API's and OpenAI's
field; Codex CLI sends its session id) is also remembered under ``affinity:<tenant>:key:<hash>``:
that entry counts as the shortest prefix, so a conversation whose history changed (compacted,
edited) still finds the upstream that served it last.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.state.base import KeyValueState

_OPTS = orjson.OPT_SORT_KEYS
# rough bytes per token of JSON chat content, for prefixes no upstream has reported on yet
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class PrefixChain:
    hashes: tuple[str, ...]  # hex digests, one per element
    sizes: tuple[int, ...]  # cumulative canonical bytes up to each element
    hint: str | None = None  # digest of the request's prompt_cache_key


def prefix_chain(body: dict[str, Any]) -> PrefixChain:
    hashes: list[str] = []
    sizes: list[int] = []
    digest = b""
    total = 0
    tools = body.get("tools")
    elements: list[Any] = [tools] if tools else []
    messages = body.get("messages")
    if isinstance(messages, list):
        elements.extend(messages)
    for element in elements:
        data = orjson.dumps(element, option=_OPTS)
        total += len(data)
        digest = hashlib.blake2b(digest + data, digest_size=16).digest()
        hashes.append(digest.hex())
        sizes.append(total)
    key = body.get("prompt_cache_key")
    hint = hashlib.blake2b(key.encode(), digest_size=16).hexdigest() if isinstance(key, str) and key else None
    return PrefixChain(tuple(hashes), tuple(sizes), hint)


def _key(tenant: str, digest: str) -> str:
    return f"affinity:{tenant}:{digest}"


def _hint_key(tenant: str, digest: str) -> str:
    return f"affinity:{tenant}:key:{digest}"


async def held_prefixes(
    kv: KeyValueState, tenant: str, chain: PrefixChain, now: float, sizes: dict[str, int] | None = None
) -> dict[str, int]:
    """For each upstream label: the prompt tokens of the longest prefix of this request it served
    recently (still inside that provider's cache lifetime). ``sizes``, when given, gets each label's
    prefix length in canonical bytes (a key pool bounds the rest of the prompt from it)."""
    if not chain.hashes:
        return {}
    keys = [_key(tenant, h) for h in chain.hashes]
    values = await kv.get_many(keys if chain.hint is None else [_hint_key(tenant, chain.hint), *keys])
    offset = len(values) - len(chain.hashes)  # the prompt_cache_key entry comes first, with no size
    held: dict[str, int] = {}
    for i in range(len(values) - 1, -1, -1):  # longest prefix first, the prompt_cache_key entry last
        value = values[i]
        if value is None:
            continue
        for label, (tokens, expires) in orjson.loads(value).items():
            if expires > now and label not in held:
                held[label] = int(tokens)
                if sizes is not None and i >= offset:
                    sizes[label] = chain.sizes[i - offset]
    return held


async def remember(
    kv: KeyValueState, tenant: str, chain: PrefixChain, label: str, prompt_tokens: int, ttl_s: float, now: float
) -> None:
    """Record that ``label`` served this whole prompt (``prompt_tokens`` as it reported them)."""
    if not chain.hashes:
        return
    keys = [_key(tenant, chain.hashes[-1])]
    if chain.hint is not None:
        keys.append(_hint_key(tenant, chain.hint))
    for key in keys:
        old = await kv.get(key)
        entries: dict[str, list[float]] = orjson.loads(old) if old else {}
        entries = {k: v for k, v in entries.items() if v[1] > now}
        entries[label] = [prompt_tokens, now + ttl_s]
        longest = max(v[1] for v in entries.values()) - now
        await kv.put(key, orjson.dumps(entries), longest)
