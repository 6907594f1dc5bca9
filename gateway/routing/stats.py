"""Live statistics per candidate (``upstream/model``): speeds, cache hit rate, circuit breaker.

Reads happen on every routed request, so :class:`RouteStats` reads are synchronous lookups in a
local snapshot; writes are observations after a response. A backend shared across replicas (Redis)
implements the same methods on a local snapshot and exchanges observations in :meth:`sync`, which
the server calls about once a second: the route decision never waits on the network, and replicas
converge within a sync interval. :class:`MemoryRouteStats` is the one-process implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from gateway.upstreams.priors import Speed

# before a tenant has settled a request, its expected output is capped at this many tokens
COLD_COMPLETION_TOKENS = 1000.0
# before an upstream reported any cached_tokens, predicted cache hits are trusted this much
PRIOR_HIT_RATE = 0.9


@dataclass(slots=True)
class CandidateStat:
    """What the router believes about one candidate right now."""

    ttft_s: float  # EWMA of the time to first token, prefill of uncached tokens taken out
    tokens_per_s: float
    prefill_tps: float = float("inf")
    samples: int = 0
    hit_rate: float = PRIOR_HIT_RATE
    cache_samples: int = 0
    consecutive_failures: int = 0
    open_until: float = 0.0  # breaker: skipped until this time (monotonic seconds)


class RouteStats(ABC):
    """Per-candidate speeds and health, and per-tenant output sizes."""

    @abstractmethod
    def stat(self, label: str, prior: Speed) -> CandidateStat:
        """The current belief for ``label`` (created from ``prior`` when cold)."""

    @abstractmethod
    def observe_speed(self, label: str, prior: Speed, ttft_s: float | None, tokens: int, gen_s: float | None) -> None:
        """A served request: time to the upstream's first byte and decode speed (None = unknown)."""

    @abstractmethod
    def observe_cache(self, label: str, prior: Speed, expected_cached: int, reported_cached: int) -> None:
        """How many of the cached tokens affinity predicted the upstream actually reported."""

    @abstractmethod
    def failure(self, label: str, prior: Speed, now: float) -> bool:
        """A failed call; returns True when this failure opened the breaker."""

    @abstractmethod
    def success(self, label: str, prior: Speed) -> None:
        """A call that reached a working upstream: the breaker closes."""

    @abstractmethod
    def completion_avg(self, tenant: str) -> float | None:
        """The tenant's running average of completion tokens (None before its first request)."""

    @abstractmethod
    def observe_completion(self, tenant: str, tokens: int) -> None: ...

    async def sync(self) -> None:  # noqa: B027 - one process has nothing to exchange
        """Exchange observations with other replicas (shared backends)."""


class MemoryRouteStats(RouteStats):
    def __init__(self, alpha: float = 0.3, breaker_failures: int = 3, cooldown_s: float = 30.0) -> None:
        self.alpha = alpha
        self.breaker_failures = breaker_failures
        self.cooldown_s = cooldown_s
        self._stats: dict[str, CandidateStat] = {}
        self._completions: dict[str, float] = {}

    def stat(self, label: str, prior: Speed) -> CandidateStat:
        s = self._stats.get(label)
        if s is None:
            s = self._stats[label] = CandidateStat(prior.ttft_s, prior.tokens_per_s, prior.prefill_tps)
        return s

    def observe_speed(self, label: str, prior: Speed, ttft_s: float | None, tokens: int, gen_s: float | None) -> None:
        s = self.stat(label, prior)
        a = self.alpha if s.samples else 1.0  # the first sample replaces the prior
        if ttft_s is not None:
            s.ttft_s += a * (ttft_s - s.ttft_s)
        if gen_s is not None and gen_s > 0 and tokens >= 16:  # tiny answers say nothing about speed
            s.tokens_per_s += a * (tokens / gen_s - s.tokens_per_s)
        s.samples += 1

    def observe_cache(self, label: str, prior: Speed, expected_cached: int, reported_cached: int) -> None:
        if expected_cached <= 0:
            return
        s = self.stat(label, prior)
        rate = min(1.0, reported_cached / expected_cached)
        s.hit_rate += (self.alpha if s.cache_samples else 1.0) * (rate - s.hit_rate)
        s.cache_samples += 1

    def failure(self, label: str, prior: Speed, now: float) -> bool:
        s = self.stat(label, prior)
        s.consecutive_failures += 1
        if s.consecutive_failures >= self.breaker_failures and s.open_until <= now:
            s.open_until = now + self.cooldown_s
            return True
        return False

    def success(self, label: str, prior: Speed) -> None:
        s = self.stat(label, prior)
        s.consecutive_failures = 0
        s.open_until = 0.0

    def completion_avg(self, tenant: str) -> float | None:
        return self._completions.get(tenant)

    def observe_completion(self, tenant: str, tokens: int) -> None:
        old = self._completions.get(tenant)
        self._completions[tenant] = float(tokens) if old is None else old + self.alpha * (tokens - old)
