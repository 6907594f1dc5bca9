"""Key-pool quotas behave the same in memory and in Redis: exact per-minute counts, concurrency
slots, cool-downs, revocations and provider corrections, all atomic per pool."""

from __future__ import annotations

import asyncio

from gateway.state.key_quota import CONCURRENCY, COOLING, REVOKED, RPM, TOO_LARGE, TPM, WINDOW_S, KeyLimits
from tests.unit.conftest import Backend

NOW = 1_800_000_000.0
A = KeyLimits("up/a/f1", rpm=3, tpm=1000, max_concurrency=2)
B = KeyLimits("up/b/f2", rpm=10, tpm=10_000)


async def test_first_fit_takes_the_first_key_with_room_and_counts_it(backend: Backend) -> None:
    q = backend.key_quotas()
    grant = await q.acquire([A, B], [100] * 2, "r1", NOW, 60, least_loaded=False)
    assert grant.index == 0 and grant.reasons == ("", "")
    (view,) = await q.view([A], NOW)
    assert (view.requests, view.tokens, view.in_flight) == (1, 100, 1)


async def test_a_full_key_is_passed_over_with_its_reason_and_wait(backend: Backend) -> None:
    q = backend.key_quotas()
    for i in range(2):
        assert (await q.acquire([A], [100] * 1, f"r{i}", NOW + i, 60, least_loaded=False)).index == 0
    full = await q.acquire([A, B], [100] * 2, "r2", NOW + 2, 60, least_loaded=False)
    assert full.index == 1 and full.reasons[0] == CONCURRENCY
    await q.release(A, "r0")
    await q.release(A, "r1")
    assert (await q.acquire([A], [100] * 1, "r3", NOW + 3, 60, least_loaded=False)).index == 0
    await q.release(A, "r3")
    # three requests this minute: the fourth waits until the oldest leaves the window
    refused = await q.acquire([A], [100] * 1, "r4", NOW + 4, 60, least_loaded=False)
    assert refused.index is None and refused.reasons == (RPM,)
    assert refused.wait_s is not None and WINDOW_S - 4 <= refused.wait_s <= WINDOW_S - 3
    later = await q.acquire([A], [100] * 1, "r5", NOW + WINDOW_S + 1, 60, least_loaded=False)
    assert later.index == 0


async def test_tokens_per_minute_count_prompt_and_max_tokens(backend: Backend) -> None:
    q = backend.key_quotas()
    assert (await q.acquire([A], [900] * 1, "r1", NOW, 60, least_loaded=False)).index == 0
    await q.release(A, "r1")
    over = await q.acquire([A], [200] * 1, "r2", NOW + 1, 60, least_loaded=False)
    assert over.index is None and over.reasons == (TPM,)
    huge = await q.acquire([A, B], [5000] * 2, "r3", NOW + 1, 60, least_loaded=False)
    assert huge.reasons[0] == TOO_LARGE and huge.index == 1
    never = await q.acquire([A], [5000] * 1, "r4", NOW + 1, 60, least_loaded=False)
    assert never.index is None and never.wait_s is None


async def test_least_loaded_picks_the_emptiest_key(backend: Backend) -> None:
    q = backend.key_quotas()
    assert (await q.acquire([A, B], [500] * 2, "r1", NOW, 60, least_loaded=True)).index == 1
    # A would be at half its concurrency, B at a fifth of its requests: B again, whatever the order
    grant = await q.acquire([B, A], [10] * 2, "r2", NOW, 60, least_loaded=True)
    assert grant.index == 0


async def test_cooled_and_revoked_keys_are_passed_over_until_their_time(backend: Backend) -> None:
    q = backend.key_quotas()
    await q.cool(A, NOW + 5)
    await q.revoke(B, NOW + 100)
    grant = await q.acquire([A, B], [10] * 2, "r1", NOW, 60, least_loaded=False)
    assert grant.index is None and grant.reasons == (COOLING, REVOKED)
    assert grant.wait_s is not None and 4.9 <= grant.wait_s <= 5.0
    assert (await q.acquire([A, B], [10] * 2, "r2", NOW + 6, 60, least_loaded=False)).index == 0
    views = await q.view([A, B], NOW + 6)
    assert views[1].revoked and not views[0].revoked and views[0].cooling_s == 0


async def test_a_provider_correction_counts_what_the_gateway_did_not_see(backend: Backend) -> None:
    q = backend.key_quotas()
    await q.correct(A, NOW, 3, 0, 10)
    refused = await q.acquire([A], [10] * 1, "r1", NOW + 1, 60, least_loaded=False)
    assert refused.reasons == (RPM,) and refused.wait_s is not None and refused.wait_s <= 9.1
    assert (await q.acquire([A], [10] * 1, "r2", NOW + 11, 60, least_loaded=False)).index == 0


async def test_leases_of_a_dead_process_lapse(backend: Backend) -> None:
    q = backend.key_quotas()
    one = KeyLimits("up/one/f", max_concurrency=1)
    assert (await q.acquire([one], [1] * 1, "lost", NOW, 5, least_loaded=False)).index == 0
    assert (await q.acquire([one], [1] * 1, "r2", NOW + 1, 5, least_loaded=False)).reasons == (CONCURRENCY,)
    assert (await q.acquire([one], [1] * 1, "r3", NOW + 6, 5, least_loaded=False)).index == 0


async def test_concurrent_acquires_never_exceed_a_keys_rpm(backend: Backend) -> None:
    """Replicas racing for a key's last requests: exactly rpm of them win."""
    q1 = backend.key_quotas()
    q2 = q1 if backend.name == "memory" else backend.key_quotas()  # two replicas share only Redis
    key = KeyLimits("up/race/f", rpm=7)
    grants = await asyncio.gather(
        *((q1 if i % 2 else q2).acquire([key], [1] * 1, f"r{i}", NOW, 60, least_loaded=False) for i in range(20))
    )
    assert sum(g.index == 0 for g in grants) == 7


async def test_a_grant_adjusted_to_the_providers_count_frees_the_difference(backend: Backend) -> None:
    q = backend.key_quotas()
    key = KeyLimits("up/adjust/f", tpm=1000)
    assert (await q.acquire([key], [800], "r1", NOW, 60, least_loaded=False)).index == 0
    assert (await q.acquire([key], [300], "r2", NOW, 60, least_loaded=False)).reasons == (TPM,)
    await q.adjust(key, "r1", 800, 450)  # the provider counted 450 of the 800 the bound took
    assert (await q.view([key], NOW))[0].tokens == 450
    assert (await q.acquire([key], [300], "r3", NOW + 1, 60, least_loaded=False)).index == 0
    await q.adjust(key, "gone", 100, 1)  # a lease not in the window changes nothing
    assert (await q.view([key], NOW + 1))[0].tokens == 750
    assert (await q.view([key], NOW + WINDOW_S + 2))[0].tokens == 0


async def test_each_key_is_checked_against_its_own_bound(backend: Backend) -> None:
    q = backend.key_quotas()
    small = KeyLimits("up/small/f", tpm=500)
    grant = await q.acquire([small, B], [400, 900], "r1", NOW, 60, least_loaded=False)
    assert grant.index == 0 and (await q.view([small], NOW))[0].tokens == 400
