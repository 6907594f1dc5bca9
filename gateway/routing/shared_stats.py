"""Route statistics shared across replicas: local reads, a merge through the exchange every second.

The request path stays what it is with one process (dictionary reads and in-place updates of the
local snapshot); every observation is also added to this interval's :class:`Observed`. ``sync``
(called about once a second by the server, and at once when this replica opens a breaker) sends
those and adopts the deployment's merged view, so a failing upstream another replica discovered is
skipped here within a second, and every replica learns speeds and cache hit rates from all traffic.
When the store does not answer, routing goes on from the local snapshot and the observations are
kept for the next exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from gateway.observability import log
from gateway.routing.stats import CandidateStat, MemoryRouteStats
from gateway.state.stats_exchange import Completions, Observed, Rules, SharedStat, StatsExchange, fold
from gateway.upstreams.priors import Speed


class SharedRouteStats(MemoryRouteStats):
    def __init__(
        self,
        exchange: StatsExchange,
        alpha: float = 0.3,
        breaker_failures: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(alpha, breaker_failures, cooldown_s)
        self.exchange = exchange
        self.rules = Rules(alpha, breaker_failures, cooldown_s)
        self.clock = clock
        self.wall = wall
        self._observed: dict[str, Observed] = {}
        self._completed: dict[str, Completions] = {}
        self._remote: dict[str, SharedStat] = {}  # candidates only other replicas have observed so far
        self._wanted: set[str] = set()  # tenants to fetch an average for
        self._syncing = False
        self._again = False
        self._publish: asyncio.Task[None] | None = None
        self._warned_at = -1e9

    # ------------------------------------------------------------------ the request path

    def stat(self, label: str, prior: Speed) -> CandidateStat:
        s = self._stats.get(label)
        if s is None:
            s = super().stat(label, prior)
            shared = self._remote.pop(label, None)
            if shared is not None:
                self._adopt(s, shared, None, self.wall(), self.clock())
        return s

    def _seen(self, label: str) -> Observed:
        o = self._observed.get(label)
        if o is None:
            o = self._observed[label] = Observed()
        return o

    def observe_speed(self, label: str, prior: Speed, ttft_s: float | None, tokens: int, gen_s: float | None) -> None:
        super().observe_speed(label, prior, ttft_s, tokens, gen_s)
        o = self._seen(label)
        o.samples += 1
        if ttft_s is not None:
            o.ttft_n += 1
            o.ttft_sum += ttft_s
        if gen_s is not None and gen_s > 0 and tokens >= 16:
            o.tps_n += 1
            o.tps_sum += tokens / gen_s

    def observe_cache(self, label: str, prior: Speed, expected_cached: int, reported_cached: int) -> None:
        super().observe_cache(label, prior, expected_cached, reported_cached)
        if expected_cached > 0:
            o = self._seen(label)
            o.cache_n += 1
            o.cache_sum += min(1.0, reported_cached / expected_cached)

    def failure(self, label: str, prior: Speed, now: float) -> bool:
        opened = super().failure(label, prior, now)
        o = self._seen(label)
        o.failures += 1
        if opened:
            o.opened = True
            self._publish_now()
        return opened

    def success(self, label: str, prior: Speed) -> None:
        super().success(label, prior)
        o = self._seen(label)
        o.failures, o.success_at, o.opened = 0, self.wall(), False

    def completion_avg(self, tenant: str) -> float | None:
        avg = self._completions.get(tenant)
        if avg is None:
            self._wanted.add(tenant)
        return avg

    def observe_completion(self, tenant: str, tokens: int) -> None:
        super().observe_completion(tenant, tokens)
        c = self._completed.get(tenant)
        if c is None:
            c = self._completed[tenant] = Completions()
        c.n += 1
        c.total += tokens

    # ------------------------------------------------------------------ the exchange

    def _publish_now(self) -> None:
        """A breaker opened here: tell the other replicas now rather than on the next tick."""
        if self._publish is None or self._publish.done():
            with contextlib.suppress(RuntimeError):  # no loop (a synchronous caller): the next tick publishes
                self._publish = asyncio.get_running_loop().create_task(self.sync())

    async def sync(self) -> None:
        if self._syncing:  # one exchange at a time; a request for another runs right after
            self._again = True
            return
        self._syncing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                await self._exchange()
        except Exception:  # the background loop must outlive any surprise
            log.exception("route statistics exchange failed unexpectedly")
        finally:
            self._syncing = False

    async def _exchange(self) -> None:
        from gateway.state.base import StateUnavailable

        observed, self._observed = self._observed, {}
        observed_open = {label for label, o in observed.items() if o.opened}
        completed, self._completed = self._completed, {}
        tenants = sorted(self._completions.keys() | self._wanted | completed.keys())
        try:
            stats, averages = await self.exchange.exchange(self.rules, observed, completed, tenants, self.wall())
        except StateUnavailable as exc:
            # keep what was seen for the next exchange, in order
            for label, o in observed.items():
                later = self._observed.get(label)
                self._observed[label] = o.then(later) if later is not None else o
            for tenant, c in completed.items():
                later_c = self._completed.get(tenant)
                self._completed[tenant] = c.then(later_c) if later_c is not None else c
            now = time.monotonic()
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning("route statistics not shared while the state store does not answer: %s", exc)
            return
        wall, mono = self.wall(), self.clock()
        for label, shared in stats.items():
            s = self._stats.get(label)
            if s is None:
                before = self._remote.get(label)
                was_open = before is not None and before.open_until > wall
                self._remote[label] = shared
            else:
                was_open = s.open_until > mono
                self._adopt(s, shared, self._observed.get(label), wall, mono)
            if shared.open_until > wall and not was_open and label not in observed_open:
                log.warning(
                    "circuit breaker for %s is open (another replica saw it fail); skipped for %.3g s",
                    label,
                    shared.open_until - wall,
                )
        for tenant, avg in averages.items():
            later_c = self._completed.get(tenant)
            if later_c is not None:  # completions that arrived during the exchange
                avg = _after(avg, later_c.n, later_c.total, self.alpha)
            self._completions[tenant] = avg
        self._wanted.difference_update(tenants)

    def _adopt(self, s: CandidateStat, shared: SharedStat, later: Observed | None, wall: float, mono: float) -> None:
        """Take the deployment's view, plus what this replica saw while the exchange was on the wire."""
        a = self.alpha
        if shared.ttft_s is not None:
            s.ttft_s = shared.ttft_s
        if shared.tokens_per_s is not None:
            s.tokens_per_s = shared.tokens_per_s
        if shared.hit_rate is not None:
            s.hit_rate = shared.hit_rate
        s.samples = max(s.samples, shared.samples)
        s.cache_samples = max(s.cache_samples, shared.cache_samples)
        if later is not None:
            s.ttft_s = _after(s.ttft_s, later.ttft_n, later.ttft_sum, a)
            s.tokens_per_s = _after(s.tokens_per_s, later.tps_n, later.tps_sum, a)
            s.hit_rate = _after(s.hit_rate, later.cache_n, later.cache_sum, a)
            if later.success_at or later.opened:  # this replica's own news is newer than the shared view
                return
            s.consecutive_failures = shared.consecutive_failures + later.failures
        else:
            s.consecutive_failures = shared.consecutive_failures
        s.open_until = mono + (shared.open_until - wall) if shared.open_until > wall else 0.0


def _after(value: float, n: int, total: float, alpha: float) -> float:
    """``value`` after ``n`` more samples summing to ``total``."""
    out = fold(value, 1, n, total, alpha)
    return value if out is None else out
