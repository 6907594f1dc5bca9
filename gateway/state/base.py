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
        otherwise change nothing and return the first limit that would overflow."""

    @abstractmethod
    async def settle(self, request_id: str, actual: int) -> None:
        """Replace the request's reservation by its actual cost (idempotent; unknown ids are no-ops)."""

    @abstractmethod
    async def used(self, key: str) -> int:
        """Spent plus reserved on a counter."""

    @abstractmethod
    async def add_spent(self, key: str, amount: int, ttl_s: int) -> None:
        """Add settled spend directly (seeding from the ledger at start-up)."""

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

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""
