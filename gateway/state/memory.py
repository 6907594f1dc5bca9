"""In-process state: the default for one process.

Every method runs without an ``await`` between its check and its update, so on one event loop each
is atomic without locks. Counters expire after their window's TTL so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from gateway.state.base import BudgetState, KeyValueState, Limit, RateCount, RateLimit, RateLimitState, Refusal


class MemoryBudgetState(BudgetState):
    def __init__(self, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._expires: dict[str, float] = {}
        self._reservations: dict[str, tuple[tuple[str, ...], int]] = {}
        self._applied: OrderedDict[str, None] = OrderedDict()  # add_spent_once ids, the latest 100,000

    def _touch(self, key: str, ttl_s: int) -> None:
        self._expires[key] = max(self._expires.get(key, 0.0), self._clock() + ttl_s)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, t in self._expires.items() if t < now]:
            self._expires.pop(key, None)
            self._spent.pop(key, None)
            self._reserved.pop(key, None)

    async def reserve(self, request_id: str, limits: list[Limit], amount: int) -> Refusal | None:
        if request_id in self._reservations:  # already held (a retried call)
            return None
        if len(self._expires) > 4096:
            self._expire()
        for limit in limits:
            used = self._spent.get(limit.key, 0) + self._reserved.get(limit.key, 0)
            if used + amount > limit.cap:
                return Refusal(limit.key, limit.cap, used)
        for limit in limits:
            self._reserved[limit.key] = self._reserved.get(limit.key, 0) + amount
            self._touch(limit.key, limit.ttl_s)
        self._reservations[request_id] = (tuple(limit.key for limit in limits), amount)
        return None

    async def settle(self, request_id: str, actual: int) -> None:
        entry = self._reservations.pop(request_id, None)
        if entry is None:
            return
        keys, amount = entry
        for key in keys:
            self._reserved[key] = max(0, self._reserved.get(key, 0) - amount)
            self._spent[key] = self._spent.get(key, 0) + actual

    async def used(self, key: str) -> int:
        return self._spent.get(key, 0) + self._reserved.get(key, 0)

    async def add_spent(self, key: str, amount: int, ttl_s: int) -> None:
        self._spent[key] = self._spent.get(key, 0) + amount
        self._touch(key, ttl_s)

    async def add_spent_once(self, request_id: str, limits: list[Limit], amount: int) -> None:
        if request_id in self._applied:
            return
        self._applied[request_id] = None
        if len(self._applied) > 100_000:
            self._applied.popitem(last=False)
        for limit in limits:
            await self.add_spent(limit.key, amount, limit.ttl_s)

    async def open_reservations(self) -> int:
        return len(self._reservations)


class MemoryKeyValueState(KeyValueState):
    """A TTL'd LRU dict: the least recently used entries go first once ``max_entries`` is reached."""

    def __init__(  # type: ignore[no-untyped-def]
        self, max_entries: int = 100_000, clock=time.monotonic, max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self._max_bytes = max_bytes  # values can be large (kept reasoning): bound their total as well
        self._bytes = 0
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < self._clock():
            del self._items[key]
            self._bytes -= len(item[1])
            return None
        self._items.move_to_end(key)
        return item[1]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        old = self._items.get(key)
        if old is not None:
            self._bytes -= len(old[1])
        self._items[key] = (self._clock() + ttl_s, value)
        self._bytes += len(value)
        self._items.move_to_end(key)
        while len(self._items) > self._max or (self._bytes > self._max_bytes and len(self._items) > 1):
            self._bytes -= len(self._items.popitem(last=False)[1][1])

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def delete(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1])

    def __len__(self) -> int:
        return len(self._items)


class MemoryRateLimitState(RateLimitState):
    """Sliding-window counters in a dict: per key, [window index, previous total, current total]."""

    def __init__(self) -> None:
        self._counters: dict[str, list[int]] = {}
        self._windows: dict[str, int] = {}  # key -> window_s, to drop stale counters

    @staticmethod
    def _roll(entry: list[int], idx: int) -> tuple[int, int]:
        w, current, previous = entry
        if w == idx:
            return previous, current
        if w == idx - 1:
            return current, 0
        return 0, 0

    def _drop_stale(self, now: float) -> None:
        for key in [k for k, e in self._counters.items() if e[0] < int(now // self._windows[k]) - 1]:
            del self._counters[key]
            del self._windows[key]

    async def hit(self, limits: list[RateLimit], now: float) -> tuple[bool, list[RateCount]]:
        if len(self._counters) > 4096:
            self._drop_stale(now)
        counts: list[RateCount] = []
        allowed = True
        for limit in limits:
            idx = int(now // limit.window_s)
            previous, current = self._roll(self._counters.get(limit.key, [idx, 0, 0]), idx)
            count = RateCount(limit, previous, current, now - idx * limit.window_s, idx)
            if count.used + limit.amount > limit.limit:
                allowed = False
            counts.append(count)
        if not allowed:
            return False, counts
        after = []
        for count in counts:
            limit = count.limit
            self._counters[limit.key] = [count.window, count.current + limit.amount, count.previous]
            self._windows[limit.key] = limit.window_s
            after.append(RateCount(limit, count.previous, count.current + limit.amount, count.elapsed_s, count.window))
        return True, after

    async def adjust(self, key: str, window_s: int, window: int, delta: int) -> None:
        w, current, previous = self._counters.get(key, [-1, 0, 0])
        if w == window:
            current += delta
        elif w == window + 1:
            previous += delta
        elif w == window - 1:
            w, previous, current = window, current, delta
        elif w < window - 1:
            w, previous, current = window, 0, delta
        else:
            return
        self._counters[key] = [w, max(0, current), max(0, previous)]
        self._windows[key] = window_s
