"""Upstream statistics and circuit breakers shared by replicas, run against the memory exchange and a
real Redis: two :class:`SharedRouteStats` stand for two gateway processes on one store."""

from __future__ import annotations

import asyncio

import pytest

from gateway.routing.shared_stats import SharedRouteStats
from gateway.state.base import StateUnavailable
from gateway.state.stats_exchange import (
    Completions,
    MemoryStatsExchange,
    Observed,
    Rules,
    SharedStat,
    StatsExchange,
)
from gateway.upstreams.priors import Speed
from tests.unit.conftest import Backend

PRIOR = Speed(1.5, 40.0)
LABEL = "a/k2"


def exchange_of(backend: Backend) -> StatsExchange:
    if backend.name == "memory":
        return MemoryStatsExchange()
    from gateway.state.redis_stats import RedisStatsExchange

    return RedisStatsExchange(backend.link)


def replicas(backend: Backend, n: int = 2, cooldown_s: float = 30.0) -> list[SharedRouteStats]:
    shared = exchange_of(backend)
    return [SharedRouteStats(shared, 0.5, 3, cooldown_s) for _ in range(n)]


async def published(r: SharedRouteStats) -> None:
    """Wait for the publication a breaker opening started."""
    assert r._publish is not None
    await r._publish


async def test_breaker_opened_by_one_replica_is_open_for_the_other(backend: Backend) -> None:
    a, b = replicas(backend)
    b.stat(LABEL, PRIOR)  # b routes there too, and its own view is closed
    now = a.clock()
    assert [a.failure(LABEL, PRIOR, now) for _ in range(3)] == [False, False, True]
    await published(a)  # at once, not on the next tick
    assert b.stat(LABEL, PRIOR).open_until <= b.clock()
    await b.sync()
    assert b.stat(LABEL, PRIOR).open_until > b.clock() + 25


async def test_breaker_learned_for_a_candidate_this_replica_never_saw(backend: Backend) -> None:
    a, b = replicas(backend)
    for _ in range(3):
        a.failure(LABEL, PRIOR, a.clock())
    await published(a)
    await b.sync()
    assert b.stat(LABEL, PRIOR).open_until > b.clock() + 25


async def test_failures_add_up_across_replicas(backend: Backend) -> None:
    a, b = replicas(backend)
    a.failure(LABEL, PRIOR, a.clock())
    a.failure(LABEL, PRIOR, a.clock())
    await a.sync()
    await b.sync()
    assert b.stat(LABEL, PRIOR).consecutive_failures == 2
    assert b.failure(LABEL, PRIOR, b.clock()) is True  # the third failure, seen by b, opens it
    await published(b)
    await a.sync()
    assert a.stat(LABEL, PRIOR).open_until > a.clock()


async def test_a_success_anywhere_closes_the_breaker_for_all(backend: Backend) -> None:
    a, b = replicas(backend)
    for _ in range(3):
        a.failure(LABEL, PRIOR, a.clock())
    await published(a)
    await b.sync()
    b.success(LABEL, PRIOR)  # b probed it (every candidate open) and it answered
    await b.sync()
    await a.sync()
    assert a.stat(LABEL, PRIOR).open_until == 0.0
    assert a.stat(LABEL, PRIOR).consecutive_failures == 0


async def test_a_success_from_before_the_opening_does_not_close_it(backend: Backend) -> None:
    a, b = replicas(backend)
    b.success(LABEL, PRIOR)  # answered, but b only reports it after a opened the breaker
    await asyncio.sleep(0.01)  # the opening comes measurably later (times are wall clock)
    for _ in range(3):
        a.failure(LABEL, PRIOR, a.clock())
    await published(a)
    await b.sync()
    assert b.stat(LABEL, PRIOR).open_until > b.clock()


async def test_speeds_and_cache_hits_merge_across_replicas(backend: Backend) -> None:
    a, b = replicas(backend)
    a.observe_speed(LABEL, PRIOR, 0.2, 100, 1.0)  # the first sample replaces the prior
    a.observe_cache(LABEL, PRIOR, 1000, 500)
    await a.sync()
    await b.sync()
    s = b.stat(LABEL, PRIOR)
    assert (s.ttft_s, s.tokens_per_s, s.hit_rate) == pytest.approx((0.2, 100.0, 0.5))
    b.observe_speed(LABEL, PRIOR, 0.4, 300, 1.0)
    await b.sync()
    await a.sync()
    s = a.stat(LABEL, PRIOR)
    assert (s.ttft_s, s.tokens_per_s) == pytest.approx((0.3, 200.0))  # alpha 0.5
    assert s.samples == 2
    assert s.prefill_tps == PRIOR.prefill_tps  # never shared: each replica keeps the config's


async def test_completion_average_is_shared_per_tenant(backend: Backend) -> None:
    a, b = replicas(backend)
    a.observe_completion("t1", 100)
    await a.sync()
    assert b.completion_avg("t1") is None  # unknown here until the next exchange fetches it
    await b.sync()
    assert b.completion_avg("t1") == pytest.approx(100.0)
    assert b.completion_avg("t2") is None


async def test_observations_made_during_an_exchange_are_kept(backend: Backend) -> None:
    a, b = replicas(backend)
    a.observe_speed(LABEL, PRIOR, 0.2, 100, 1.0)
    sync = asyncio.ensure_future(a.sync())
    await asyncio.sleep(0)  # the exchange is on its way
    a.observe_speed(LABEL, PRIOR, 0.4, 100, 1.0)
    await sync
    assert a.stat(LABEL, PRIOR).ttft_s == pytest.approx(0.3)
    await a.sync()
    await b.sync()
    assert b.stat(LABEL, PRIOR).ttft_s == pytest.approx(0.3)


class Flaky(MemoryStatsExchange):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def exchange(
        self,
        rules: Rules,
        observed: dict[str, Observed],
        completions: dict[str, Completions],
        tenants: list[str],
        now: float,
    ) -> tuple[dict[str, SharedStat], dict[str, float]]:
        if self.down:
            raise StateUnavailable("down")
        return await super().exchange(rules, observed, completions, tenants, now)


async def test_an_exchange_that_fails_keeps_observations_for_the_next() -> None:
    flaky = Flaky()
    a, b = SharedRouteStats(flaky, 0.5, 3, 30.0), SharedRouteStats(flaky, 0.5, 3, 30.0)
    a.failure(LABEL, PRIOR, a.clock())
    a.failure(LABEL, PRIOR, a.clock())
    await a.sync()  # no error escapes: routing goes on from the local view
    a.failure(LABEL, PRIOR, a.clock())  # opens locally; its publication fails too
    await published(a)
    assert a.stat(LABEL, PRIOR).open_until > a.clock()
    flaky.down = False
    await a.sync()
    await b.sync()
    assert b.stat(LABEL, PRIOR).open_until > b.clock()
    assert b.stat(LABEL, PRIOR).consecutive_failures == 3


def test_observed_intervals_compose_in_order() -> None:
    failing = Observed(failures=2)
    recovered = Observed(failures=1, success_at=5.0)
    assert failing.then(recovered).failures == 1  # the success reset what came before it
    assert recovered.then(failing).failures == 3
    assert recovered.then(failing).success_at == 5.0
    assert Observed(samples=1, ttft_n=1, ttft_sum=0.5).then(Observed(samples=2)).samples == 3


@pytest.mark.redis
async def test_every_shared_key_is_namespaced_and_expires() -> None:
    from tests.unit.conftest import redis_backend

    backend = await redis_backend()
    try:
        a, _ = replicas(backend)
        a.observe_speed(LABEL, PRIOR, 0.2, 100, 1.0)
        a.observe_completion("t1", 100)
        a.failure(LABEL, PRIOR, a.clock())
        await a.sync()
        ns = backend.settings.namespace
        keys = sorted([k async for k in backend.client.scan_iter(match=ns + ":*")])
        assert keys == [
            f"{ns}:{{routestats}}:labels".encode(),
            f"{ns}:{{routestats}}:tenant:t1".encode(),
            f"{ns}:{{routestats}}:up:{LABEL}".encode(),
        ]
        for key in keys:
            assert 0 < await backend.client.ttl(key) <= 3600
    finally:
        keys = [k async for k in backend.client.scan_iter(match=backend.settings.namespace + ":*")]
        if keys:
            await backend.client.delete(*keys)
        await backend.link.close()
