"""Budget and rate-limit state contracts, run against memory and against a real Redis, plus what only
a shared backend does (namespaces, TTLs on every key, reservations that expire with a dead replica,
seeding once) and the fail-closed/fail-open wrappers."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import GatewayError
from gateway.state.base import BudgetState, Limit, RateCount, RateLimit, RateLimitState, Refusal, StateUnavailable
from gateway.state.failover import FailoverBudgetState, FailoverRateLimitState
from tests.unit.conftest import Backend, redis_backend

DAY = Limit("budget:t:tenant:d1", 1000, 3600)
MONTH = Limit("budget:t:tenant:m1", 1500, 3600)
NOW = 60 * 29_666_667 + 10.0  # 10 s into a 60 s window


# ------------------------------------------------------------------------------------------ budgets


async def test_reserve_settle_and_used(backend: Backend) -> None:
    state = backend.budgets()
    assert await state.reserve("r1", [DAY, MONTH], 600) is None
    assert await state.used(DAY.key) == 600 and await state.open_reservations() == 1
    await state.settle("r1", 250)
    assert await state.used(DAY.key) == 250 and await state.used(MONTH.key) == 250
    assert await state.open_reservations() == 0


async def test_refusal_changes_nothing_and_names_the_full_limit(backend: Backend) -> None:
    state = backend.budgets()
    await state.reserve("r1", [DAY, MONTH], 900)
    await state.settle("r1", 900)  # month 900 of 1500, day 900 of 1000
    refusal = await state.reserve("r2", [MONTH, DAY], 200)
    assert refusal == Refusal(DAY.key, 1000, 900) and refusal.remaining == 100
    assert await state.used(MONTH.key) == 900  # the month line was not touched either
    assert await state.open_reservations() == 0


async def test_a_retried_reservation_is_held_once(backend: Backend) -> None:
    """A call retried after a dropped connection may reach the store twice."""
    state = backend.budgets()
    assert await state.reserve("r1", [DAY], 300) is None
    assert await state.reserve("r1", [DAY], 300) is None
    assert await state.used(DAY.key) == 300 and await state.open_reservations() == 1
    await state.settle("r1", 100)
    assert await state.used(DAY.key) == 100


async def test_settle_is_idempotent_and_unknown_ids_are_no_ops(backend: Backend) -> None:
    state = backend.budgets()
    await state.reserve("r1", [DAY], 500)
    await state.settle("r1", 100)
    await state.settle("r1", 100)
    await state.settle("never-reserved", 999)
    assert await state.used(DAY.key) == 100


async def test_amounts_stay_exact_beyond_double_precision(backend: Backend) -> None:
    """Nanodollars: $20M is 2e16, past the 2^53 a Lua double holds exactly."""
    big = Limit("budget:t:tenant:big", 20_000_000_000_000_001, 3600)
    state = backend.budgets()
    await state.add_spent(big.key, 19_999_999_999_999_999, 3600)
    assert await state.used(big.key) == 19_999_999_999_999_999


async def test_add_spent_adds_to_settled_spend(backend: Backend) -> None:
    state = backend.budgets()
    await state.add_spent(DAY.key, 300, 3600)
    await state.add_spent(DAY.key, 300, 3600)
    assert await state.used(DAY.key) == 600


async def test_add_spent_once_counts_a_request_once(backend: Backend) -> None:
    state = backend.budgets()
    for _ in range(2):  # a replay after a timeout
        await state.add_spent_once("r1", [DAY, MONTH], 300)
    await state.add_spent_once("r2", [DAY], 50)
    assert await state.used(DAY.key) == 350 and await state.used(MONTH.key) == 300


async def test_fifty_concurrent_reservations_fit_exactly_ten(backend: Backend) -> None:
    state = backend.budgets()
    results = await asyncio.gather(*(state.reserve(f"r{i}", [DAY], 100) for i in range(50)))
    assert sum(r is None for r in results) == 10
    assert await state.used(DAY.key) == 1000 and await state.open_reservations() == 10


async def test_seeding_applies_once_per_counter_when_shared(backend: Backend) -> None:
    """Memory starts empty with each process, so seeding adds; replicas sharing Redis must not each add
    the ledger's spend again."""
    state = backend.budgets()
    await state.seed(DAY.key, 400, 3600)
    await state.seed(DAY.key, 400, 3600)
    assert await state.used(DAY.key) == (800 if backend.name == "memory" else 400)


@pytest.mark.redis
async def test_a_dead_replicas_reservations_expire() -> None:
    b = await redis_backend()
    try:
        crashed = b.budgets(reservation_ttl_s=0.2)  # this replica reserves, then never settles
        assert await crashed.reserve("lost", [DAY], 700) is None
        survivor = b.budgets()
        assert await survivor.reserve("r2", [DAY], 700) is not None  # held by the dead one
        await asyncio.sleep(0.35)
        assert await survivor.open_reservations() == 0
        assert await survivor.reserve("r2", [DAY], 700) is None
        await crashed.settle("lost", 50)  # a late settlement still counts what it spent
        assert await survivor.used(DAY.key) == 750
    finally:
        await cleanup(b)


@pytest.mark.redis
async def test_every_redis_key_is_namespaced_and_expires() -> None:
    b = await redis_backend()
    try:
        budgets, rates, kv = b.budgets(), b.rates(), b.kv()
        await budgets.reserve("r1", [DAY, MONTH], 10)
        await budgets.reserve("r2", [DAY], 10)
        await budgets.settle("r2", 5)
        await budgets.seed("budget:t:app=x:d1", 5, 3600)
        await rates.hit([RateLimit("rate:t:tenant:rpm", 10, 60, 1)], NOW)
        await kv.put("reasoning:t:abc", b"x", 10**9)  # capped
        keys = [k async for k in b.client.scan_iter(match=b.settings.namespace + ":*")]
        assert len(keys) >= 8
        for key in keys:
            ttl = await b.client.pttl(key)
            assert 0 < ttl <= 7 * 86400 * 1000, (key, ttl)
        other = await redis_backend()  # another deployment on the same Redis sees none of it
        try:
            assert await other.budgets().used(DAY.key) == 0
            assert await other.kv().get("reasoning:t:abc") is None
        finally:
            await cleanup(other)
    finally:
        await cleanup(b)


async def cleanup(b: Backend) -> None:
    keys = [k async for k in b.client.scan_iter(match=b.settings.namespace + ":*")]
    if keys:
        await b.client.delete(*keys)
    await b.link.close()


# -------------------------------------------------------------------------------------- rate limits

RPM = RateLimit("rate:t:tenant:rpm", 3, 60, 1)


def tpm(amount: int, limit: int = 1000) -> RateLimit:
    return RateLimit("rate:t:tenant:tpm", limit, 60, amount)


async def test_rate_admits_up_to_the_limit_then_refuses_without_counting(backend: Backend) -> None:
    state = backend.rates()
    for i in range(3):
        ok, [count] = await state.hit([RPM], NOW + i)
        assert ok and count.current == i + 1 and count.remaining == 2 - i
    ok, [count] = await state.hit([RPM], NOW + 3)
    assert not ok and count.current == 3 and count.remaining == 0
    ok, [count] = await state.hit([RPM], NOW + 4)
    assert not ok and count.current == 3  # refusals are not counted


async def test_rate_hit_is_all_or_nothing_across_limits(backend: Backend) -> None:
    state = backend.rates()
    assert (await state.hit([RPM, tpm(600)], NOW))[0]
    ok, (rpm, tokens) = await state.hit([RPM, tpm(600)], NOW)
    assert not ok and tokens.used + 600 > 1000
    assert rpm.current == 1  # the request counter did not move for the refused hit


async def test_rate_sliding_window_weights_the_previous_window(backend: Backend) -> None:
    state = backend.rates()
    for _ in range(3):
        await state.hit([RPM], NOW)
    # 50 s into the next window: 3 * 10/60 = 0.5 still counts, so two more fit, then none
    for current in (1, 2):
        ok, [count] = await state.hit([RPM], NOW + 100)
        assert ok and count.previous == 3 and count.current == current
    ok, [count] = await state.hit([RPM], NOW + 100)
    assert not ok and count.used == pytest.approx(2.5)
    assert count.wait_s(1) == pytest.approx(10)  # once the previous window has left the slide
    ok, _ = await state.hit([RPM], NOW + 100 + count.wait_s(1) + 0.01)
    assert ok


async def test_rate_adjust_corrects_the_window_that_counted(backend: Backend) -> None:
    state = backend.rates()
    ok, [count] = await state.hit([tpm(900)], NOW)
    assert ok
    await state.adjust(count.limit.key, 60, count.window, -700)  # actual usage was 200
    ok, [after] = await state.hit([tpm(800)], NOW + 1)
    assert ok and after.current == 1000
    # a correction arriving after the window rolled lands in the previous window
    await state.adjust(count.limit.key, 60, count.window, -500)
    ok, [later] = await state.hit([tpm(1)], NOW + 60)
    assert ok and later.previous == 500


async def test_rate_adjust_counts_hits_made_elsewhere(backend: Backend) -> None:
    """What a replica counted locally during an outage is added to the shared window afterwards."""
    state = backend.rates()
    idx = int(NOW // 60)
    await state.adjust(RPM.key, 60, idx, 2)
    ok, [count] = await state.hit([RPM], NOW)
    assert ok and count.current == 3


def test_wait_s_for_a_hit_that_can_never_fit() -> None:
    count = RateCount(tpm(5000), 0, 0, 0.0, 0)
    assert count.wait_s(5000) is None
    assert RateCount(RPM, 0, 3, 30.0, 0).wait_s(1) == pytest.approx(30 + 60 * (1 - 2 / 3))


# ---------------------------------------------------------------------------------- fail modes


class Flaky(BudgetState, RateLimitState):  # type: ignore[misc]
    """A real backend that can be made to stop answering."""

    def __init__(self, budgets: BudgetState, rates: RateLimitState) -> None:
        self.budgets, self.rates, self.down = budgets, rates, False
        self.slow = False  # the call is carried out, but its answer never arrives (a timeout)

    def _check(self) -> None:
        if self.down:
            raise StateUnavailable("connection refused (test)", maybe_ran=False)

    async def reserve(self, request_id, limits, amount):  # type: ignore[no-untyped-def]
        self._check()
        refusal = await self.budgets.reserve(request_id, limits, amount)
        if self.slow:
            raise StateUnavailable("timed out (test)")
        return refusal

    async def settle(self, request_id, actual):  # type: ignore[no-untyped-def]
        self._check()
        await self.budgets.settle(request_id, actual)

    async def used(self, key):  # type: ignore[no-untyped-def]
        self._check()
        return await self.budgets.used(key)

    async def add_spent(self, key, amount, ttl_s):  # type: ignore[no-untyped-def]
        self._check()
        await self.budgets.add_spent(key, amount, ttl_s)

    async def seed(self, key, amount, ttl_s):  # type: ignore[no-untyped-def]
        self._check()
        await self.budgets.seed(key, amount, ttl_s)

    async def add_spent_once(self, request_id, limits, amount):  # type: ignore[no-untyped-def]
        self._check()
        await self.budgets.add_spent_once(request_id, limits, amount)
        if self.slow:
            raise StateUnavailable("timed out (test)")

    async def open_reservations(self):  # type: ignore[no-untyped-def]
        self._check()
        return await self.budgets.open_reservations()

    async def hit(self, limits, now):  # type: ignore[no-untyped-def]
        self._check()
        return await self.rates.hit(limits, now)

    async def adjust(self, key, window_s, window, delta):  # type: ignore[no-untyped-def]
        self._check()
        await self.rates.adjust(key, window_s, window, delta)


async def wait_for(predicate) -> None:  # type: ignore[no-untyped-def]
    for _ in range(150):  # 3 s
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_fail_closed_refuses_with_503_and_settles_later(backend: Backend) -> None:
    shared = Flaky(backend.budgets(), backend.rates())
    state = FailoverBudgetState(shared, "closed", cooldown_s=0.05)
    assert await state.reserve("r1", [DAY], 400) is None
    shared.down = True
    with pytest.raises(GatewayError) as refused:
        await state.reserve("r2", [DAY], 100)
    assert refused.value.status == 503 and refused.value.code == "state_unavailable"
    assert "fail closed" in refused.value.message and (b"retry-after", b"1") in refused.value.headers
    await state.settle("r1", 150)  # never raises: queued for when Redis answers
    shared.down = False

    async def settled() -> bool:
        return await shared.budgets.used(DAY.key) == 150

    await wait_for(settled)
    assert await state.open_reservations() == 0
    await state.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_a_reservation_that_timed_out_but_ran_is_released(backend: Backend, mode: str) -> None:
    """Redis was only slow: the script reserved, the answer came too late; nothing may stay reserved."""
    shared = Flaky(backend.budgets(), backend.rates())
    state = FailoverBudgetState(shared, mode, cooldown_s=0.05)  # type: ignore[arg-type]
    shared.slow = True
    if mode == "closed":
        with pytest.raises(GatewayError):
            await state.reserve("r1", [DAY], 400)
    else:
        assert await state.reserve("r1", [DAY], 400) is None
        await state.settle("r1", 100)  # its spend reaches Redis slowly too, and is replayed
        await asyncio.sleep(0.2)
    shared.slow = False

    async def released() -> bool:
        return await shared.budgets.open_reservations() == 0

    await wait_for(released)
    assert await shared.budgets.used(DAY.key) == (0 if mode == "closed" else 100)
    await state.close()


async def test_fail_open_serves_locally_and_reconciles(backend: Backend) -> None:
    shared = Flaky(backend.budgets(), backend.rates())
    state = FailoverBudgetState(shared, "open", cooldown_s=0.05)
    shared.down = True
    assert await state.reserve("r1", [DAY], 400) is None  # served from this process's memory
    await state.settle("r1", 300)
    assert await state.used(DAY.key) == 300
    shared.down = False

    async def reconciled() -> bool:
        return await shared.budgets.used(DAY.key) == 300

    await wait_for(reconciled)
    assert await state.open_reservations() == 0
    await state.close()


async def test_rate_limits_fail_closed_or_open(backend: Backend) -> None:
    shared = Flaky(backend.budgets(), backend.rates())
    closed = FailoverRateLimitState(shared, "closed", cooldown_s=0.05)
    opened = FailoverRateLimitState(shared, "open", cooldown_s=0.05)
    shared.down = True
    with pytest.raises(GatewayError) as refused:
        await closed.hit([RPM], NOW)
    assert refused.value.status == 503
    assert (await opened.hit([RPM], NOW))[0]
    assert (await opened.hit([RPM], NOW))[0]
    shared.down = False

    async def reconciled() -> bool:
        _, [count] = await shared.rates.hit([RateLimit(RPM.key, 3, 60, 0)], NOW)
        return count.current == 2

    await wait_for(reconciled)
    await closed.close()
    await opened.close()


@pytest.mark.redis
async def test_redis_that_refuses_connections_fails_fast() -> None:
    """Nothing listens on the port: every call ends within its deadline, as StateUnavailable; the
    key-value state degrades to misses."""
    import time

    from gateway.state.redis import RedisBudgetState, RedisKeyValueState, RedisSettings, connect
    from tests.conftest import free_port

    settings = RedisSettings(f"redis://127.0.0.1:{free_port()}/0", "kgtest-refused", None, 0.1, 0.1)
    link = connect(settings)
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as refused:
            await RedisBudgetState(link, 60).reserve("r", [DAY], 1)
        assert not refused.value.maybe_ran
        kv = RedisKeyValueState(link)
        assert await kv.get("a") is None and await kv.get_many(["a", "b"]) == [None, None]
        await kv.put("a", b"x", 10)
        await kv.delete("a")
        assert time.monotonic() - started < 2.0
    finally:
        await link.close()
