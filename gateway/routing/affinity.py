"""Prefix affinity: which upstream recently served which conversation prefix.

A prompt is a chain of elements (the tools, then each message); ``h_i = blake2b(h_{i-1} || json_i)``
over the canonical JSON (sorted keys) of element ``i`` identifies the prefix ending there. After a
request is served, the hash of its whole prompt is stored under ``affinity:<tenant>:<hash>`` with
the upstreams that served it and how many prompt tokens they reported, for that provider's cache
lifetime. The next turn of a tool loop repeats that prompt and appends to it, so one ``get_many``
over its chain finds the longest prefix each upstream holds.

Hashing is for routing only: the bytes forwarded upstream are never re-serialized for it.
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
    return PrefixChain(tuple(hashes), tuple(sizes))


def _key(tenant: str, digest: str) -> str:
    return f"affinity:{tenant}:{digest}"


async def held_prefixes(kv: KeyValueState, tenant: str, chain: PrefixChain, now: float) -> dict[str, int]:
    """For each upstream label: the prompt tokens of the longest prefix of this request it served
    recently (still inside that provider's cache lifetime)."""
    if not chain.hashes:
        return {}
    values = await kv.get_many([_key(tenant, h) for h in chain.hashes])
    held: dict[str, int] = {}
    for value in reversed(values):  # longest prefix first
        if value is None:
            continue
        for label, (tokens, expires) in orjson.loads(value).items():
            if expires > now and label not in held:
                held[label] = int(tokens)
    return held


async def remember(
    kv: KeyValueState, tenant: str, chain: PrefixChain, label: str, prompt_tokens: int, ttl_s: float, now: float
) -> None:
    """Record that ``label`` served this whole prompt (``prompt_tokens`` as it reported them)."""
    if not chain.hashes:
        return
    key = _key(tenant, chain.hashes[-1])
    old = await kv.get(key)
    entries: dict[str, list[float]] = orjson.loads(old) if old else {}
    entries = {k: v for k, v in entries.items() if v[1] > now}
    entries[label] = [prompt_tokens, now + ttl_s]
    longest = max(v[1] for v in entries.values()) - now
    await kv.put(key, orjson.dumps(entries), longest)
