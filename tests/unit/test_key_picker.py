"""Choosing a pool key: the prefix's key first while it has room, weighted round-robin for new
conversations, rests after 429s (Retry-After, else a doubling backoff), the provider's
x-ratelimit-* headers correcting the local count."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.routing.keys import KeyPicker, Lease, NoKey, Pool, PoolKeySpec
from gateway.state.key_quota import KeyGrant, KeyLimits, MemoryKeyQuotaState
from gateway.upstreams.rate_headers import RateHeaders, duration_s, parse_rate_headers


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def pool(selection: str = "cache_aware", rpm: int | None = None, weights: tuple[float, ...] = (1, 1, 1)) -> Pool:
    keys = tuple(
        PoolKeySpec(label, KeyLimits(f"up/{label}/fp", rpm=rpm), weight)
        for label, weight in zip("abc", weights, strict=True)
    )
    return Pool("up", keys, selection, backoff_s=2.0)


def picker() -> tuple[KeyPicker, Wall]:
    wall = Wall()
    return KeyPicker({"up": pool()}, MemoryKeyQuotaState(), wall), wall


async def take(p: KeyPicker, up: Pool, held: dict[str, int] | None = None, lease: str = "r") -> Lease:
    got = await p.take(up, held or {}, 100, lease)
    assert isinstance(got, Lease)
    await p.release(got, None)
    return got


async def test_the_key_holding_the_prefix_is_chosen_while_it_has_room() -> None:
    p, _ = picker()
    up = pool(rpm=2)
    first = await take(p, up, {"b": 1200}, "r1")
    assert first.key.label == "b" and first.held == 1200
    assert first.reason == "key b (holds this conversation's prefix (1200 tokens))"
    await take(p, up, {"b": 1200}, "r2")
    moved = await take(p, up, {"b": 1200}, "r3")  # b is at its 2 requests a minute
    assert moved.key.label != "b" and moved.held == 0
    assert "b holds the prefix but has no room" in moved.reason and "b at its requests per minute" in moved.reason


async def test_new_conversations_follow_the_weights() -> None:
    p, _ = picker()
    up = pool("round_robin", weights=(1, 2, 1))
    counts = Counter([(await take(p, up, lease=f"r{i}")).key.label for i in range(40)])
    assert counts == {"a": 10, "b": 20, "c": 10}


async def test_round_robin_ignores_where_the_prefix_is() -> None:
    p, _ = picker()
    up = pool("round_robin")
    labels = [(await take(p, up, {"a": 5000}, f"r{i}")).key.label for i in range(3)]
    assert sorted(labels) == ["a", "b", "c"]


async def test_a_429_rests_the_key_for_retry_after_else_a_doubling_backoff() -> None:
    p, wall = picker()
    up = pool()
    lease = await take(p, up, {"a": 10})
    assert await p.refused(lease, 429, "7") == "key a rate limited (429, resting 7 s)"
    assert (await take(p, up, {"a": 10})).key.label != "a"
    wall.now += 7.5
    again = await take(p, up, {"a": 10})
    assert again.key.label == "a"
    assert await p.refused(again, 429, None) == "key a rate limited (429, resting 4 s)"  # second 429 in a row
    await p.observed(await take(p, up, {"b": 10}), None)
    wall.now += 5
    third = await take(p, up, {"a": 10})
    assert await p.refused(third, 429, None) == "key a rate limited (429, resting 8 s)"
    await p.observed(third, None)  # an answer ends the streak
    assert await p.refused(third, 429, None) == "key a rate limited (429, resting 2 s)"


async def test_a_refused_key_is_out_and_every_key_out_means_no_key() -> None:
    p, _ = picker()
    up = pool()
    for _ in range(3):
        lease = await p.take(up, {}, 100, "r")
        assert isinstance(lease, Lease)
        assert "refused (HTTP 401)" in await p.refused(lease, 401, None)
        await p.release(lease, None)
    none = await p.take(up, {}, 100, "r")
    assert isinstance(none, NoKey) and none.reason.count("refused by the provider (401/403)") == 3
    assert none.wait_s is not None and none.wait_s > 3000


async def test_the_providers_headers_correct_the_local_count() -> None:
    p, _ = picker()
    up = pool(rpm=10)
    lease = await take(p, up, {"a": 1})
    # the provider counts 6 requests this minute on a (another client shares the key)
    await p.observed(lease, RateHeaders(10, 4, 30.0, None, None, None))
    views = await p.state.view([up.keys[0].limits], p.wall())
    assert views[0].requests == 6
    spent = await take(p, up, {"a": 1})
    await p.observed(spent, RateHeaders(10, 0, 12.0, None, None, None))  # nothing left until the reset
    assert (await take(p, up, {"a": 1})).key.label != "a"
    assert (await p.state.view([up.keys[0].limits], p.wall()))[0].cooling_s == pytest.approx(12.0)


def test_rate_limit_headers_are_read_in_every_duration_form() -> None:
    assert [duration_s(t) for t in ("1s", "6m0s", "20ms", "1h2m3.5s", "0.5", "soon", "")] == [
        1.0,
        360.0,
        0.02,
        3723.5,
        0.5,
        None,
        None,
    ]
    headers = {
        "x-ratelimit-limit-requests": "200",
        "x-ratelimit-remaining-requests": "199",
        "x-ratelimit-reset-requests": "300ms",
        "x-ratelimit-remaining-tokens": "1999000",
    }
    assert parse_rate_headers(headers.get) == RateHeaders(200, 199, 0.3, None, 1_999_000, None)
    assert parse_rate_headers({}.get) is None


def test_a_key_holding_the_prefix_bounds_the_prompt_by_what_the_provider_counted() -> None:
    from gateway.routing.keys import key_tokens

    # 40,000 bytes of prompt, of which key a served the first 36,000 and the provider counted 9,000
    bounds = key_tokens(40_000, 1000, {"a": 9000, "b": 0}, {"a": 36_000, "b": 100})
    assert bounds == {"a": 9000 + 4000 // 2 + 16 + 1000}  # b holds nothing: the whole-prompt bound applies


async def test_the_grant_shrinks_to_the_providers_prompt_once_the_answer_is_in() -> None:
    from gateway.upstreams.usage import Usage

    p, wall = picker()
    up = Pool("up", (PoolKeySpec("a", KeyLimits("up/a/fp", tpm=30_000)),))
    lease = await p.take(up, {}, 25_000, "r1", max_tokens=1000)
    assert isinstance(lease, Lease) and lease.tokens == 25_000
    assert isinstance(await p.take(up, {}, 25_000, "r2", max_tokens=1000), NoKey)
    await p.release(lease, Usage(prompt_tokens=11_000, completion_tokens=10))
    assert (await p.state.view([up.keys[0].limits], wall()))[0].tokens == 12_000
    assert isinstance(await p.take(up, {}, 15_000, "r3", max_tokens=1000), Lease)


async def test_a_shared_state_that_does_not_answer_is_replaced_by_this_processs_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.state.base import StateUnavailable

    class Down(MemoryKeyQuotaState):
        async def acquire(self, *args: object, **kwargs: object) -> KeyGrant:  # type: ignore[override]
            raise StateUnavailable("redis down")

        async def release(self, key: KeyLimits, lease: str) -> None:
            raise StateUnavailable("redis down")

    up = pool(rpm=1)
    p = KeyPicker({"up": up}, Down(), Wall())  # any state but plain memory gets a local count beside it
    with caplog.at_level("WARNING"):
        leases = [await p.take(up, {}, 10, f"r{i}") for i in range(4)]
    assert [isinstance(lease, Lease) for lease in leases] == [True, True, True, False]  # rpm 1 on 3 keys
    assert "counting key quotas in this process alone" in caplog.text
    await p.release(leases[0], None)  # type: ignore[arg-type]
