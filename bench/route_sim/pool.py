"""The key-pool scenario: one Moonshot upstream behind three keys with tier-1-like limits, each key
with its own prompt cache, under an agentic workload of tool loops.

Virtual time, no sockets. Every request is planned by the real router (prefix affinity per key) and
given a key by the real key picker over the memory quota state, exactly as the pipeline does; the
provider is the simulator's own per-key accounting (:class:`simulator.keys.KeyQuotas`: a rolling
minute of requests and prompt + max_tokens, concurrent requests) with a prefix cache per key. A key
the provider refuses (429) would rest and the request moves to the next key, as in the pipeline; a
request no key has room for waits for the Retry-After the gateway would answer and tries again (the
client's retry), which counts in its time to first token.

Reported per key selection (round_robin, least_loaded, cache_aware): cached tokens, spend, the TTFT
SLO met, requests sent over a key's quota (provider 429s), and 429s a client got while some key had
room for its request.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.route_sim.sim import MILLION, TOOLS, Clock, PrefixCache, _text
from gateway.metering.tokens import upper_bound_tokens
from gateway.policy.store import Candidate, Route, Tenant
from gateway.routing import affinity
from gateway.routing.keys import KeyPicker, Lease, NoKey, Pool, PoolKeySpec, held_by_key, key_tokens
from gateway.routing.router import Router, Traits
from gateway.state.key_quota import WINDOW_S, KeyLimits, MemoryKeyQuotaState
from gateway.state.memory import MemoryKeyValueState
from gateway.upstreams.priors import Speed
from gateway.upstreams.usage import Usage
from simulator.keys import KeyLimit, KeyQuotas

SELECTIONS = ("round_robin", "least_loaded", "cache_aware")
# Moonshot's tier 1 (cumulative recharge $10): 50 concurrent requests, 200 requests and 2,000,000
# tokens a minute per key; kimi-k2-thinking's prices per 1M tokens
RPM, TPM, CONCURRENCY = 200, 2_000_000, 50
MISS, HIT, OUT = Decimal("0.60"), Decimal("0.15"), Decimal("2.50")
TTFT_S, PREFILL_TPS, DECODE_TPS = 0.6, 4000.0, 35.0
SLO_TTFT_MS = 6000.0
MAX_TOKENS = 8000
CANDIDATE = Candidate("moonshot", "kimi-k2-thinking", "kimi-k2-thinking")


@dataclass
class PoolOutcome:
    selection: str
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    spend: Decimal = Decimal(0)
    slo_met: int = 0
    over_quota: int = 0  # requests a key's provider refused with 429 (sent over its quota)
    client_429_with_room: int = 0  # a client refused while some key had room for the request
    waited: int = 0  # requests that waited for a key (no key had room)
    served: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "selection": self.selection,
            "requests": self.requests,
            "cached_tokens": self.cached,
            "cache_hit_share": self.cached / self.prompt if self.prompt else 0.0,
            "spend_usd": float(self.spend),
            "slo_attainment": self.slo_met / self.requests if self.requests else 1.0,
            "over_quota": self.over_quota,
            "client_429_with_room": self.client_429_with_room,
            "waited": self.waited,
            "served": dict(sorted(self.served.items())),
        }


@dataclass
class Loop:
    cid: int
    start: float
    turns: int
    seed: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0


def make_loops(conversations: int, seed: int, window_s: float, turns: tuple[int, int] = (5, 40)) -> list[Loop]:
    """Tool loops of ``turns`` (inclusive range) turns, starting within ``window_s``."""
    rng = random.Random(seed)
    return [
        Loop(c, rng.uniform(0, window_s), rng.randint(*turns), rng.randrange(1 << 30)) for c in range(conversations)
    ]


def run_pool(selection: str, loops: list[Loop]) -> PoolOutcome:
    return asyncio.run(_run(selection, [Loop(lp.cid, lp.start, lp.turns, lp.seed) for lp in loops]))


async def _run(selection: str, loops: list[Loop]) -> PoolOutcome:
    clock = Clock()
    secrets = {label: f"sk-sim-{label}" for label in "abc"}
    provider = KeyQuotas(clock)
    provider.configure({s: KeyLimit(RPM, TPM, CONCURRENCY) for s in secrets.values()})
    caches = {label: PrefixCache(300.0, 256) for label in secrets}
    pool = Pool(
        "moonshot",
        tuple(PoolKeySpec(label, KeyLimits(f"moonshot/{label}/sim", RPM, TPM, CONCURRENCY)) for label in secrets),
        selection,
    )
    picker = KeyPicker({"moonshot": pool}, MemoryKeyQuotaState(), clock)
    router = Router(
        {"moonshot": Traits(Speed(TTFT_S, DECODE_TPS, PREFILL_TPS))},
        None,
        MemoryKeyValueState(clock=clock),
        clock=clock,
        wall=clock,
    )
    router.use_keys(picker)
    route = Route("agent", (CANDIDATE,), "cost", SLO_TTFT_MS)
    tenant = Tenant("bench", {"agent": route}, Path("bench.yaml"))
    out = PoolOutcome(selection)
    epoch = clock.now
    # events: (time, order, kind, payload); kind 0 = a turn arrives, 1 = an answer ends (free the key)
    events: list[tuple[float, int, int, Any]] = [(epoch + lp.start, lp.cid, 0, lp) for lp in loops]
    heapq.heapify(events)
    order = len(loops)
    waiting_since: dict[int, float] = {}
    while events:
        at, _, kind, payload = heapq.heappop(events)
        clock.now = at
        if kind == 1:
            lease, secret, usage = payload
            await picker.release(lease, usage)
            provider.release(secret)
            continue
        loop: Loop = payload
        rng = random.Random(loop.seed + loop.turn)
        if loop.turn == 0 and not loop.messages:
            loop.messages = [
                {"role": "system", "content": _text(rng, rng.randint(1500, 4000), f"system {loop.cid}")},
                {"role": "user", "content": _text(rng, rng.randint(50, 400), f"task {loop.cid}")},
            ]
        body = {"model": "agent", "messages": loop.messages, "tools": TOOLS, "max_tokens": MAX_TOKENS}
        plan = await router.plan(tenant, route, body, 0)
        # selections that ignore caches need no prefix hashes to choose; the provider's cache still does
        chain = plan.chain if plan.chain is not None else affinity.prefix_chain(body)
        tokens = [max(1, size // affinity.BYTES_PER_TOKEN) for size in chain.sizes]
        raw_len = chain.sizes[-1]
        need = upper_bound_tokens(b" " * raw_len) + MAX_TOKENS  # the pipeline's bound
        provider_need = tokens[-1] + MAX_TOKENS  # what the provider counts
        option = plan.options[0]
        held = held_by_key(plan.held, option.label)
        per_key = key_tokens(raw_len, MAX_TOKENS, held, held_by_key(plan.held_bytes, option.label))
        lease = await _take(
            picker, pool, held, need, per_key, f"{loop.cid}:{loop.turn}", provider, secrets, provider_need, out
        )
        if isinstance(lease, NoKey):  # the client retries after the Retry-After the gateway answered
            waiting_since.setdefault(loop.cid, at)
            wait = float(max(1, math.ceil(lease.wait_s))) if lease.wait_s is not None else WINDOW_S
            order += 1
            heapq.heappush(events, (at + wait, order, 0, loop))
            continue
        secret = secrets[lease.key.label]
        first = waiting_since.pop(loop.cid, at)
        completion = rng.randint(150, 900)
        cache = caches[lease.key.label]
        cached = cache.peek(chain.hashes, tokens, at)
        cache.store(chain.hashes, tokens, at)
        prompt = tokens[-1]
        ttft = (at - first) + TTFT_S + (prompt - cached) / PREFILL_TPS
        total = ttft - (at - first) + completion / DECODE_TPS
        out.requests += 1
        out.prompt += prompt
        out.cached += cached
        out.spend += ((prompt - cached) * MISS + cached * HIT + completion * OUT) / MILLION
        out.slo_met += ttft * 1000 <= SLO_TTFT_MS
        out.served[lease.key.label] = out.served.get(lease.key.label, 0) + 1
        option.key, option.held_tokens = lease.key.label, lease.held
        clock.now = at + total
        usage = Usage(prompt, completion, cached, 0)
        await router.served(tenant, plan, option, ttft, total - ttft, usage)
        clock.now = at
        order += 1
        heapq.heappush(events, (at + total, order, 1, (lease, secret, usage)))
        loop.turn += 1
        if loop.turn < loop.turns:
            loop.messages = [
                *loop.messages,
                {"role": "assistant", "content": _text(rng, completion // 3, f"answer {loop.cid}.{loop.turn}")},
                {
                    "role": "tool",
                    "tool_call_id": f"call_{loop.turn}",
                    "content": _text(rng, rng.randint(100, 2500), "result"),
                },
            ]
            order += 1
            heapq.heappush(events, (at + total + rng.uniform(0.3, 4.0), order, 0, loop))
    return out


async def _take(
    picker: KeyPicker,
    pool: Pool,
    held: dict[str, int],
    need: int,
    per_key: dict[str, int],
    lease_id: str,
    provider: KeyQuotas,
    secrets: dict[str, str],
    provider_need: int,
    out: PoolOutcome,
) -> Lease | NoKey:
    """A key the provider accepted, as the pipeline gets one (a 429 rests the key, the next is tried),
    or why the gateway would answer the client 429."""
    failed: set[str] = set()
    while True:
        lease = await picker.take(pool, held, need, f"{lease_id}:{len(failed)}", frozenset(failed), MAX_TOKENS, per_key)
        if not isinstance(lease, Lease):
            if any(provider.has_room(s, provider_need) for s in secrets.values()):
                out.client_429_with_room += 1
            out.waited += 1
            return lease
        admission = provider.admit(secrets[lease.key.label], provider_need)
        if admission.status == 200:
            await picker.observed(lease, None)
            return lease
        out.over_quota += 1
        retry = dict(admission.headers).get("retry-after")
        await picker.refused(lease, admission.status, retry)
        await picker.release(lease, None)
        failed.add(lease.key.label)


def pool_table(rows: list[dict[str, Any]]) -> str:
    by = {r["selection"]: r for r in rows}
    rr = by.get("round_robin")
    lines = [
        "| key selection | cached tokens | vs round-robin | cache-hit share | spend USD | TTFT SLO met "
        "| sent over quota | client 429s with a key free | waited for a key | served (a / b / c) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs = f"{r['cached_tokens'] / rr['cached_tokens']:.0%}" if rr and rr["cached_tokens"] else ""
        served = " / ".join(str(r["served"].get(k, 0)) for k in "abc")
        lines.append(
            f"| {r['selection']} | {r['cached_tokens']:,} | {vs} | {r['cache_hit_share']:.1%} | {r['spend_usd']:.2f} | "
            f"{r['slo_attainment']:.2%} | {r['over_quota']} | {r['client_429_with_room']} | {r['waited']} | {served} |"
        )
    return "\n".join(lines)
