"""The state interface: what must agree across requests (and, with Redis, across replicas).

Amounts are integer nanodollars so that every backend (including Redis Lua) adds them exactly.
Backends know nothing of tenants or policies: they hold counters under opaque keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    """A counter key and its cap (nanodollars); the reservation must keep spent + reserved <= cap."""

    key: str
    cap: int
    ttl_s: int  # how long the counter outlives its window


@dataclass(frozen=True, slots=True)
class Refusal:
    key: str
    cap: int
    used: int  # spent + reserved at the time of refusal

    @property
    def remaining(self) -> int:
        return max(0, self.cap - self.used)


class BudgetState(ABC):
    @abstractmethod
    async def reserve(self, request_id: str, limits: list[Limit], amount: int) -> Refusal | None:
        """Atomically add ``amount`` to every limit's reserved total if all stay within their caps;
        otherwise change nothing and return the first limit that would overflow. A second call for a
        request id whose reservation is open changes nothing (a retried call must not hold twice)."""

    @abstractmethod
    async def settle(self, request_id: str, actual: int) -> None:
        """Replace the request's reservation by its actual cost (idempotent; unknown ids are no-ops)."""

    @abstractmethod
    async def used(self, key: str) -> int:
        """Spent plus reserved on a counter."""

    @abstractmethod
    async def add_spent(self, key: str, amount: int, ttl_s: int) -> None:
        """Add settled spend directly (seeding from the ledger at start-up)."""

    async def add_spent_once(self, request_id: str, limits: list[Limit], amount: int) -> None:
        """Add a request's settled spend to its counters at most once per request id, however often it
        is retried (spend counted elsewhere during an outage, replayed after a timeout)."""
        for limit in limits:
            await self.add_spent(limit.key, amount, limit.ttl_s)

    async def seed(self, key: str, amount: int, ttl_s: int) -> None:
        """Start a counter from the ledger's spend at start-up. In-process state starts empty with every
        process, so this adds; a shared backend applies it once per counter (the first replica to start
        seeds it, later ones find it seeded)."""
        await self.add_spent(key, amount, ttl_s)

    @abstractmethod
    async def open_reservations(self) -> int:
        """How many reservations are neither settled nor expired (tests assert none leak)."""

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""


class KeyValueState(ABC):
    """Small shared entries with a lifetime: the prefix-affinity table, the reasoning store for tool
    loops, shared upstream statistics and breaker state.

    Values are opaque bytes (callers serialize with orjson). Every entry has a TTL and a backend keeps
    a cap on how many it holds, so memory cannot grow without limit. Keys are namespaced by the
    caller (``affinity:<tenant>:<hash>``, ``reasoning:<tenant>:<hash>``...); backends add the
    deployment's own prefix.
    """

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""

    @abstractmethod
    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store (or replace) a value that expires after ``ttl_s`` seconds."""

    @abstractmethod
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values for several keys in one round trip (None for each miss)."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Forget a key (no-op when absent)."""

    async def put_if_absent(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        """Store ``value`` unless the key holds one; the value the key holds afterwards, so that
        every process agrees on the first one written (None when the state did not answer). In one
        event loop this default is atomic (memory never suspends between the two calls); shared
        backends override it."""
        old = await self.get(key)
        if old is not None:
            return old
        await self.put(key, value, ttl_s)
        return value

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""


class StateUnavailable(Exception):
    """The shared store did not answer in time (refused, timed out, restarting).

    Raised by shared backends only; what a request then gets (503, or local accounting) is the
    caller's choice per concern (``state.fail`` in the config). ``maybe_ran`` is False only when the
    call certainly never reached the store (connection refused); after a timeout it may have run."""

    def __init__(self, message: str, *, maybe_ran: bool = True) -> None:
        super().__init__(message)
        self.maybe_ran = maybe_ran


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One sliding-window counter: at most ``limit`` units (requests or tokens) per ``window_s``;
    a hit adds ``amount``."""

    key: str
    limit: int
    window_s: int
    amount: int


@dataclass(frozen=True, slots=True)
class RateCount:
    """A counter as a hit saw it: the previous and current fixed windows' totals (after the hit when it
    was admitted, before it when refused), how far into the current window it came, and which window."""

    limit: RateLimit
    previous: int
    current: int
    elapsed_s: float
    window: int  # index of the current window: floor(now / window_s)

    @property
    def used(self) -> float:
        """The sliding-window estimate: the previous window weighted by how much of it still overlaps."""
        w = self.limit.window_s
        return self.previous * (w - self.elapsed_s) / w + self.current

    @property
    def remaining(self) -> int:
        return max(0, int(self.limit.limit - self.used))

    @property
    def reset_s(self) -> float:
        """Seconds until the counter is back to its initial state (nothing counted)."""
        w = self.limit.window_s
        if self.current > 0:
            return (w - self.elapsed_s) + w
        return (w - self.elapsed_s) if self.previous > 0 else 0.0

    def wait_s(self, amount: int) -> float | None:
        """Seconds until ``amount`` more fits (0 when it fits now), None when it never can."""
        w, cap = self.limit.window_s, self.limit.limit
        if amount > cap:
            return None
        if self.used + amount <= cap:
            return 0.0
        if self.current + amount <= cap:
            # the previous window's weight must decay enough within this window
            return max(0.0, w * (1 - (cap - self.current - amount) / self.previous) - self.elapsed_s)
        # only in the next window, once this window's total (then the previous one) has decayed enough
        return (w - self.elapsed_s) + max(0.0, w * (1 - (cap - amount) / self.current))


class RateLimitState(ABC):
    """Request and token rate counters (sliding window over two fixed windows).

    Time comes from the caller (``now``, unix seconds) so that every replica and the memory backend
    cut windows the same way."""

    @abstractmethod
    async def hit(self, limits: list[RateLimit], now: float) -> tuple[bool, list[RateCount]]:
        """Atomically add every limit's amount if all stay within their limits; otherwise add nothing.
        Returns whether it was admitted and every counter as the hit saw it."""

    @abstractmethod
    async def adjust(self, key: str, window_s: int, window: int, delta: int) -> None:
        """Add ``delta`` to what window ``window`` counted: a correction (tokens: estimate -> actual), or
        hits counted elsewhere during an outage. Windows older than the sliding window are left alone."""

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""
