#!/usr/bin/env python3
"""What key selection costs a request: one upstream, a pool of three keys, memory state.

Times, per request, each call a pooled request makes that a single-key one does not, on the
request body of the overhead benchmark (bench/bodies/nonstream.json) grown into a 10-turn tool loop
whose prefix key ``b`` holds:

  take+release   KeyPicker.take (order, quota check and count) and KeyPicker.release (slot, metrics,
                 the grant adjusted to the provider's count)
  plan (pool)    Router.plan on the one-candidate route of a pooled upstream: it hashes the prompt's
                 prefix chain and reads the affinity entries, which a single-key upstream skips
  plan (single)  the same plan for the same upstream without a pool: the baseline
  plan 2 (pool), plan 2 (single)
                 a two-candidate cost route (the pooled upstream first, another upstream second):
                 the router hashes the prefix chain for any such route, pool or not

Each figure is the median (and p90) over ``--runs`` batches of ``--batch`` calls, in µs per call.

  .venv/bin/python bench/key_pool.py [--runs 200] [--batch 200]
  valgrind --tool=callgrind .venv/bin/python bench/key_pool.py --loop 2000   # and 12000: instructions
      # of take+release = the difference of the two "Collected" counts / 10,000 (no wall time)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.policy.store import Candidate, Route, Tenant
from gateway.routing.keys import KeyPicker, Lease, Pool, PoolKeySpec, held_by_key, key_tokens
from gateway.routing.router import Router, Traits
from gateway.state.key_quota import KeyLimits, MemoryKeyQuotaState
from gateway.state.memory import MemoryKeyValueState
from gateway.upstreams.priors import Speed
from gateway.upstreams.usage import Usage

HERE = Path(__file__).resolve().parent
CANDIDATE = Candidate("moonshot", "kimi-k2-thinking", "kimi-k2-thinking")
OTHER = Candidate("other", "kimi-k2-thinking", "kimi-k2-thinking")


def tool_loop_body() -> dict[str, Any]:
    body = orjson.loads((HERE / "bodies" / "nonstream.json").read_bytes())
    body["model"] = "k2"
    for turn in range(10):
        body["messages"] += [
            {"role": "assistant", "content": f"step {turn}: reading the next file"},
            {"role": "user", "content": f"tool result {turn}: " + "line of output\n" * 20},
        ]
    return body


async def timed(call: Callable[[], Awaitable[None]], runs: int, batch: int) -> tuple[float, float]:
    per_call: list[float] = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        for _ in range(batch):
            await call()
        per_call.append((time.perf_counter_ns() - start) / batch / 1000)
    per_call.sort()
    return statistics.median(per_call), per_call[int(0.9 * (len(per_call) - 1))]


async def main(runs: int, batch: int, loop: int = 0) -> None:
    # tier-1 limits a benchmark loop never reaches: the counts are kept, as in production
    limits = {"rpm": 10**9, "tpm": 10**15, "max_concurrency": 10**6}
    keys = tuple(PoolKeySpec(label, KeyLimits(f"moonshot/{label}/fp", **limits)) for label in "abc")
    pool = Pool("moonshot", keys, "cache_aware")
    picker = KeyPicker({"moonshot": pool}, MemoryKeyQuotaState())
    traits = {"moonshot": Traits(Speed(0.6, 35.0, 4000.0)), "other": Traits(Speed(0.6, 35.0, 4000.0))}
    route = Route("k2", (CANDIDATE,), "cost")
    route2 = Route("k2", (CANDIDATE, OTHER), "cost")
    tenant = Tenant("bench", {"k2": route}, Path("bench.yaml"))
    body = tool_loop_body()
    raw = orjson.dumps(body)
    pooled = Router(traits, None, MemoryKeyValueState())
    pooled.use_keys(picker)
    single = Router(traits, None, MemoryKeyValueState())
    # key b served this conversation's prefix (the previous turn) on the pooled router
    plan = await pooled.plan(tenant, route, body, len(raw))
    option = plan.options[0]
    option.key = "b"
    await pooled.served(tenant, plan, option, 0.5, 1.0, Usage(3000, 100, 0, 0))
    plan = await pooled.plan(tenant, route, body, len(raw))
    held = held_by_key(plan.held, option.label)
    assert held.get("b"), "the prefix must be held by key b"
    per_key = key_tokens(len(raw), 1000, held, held_by_key(plan.held_bytes, option.label))
    usage = Usage(3000, 100, 2900, 0)
    n = 0
    if loop:  # only the key choice, ``loop`` times, for an instruction count under callgrind
        for i in range(loop):
            lease = await picker.take(pool, held, len(raw) // 2 + 1016, f"loop-{i}", frozenset(), 1000, per_key)
            assert isinstance(lease, Lease)
            await picker.release(lease, usage)
        return

    async def take_release() -> None:
        nonlocal n
        n += 1
        lease = await picker.take(pool, held, len(raw) // 2 + 1016, f"req-{n}", frozenset(), 1000, per_key)
        assert isinstance(lease, Lease) and lease.key.label == "b"
        await picker.release(lease, usage)

    async def plan_pooled() -> None:
        await pooled.plan(tenant, route, body, len(raw))

    async def plan_single() -> None:
        await single.plan(tenant, route, body, len(raw))

    async def plan2_pooled() -> None:
        await pooled.plan(tenant, route2, body, len(raw))

    async def plan2_single() -> None:
        await single.plan(tenant, route2, body, len(raw))

    rows = [
        ("take+release", await timed(take_release, runs, batch)),
        ("plan (pool)", await timed(plan_pooled, runs, batch)),
        ("plan (single)", await timed(plan_single, runs, batch)),
        ("plan 2 (pool)", await timed(plan2_pooled, runs, batch)),
        ("plan 2 (single)", await timed(plan2_single, runs, batch)),
    ]
    print(f"| call | p50 µs | p90 µs |  ({len(raw):,}-byte body, {runs} runs of {batch})\n| --- | ---: | ---: |")
    for name, (p50, p90) in rows:
        print(f"| {name} | {p50:.1f} | {p90:.1f} |")
    one = rows[0][1][0] + rows[1][1][0] - rows[2][1][0]
    two = rows[0][1][0] + rows[3][1][0] - rows[4][1][0]
    print(f"\nadded per pooled request at p50, one-candidate route: {one:.1f} µs")
    print("  (take+release + plan (pool) - plan (single))")
    print(f"added per pooled request at p50, two-candidate route: {two:.1f} µs")
    print("  (take+release + plan 2 (pool) - plan 2 (single))")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--loop", type=int, default=0, help="only run take+release this many times (callgrind)")
    args = ap.parse_args()
    asyncio.run(main(args.runs, args.batch, args.loop))
