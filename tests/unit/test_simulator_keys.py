"""The simulated provider's per-key tier limits: 429 with Retry-After and x-ratelimit-* headers,
counts that forget after a minute, concurrency slots held until the answer ends, revoked keys,
faults aimed at one key, and a prompt cache per key."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest

from simulator import Fault, SimReply, Simulator, profile_from
from simulator.keys import KeyLimit

PROFILE = profile_from("moonshot-standard", ttft_s=0, tokens_per_s=0)
LONG = "Long system prompt for the cache. " * 60


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(content: str = "hello", stream: bool = False, max_tokens: int = 50) -> bytes:
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": content}]
    body: dict[str, Any] = {
        "model": "kimi-k2-thinking",
        "messages": messages,
        "stream": stream,
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def send(sim: Simulator, key: str, body: bytes) -> SimReply:
    return sim.handle(body, headers={"Authorization": f"Bearer {key}"})


async def finish(reply: SimReply) -> dict[str, Any]:
    if reply.events is not None:
        async with contextlib.aclosing(reply.events) as events:
            chunks = [e async for e in events]
        usage = [orjson.loads(c[6:]) for c in chunks if c.startswith(b"data: {") and b'"usage"' in c][-1]["usage"]
        return {"usage": usage}
    await reply.wait()
    return orjson.loads(reply.body or b"{}")


def headers(reply: SimReply) -> dict[str, str]:
    return dict(reply.headers)


async def test_a_key_over_its_rpm_gets_429_with_retry_after_and_remaining_headers() -> None:
    clock = Clock()
    sim = Simulator(PROFILE, clock=clock)
    sim.keys.configure({"sk-a": KeyLimit(rpm=2)})
    first = send(sim, "sk-a", request("one"))
    await finish(first)
    assert headers(first)["x-ratelimit-remaining-requests"] == "1"
    assert headers(first)["x-ratelimit-limit-requests"] == "2"
    await finish(send(sim, "sk-a", request("two")))
    clock.now += 10
    refused = send(sim, "sk-a", request("three"))
    assert refused.status == 429 and headers(refused)["retry-after"] == "50"
    assert headers(refused)["x-ratelimit-remaining-requests"] == "0"
    assert b"rate_limit_reached_error" in (refused.body or b"") and b"max RPM: 2" in (refused.body or b"")
    assert send(sim, "sk-other", request()).status == 200  # other keys have their own limits (none)
    clock.now += 50.5
    assert send(sim, "sk-a", request("four")).status == 200
    stats = sim.keys.stats()
    assert [s["rate_limited"] for s in stats.values()] == [1, 0]
    assert all("sk-" not in label for label in stats)


async def test_tokens_per_minute_count_the_prompt_and_max_tokens() -> None:
    sim = Simulator(PROFILE, clock=Clock())
    size = len(request(max_tokens=500))
    sim.keys.configure({"sk-a": KeyLimit(tpm=(size + 3) // 4 + 500 + 10)})
    await finish(send(sim, "sk-a", request(max_tokens=500)))
    refused = send(sim, "sk-a", request(max_tokens=20))
    assert refused.status == 429 and b"max TPM" in (refused.body or b"")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_concurrency_slot_is_held_until_the_answer_ends(stream: bool) -> None:
    sim = Simulator(profile_from("moonshot-standard", ttft_s=0.05, tokens_per_s=0), clock=Clock())
    sim.keys.configure({"sk-a": KeyLimit(max_concurrency=1)})
    first = send(sim, "sk-a", request(stream=stream))
    running = asyncio.ensure_future(finish(first))
    await asyncio.sleep(0.01)
    assert send(sim, "sk-a", request(stream=stream)).status == 429
    await running
    assert send(sim, "sk-a", request(stream=stream)).status == 200


async def test_a_revoked_key_gets_401_and_a_fault_can_aim_at_one_key() -> None:
    sim = Simulator(PROFILE, clock=Clock())
    sim.keys.configure_json({"revoked": ["sk-gone"]})
    assert send(sim, "sk-gone", request()).status == 401
    sim.add_fault(Fault(status=429, retry_after=3, key="sk-a", count=-1))
    assert send(sim, "sk-b", request()).status == 200
    storm = send(sim, "sk-a", request())
    assert storm.status == 429 and headers(storm)["retry-after"] == "3"
    assert all("sk-a" not in str(f) for f in sim.faults.pending())
    with pytest.raises(ValueError, match="positive integer"):
        sim.keys.configure_json({"limits": {"sk-a": {"rpm": 0}}})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_each_key_has_its_own_prompt_cache(stream: bool) -> None:
    sim = Simulator(PROFILE, clock=Clock())
    sim.keys.configure({"sk-a": KeyLimit(), "sk-b": KeyLimit()})
    assert (await finish(send(sim, "sk-a", request("first", stream))))["usage"]["cached_tokens"] == 0
    again = await finish(send(sim, "sk-a", request("second", stream)))
    assert again["usage"]["cached_tokens"] > 200
    other = await finish(send(sim, "sk-b", request("third", stream)))
    assert other["usage"]["cached_tokens"] == 0  # another key, another account's cache
