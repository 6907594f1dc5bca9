"""Upstream statistics and circuit breakers shared by every replica of a deployment.

Each replica routes from its own local snapshot (no network on the request path) and, about once a
second, sends what it observed since its last exchange and gets back the deployment's merged view.
The exchange is the only shared operation, so it is the interface here; the memory implementation
serves several routers in one process (and the tests), the Redis one (``redis_stats``) a deployment.

Merging: an exponentially weighted average that ``n`` new samples with mean ``m`` reach from ``v``
is taken as ``v + (1 - (1 - alpha)^n) (m - v)`` (exact when the samples are equal), and the first
samples of a value replace whatever prior a replica started from. Breakers: consecutive failures add
up across replicas, a success anywhere after the breaker opened closes it, and a breaker a replica
opened on its own view opens for every replica (it is published at once, not on the next tick).
Times are wall-clock seconds here (replicas do not share a monotonic clock), so replicas' clocks
must agree to well within a breaker cooldown (NTP does); each replica turns them back into its own
monotonic time.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

# shared statistics outlive a quiet spell this long after their last observation, then expire
STATS_TTL_S = 3600.0


@dataclass(slots=True)
class Observed:
    """What one replica saw of one candidate since its last exchange."""

    samples: int = 0  # served requests whose speed was observed
    ttft_n: int = 0
    ttft_sum: float = 0.0
    tps_n: int = 0
    tps_sum: float = 0.0
    cache_n: int = 0
    cache_sum: float = 0.0
    failures: int = 0  # consecutive failures after ``success_at`` (all of them when no success)
    success_at: float = 0.0  # wall time of the last success in the interval (0: none)
    opened: bool = False  # this replica opened the breaker (after its last success)

    def then(self, later: Observed) -> Observed:
        """This interval followed by ``later`` (an exchange that failed is retried with what came after)."""
        out = Observed(
            self.samples + later.samples,
            self.ttft_n + later.ttft_n,
            self.ttft_sum + later.ttft_sum,
            self.tps_n + later.tps_n,
            self.tps_sum + later.tps_sum,
            self.cache_n + later.cache_n,
            self.cache_sum + later.cache_sum,
        )
        if later.success_at:
            out.failures, out.success_at, out.opened = later.failures, later.success_at, later.opened
        else:
            out.failures = self.failures + later.failures
            out.success_at, out.opened = self.success_at, self.opened or later.opened
        return out


@dataclass(frozen=True, slots=True)
class SharedStat:
    """The deployment's view of one candidate (None: no replica has observed that value yet)."""

    ttft_s: float | None
    tokens_per_s: float | None
    samples: int
    hit_rate: float | None
    cache_samples: int
    consecutive_failures: int
    open_until: float  # wall time; 0 when closed


@dataclass(slots=True)
class Completions:
    """Completion token counts a replica saw for one tenant since its last exchange."""

    n: int = 0
    total: float = 0.0

    def then(self, later: Completions) -> Completions:
        return Completions(self.n + later.n, self.total + later.total)


@dataclass(frozen=True, slots=True)
class Rules:
    """How observations merge (the routing config; every replica of a deployment has the same)."""

    alpha: float  # EWMA weight of a new sample
    breaker_failures: int  # consecutive failures that open a breaker
    cooldown_s: float  # how long an open breaker skips its candidate


def fold(old: float | None, old_n: int, n: int, total: float, alpha: float) -> float | None:
    """The average after ``n`` samples summing to ``total`` (see the module docstring)."""
    if n <= 0:
        return old
    mean = total / n
    if old is None or old_n <= 0:
        return mean
    return old + (1 - (1 - alpha) ** n) * (mean - old)


class StatsExchange(ABC):
    """Where replicas pool their observations."""

    @abstractmethod
    async def exchange(
        self,
        rules: Rules,
        observed: dict[str, Observed],
        completions: dict[str, Completions],
        tenants: list[str],
        now: float,
    ) -> tuple[dict[str, SharedStat], dict[str, float]]:
        """Add this replica's observations; return every candidate the deployment has statistics for,
        and the completion average of each tenant in ``tenants`` that has one. Raises
        :class:`gateway.state.base.StateUnavailable` when the store does not answer."""

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""


@dataclass(slots=True)
class _Entry:
    ttft: float | None = None
    ttft_n: int = 0
    tps: float | None = None
    tps_n: int = 0
    samples: int = 0
    hit: float | None = None
    cache_n: int = 0
    failures: int = 0
    open_until: float = 0.0
    opened_at: float = 0.0
    expires: float = 0.0


class MemoryStatsExchange(StatsExchange):
    """The exchange within one process (the same merge as the Redis script, entry for entry)."""

    def __init__(self, ttl_s: float = STATS_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._labels: dict[str, _Entry] = {}
        self._tenants: dict[str, tuple[float, int, float]] = {}  # average, samples, expires

    async def exchange(
        self,
        rules: Rules,
        observed: dict[str, Observed],
        completions: dict[str, Completions],
        tenants: list[str],
        now: float,
    ) -> tuple[dict[str, SharedStat], dict[str, float]]:
        expires = time.monotonic() + self.ttl_s
        a = rules.alpha
        for label, o in observed.items():
            e = self._live(label) or _Entry()
            e.ttft, e.ttft_n = fold(e.ttft, e.ttft_n, o.ttft_n, o.ttft_sum, a), e.ttft_n + o.ttft_n
            e.tps, e.tps_n = fold(e.tps, e.tps_n, o.tps_n, o.tps_sum, a), e.tps_n + o.tps_n
            e.hit, e.cache_n = fold(e.hit, e.cache_n, o.cache_n, o.cache_sum, a), e.cache_n + o.cache_n
            e.samples += o.samples
            if o.success_at and o.success_at >= e.opened_at:
                e.failures, e.open_until = 0, 0.0
            e.failures += o.failures
            if (e.failures >= rules.breaker_failures or o.opened) and e.open_until <= now:
                e.open_until, e.opened_at = now + rules.cooldown_s, now
            e.expires = expires
            self._labels[label] = e
        for tenant, c in completions.items():
            avg, n, _ = self._tenants.get(tenant, (0.0, 0, 0.0))
            new = fold(avg if n else None, n, c.n, c.total, a)
            if new is not None:
                self._tenants[tenant] = (new, n + c.n, expires)
        stats = {}
        for label in list(self._labels):
            live = self._live(label)
            if live is not None:
                open_until = live.open_until if live.open_until > now else 0.0
                stats[label] = SharedStat(
                    live.ttft, live.tps, live.samples, live.hit, live.cache_n, live.failures, open_until
                )
        averages = {}
        for tenant in tenants:
            entry = self._tenants.get(tenant)
            if entry is not None and entry[2] > time.monotonic():
                averages[tenant] = entry[0]
        return stats, averages

    def _live(self, label: str) -> _Entry | None:
        e = self._labels.get(label)
        if e is not None and e.expires <= time.monotonic():
            del self._labels[label]
            return None
        return e
