"""Automatic prefix cache of the simulated upstream (Moonshot context caching / vLLM prefix caching).

A prompt is a chain of elements: the tools (if any), then each message, each as canonical JSON.  The
hash chain h_i = hash(h_{i-1}, element_i) identifies the prefix ending at element i, so a request that
repeats an earlier conversation and appends to it finds its longest cached prefix in a few dict
lookups.  `cached_tokens` is the token count of that prefix, which makes a growing tool loop show cache
hits rising turn after turn, as on the real upstreams.

Python's `hash` is enough here: the table lives in one process and a 64-bit collision would only
misreport one cached_tokens number.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .text import approx_tokens


def prefix_chain(model: str, elements: Iterable[bytes]) -> tuple[list[int], list[int]]:
    """Hash chain and cumulative approximate token counts of a prompt's elements, per model."""
    h = hash(model)
    total = 0
    hashes: list[int] = []
    tokens: list[int] = []
    for element in elements:
        h = hash((h, element))
        total += approx_tokens(element)
        hashes.append(h)
        tokens.append(total)
    return hashes, tokens


class PrefixCache:
    """LRU table of prompt-prefix hashes -> (prefix tokens, expiry), bounded to `max_entries`."""

    def __init__(
        self,
        *,
        ttl_s: float,
        min_tokens: int,
        block_tokens: int = 1,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.min_tokens = min_tokens
        self.block_tokens = max(1, block_tokens)
        self.max_entries = max_entries
        self.clock = clock
        self._table: OrderedDict[int, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def clear(self) -> None:
        self._table.clear()

    def lookup_and_store(self, hashes: list[int], tokens: list[int]) -> int:
        """Return the cached tokens for a prompt and remember its prefixes.

        `hashes[i]` identifies the prefix made of elements 0..i and `tokens[i]` is its cumulative
        token count.  Only prefixes of at least `min_tokens` are cached.  Block-based caches (vLLM)
        round down to whole blocks and always recompute the last prompt token.
        """
        if not hashes or tokens[-1] < self.min_tokens:
            return 0
        now = self.clock()
        table = self._table
        cached = 0
        for i in range(len(hashes) - 1, -1, -1):
            if tokens[i] < self.min_tokens:
                break
            entry = table.get(hashes[i])
            if entry is None:
                continue
            if entry[1] <= now:
                del table[hashes[i]]
                continue
            cached = entry[0]
            break
        expires = now + self.ttl_s
        for i in range(len(hashes) - 1, -1, -1):
            if tokens[i] < self.min_tokens:
                break
            h = hashes[i]
            table[h] = (tokens[i], expires)
            table.move_to_end(h)
        while len(table) > self.max_entries:
            table.popitem(last=False)
        if self.block_tokens > 1 and cached:
            cached = min(cached, tokens[-1] - 1) // self.block_tokens * self.block_tokens
        return cached
