"""Replay a generated agentic workload through the real router against simulated upstreams.

Virtual time, no sockets: every request is planned by :class:`gateway.routing.router.Router` (the
code the server runs), served by a model of an upstream (Moonshot's prices, a prefix cache with a
lifetime, prefill and decode speeds, a vLLM with a fixed number of slots that queues beyond them),
and the outcome is fed back to the router exactly as the pipeline does (speeds, cached tokens,
prefix affinity, vLLM load scrapes every two seconds).

Workload: conversations arrive over a window; each is a tool loop of 5-50 turns whose prompt grows
by the assistant's answer and a tool result every turn. Each conversation belongs to one virtual
model with its own TTFT SLO (interactive, agent, batch).
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

from gateway.metering.prices import PriceBook, PriceEntry
from gateway.policy.store import Candidate, Route, Tenant
from gateway.routing import affinity
from gateway.routing.load import Load, apply_load
from gateway.routing.router import Router, Traits
from gateway.state.memory import MemoryKeyValueState
from gateway.upstreams.priors import Speed
from gateway.upstreams.usage import Usage

MILLION = Decimal(1_000_000)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} in the repository",
            "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}},
        },
    }
    for name in ("read_file", "grep", "run_tests", "edit_file")
]
SCRAPE_EVERY_S = 2.0


@dataclass(frozen=True)
class UpstreamModel:
    """How one simulated upstream behaves and what it charges (USD per 1M tokens)."""

    label: str
    miss: str
    hit: str
    out: str
    ttft_s: float  # first token of a fully cached prompt
    prefill_tps: float  # uncached prompt tokens per second
    tokens_per_s: float
    slots: int = 0  # concurrent requests served; beyond them requests queue (0 = unlimited)
    cache_ttl_s: float = 300.0
    cache_min_tokens: int = 256


UPSTREAMS = (
    UpstreamModel("moonshot/kimi-k2-thinking", "0.60", "0.15", "2.50", 0.6, 4000, 35),
    UpstreamModel("moonshot-turbo/kimi-k2-thinking-turbo", "1.15", "0.15", "8.00", 0.3, 8000, 90),
    # self-hosted: GPU cost amortized ($8/h over ~5,000 tok/s), cached input at a tenth; 32 sequences
    # at once (the simulator's vllm profile), the rest wait in its queue
    UpstreamModel("vllm/kimi-k2-thinking", "0.44", "0.044", "0.44", 0.2, 6000, 50, slots=32),
)
# the single-upstream baselines and the upstream each sends everything to
BASELINES = {"always-standard": UPSTREAMS[0].label, "always-turbo": UPSTREAMS[1].label}
WITHOUT_TURBO = tuple(u for u in UPSTREAMS if u.label != UPSTREAMS[1].label)
SLO_MIX = (("interactive", 2500.0, 0.3), ("agent", 6000.0, 0.5), ("batch", None, 0.2))


class PrefixCache:
    """A provider's automatic prefix cache: prefix hash -> (tokens, expiry)."""

    def __init__(self, ttl_s: float, min_tokens: int) -> None:
        self.ttl_s = ttl_s
        self.min_tokens = min_tokens
        self.table: dict[str, tuple[int, float]] = {}

    def peek(self, hashes: tuple[str, ...], tokens: list[int], now: float) -> int:
        for i in range(len(hashes) - 1, -1, -1):
            entry = self.table.get(hashes[i])
            if entry is not None and entry[1] > now:
                return entry[0]
        return 0

    def store(self, hashes: tuple[str, ...], tokens: list[int], now: float) -> None:
        if tokens and tokens[-1] >= self.min_tokens:
            self.table[hashes[-1]] = (tokens[-1], now + self.ttl_s)


class Server:
    """One upstream in virtual time."""

    def __init__(self, model: UpstreamModel) -> None:
        self.model = model
        self.cache = PrefixCache(model.cache_ttl_s, model.cache_min_tokens)
        self.busy: list[float] = []  # end times of requests holding a slot (a heap)
        self.queued: list[tuple[float, float]] = []  # (arrival, start) of requests that waited

    def start_time(self, now: float) -> float:
        if not self.model.slots:
            return now
        while self.busy and self.busy[0] <= now:
            heapq.heappop(self.busy)
        if len(self.busy) < self.model.slots:
            return now
        return self.busy[0]

    def ttft_at(self, now: float, prompt: int, cached: int) -> float:
        wait = self.start_time(now) - now
        return wait + self.model.ttft_s + (prompt - cached) / self.model.prefill_tps

    def serve(
        self, now: float, hashes: tuple[str, ...], tokens: list[int], completion: int
    ) -> tuple[int, float, float]:
        """Serve a request arriving at ``now``: (cached tokens, ttft, total time)."""
        cached = self.cache.peek(hashes, tokens, now)
        start = self.start_time(now)
        if self.model.slots and start > now:
            heapq.heappop(self.busy)
            self.queued.append((now, start))
        ttft = start - now + self.model.ttft_s + (tokens[-1] - cached) / self.model.prefill_tps
        total = ttft + completion / self.model.tokens_per_s
        if self.model.slots:
            heapq.heappush(self.busy, now + total)
        self.cache.store(hashes, tokens, now)
        return cached, ttft, total

    def load(self, now: float) -> Load:
        running = sum(1 for end in self.busy if end > now)
        waiting = sum(1 for arrival, start in self.queued if arrival <= now < start)
        self.queued = [q for q in self.queued if q[1] > now]
        return Load(float(waiting), float(running), 0.0)


@dataclass
class Conversation:
    cid: int
    start: float
    turns: int
    model: str
    slo_ms: float | None
    seed: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # per element (tools first), cumulative later
    turn: int = 0


def _slo_class(r: float) -> tuple[str, float | None]:
    acc = 0.0
    for name, slo, share in SLO_MIX:
        acc += share
        if r <= acc:
            return name, slo
    return SLO_MIX[-1][0], SLO_MIX[-1][1]


def make_workload(conversations: int, seed: int, window_s: float) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for cid in range(conversations):
        name, slo = _slo_class(rng.random())
        out.append(Conversation(cid, rng.uniform(0, window_s), rng.randint(5, 50), name, slo, rng.randrange(1 << 30)))
    return out


def _text(rng: random.Random, tokens: int, tag: str) -> str:
    return (tag + " " + "".join(rng.choice("abcdefghij ") for _ in range(64)) * (tokens * 4 // 64 + 1))[: tokens * 4]


@dataclass
class Outcome:
    spend: Decimal = Decimal(0)
    prompt: int = 0
    cached: int = 0
    requests: int = 0
    slo_total: int = 0  # requests with a TTFT SLO some candidate could have met
    slo_met: int = 0
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)


def _prices(upstreams: tuple[UpstreamModel, ...]) -> PriceBook:
    import datetime as dt

    return PriceBook(
        [
            PriceEntry(
                target=u.label, effective_from=dt.date(2025, 1, 1), input_miss=u.miss, input_hit=u.hit, output=u.out
            )
            for u in upstreams
        ]
    )


def _candidates(upstreams: tuple[UpstreamModel, ...]) -> tuple[Candidate, ...]:
    out = []
    for u in upstreams:
        upstream, _, model = u.label.partition("/")
        out.append(Candidate(upstream, model, model))
    return tuple(out)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def run(
    policy: str, workload: list[Conversation], seed: int = 0, upstreams: tuple[UpstreamModel, ...] = UPSTREAMS
) -> Outcome:
    """Replay ``workload`` with a router strategy (cost, latency, balanced, pinned) or a baseline
    (round-robin, random, always-standard, always-turbo, latency-no-cache, balanced-no-cache)."""
    if policy in BASELINES and not any(u.label == BASELINES[policy] for u in upstreams):
        raise ValueError(f"{policy} needs {BASELINES[policy]}, which is not among the upstreams")
    return asyncio.run(_run(policy, workload, seed, upstreams))


async def _run(policy: str, workload: list[Conversation], seed: int, upstreams: tuple[UpstreamModel, ...]) -> Outcome:
    clock = Clock()
    epoch = clock.now
    prices = _prices(upstreams)
    candidates = _candidates(upstreams)
    servers = {u.label: Server(u) for u in upstreams}
    traits = {
        c.upstream: Traits(Speed(u.ttft_s, u.tokens_per_s, u.prefill_tps), u.cache_ttl_s)
        for c, u in zip(candidates, upstreams, strict=True)
    }
    router = Router(traits, prices, MemoryKeyValueState(clock=clock), clock=clock, wall=clock)
    strategy = policy
    if policy.endswith("-no-cache"):  # the same strategy, blind to prefix caches (a baseline)
        strategy, router.cache_aware = policy.removesuffix("-no-cache"), False
    routes = {name: Route(name, candidates, strategy, slo) for name, slo, _ in SLO_MIX}
    tenant = Tenant("bench", routes, Path("bench.yaml"))
    rng = random.Random(seed)
    outcome = Outcome()
    rr = 0
    next_scrape = epoch
    vllm = next(c for c in candidates if c.upstream == "vllm")
    events = [(epoch + c.start, c.cid) for c in workload]
    heapq.heapify(events)
    by_id = {c.cid: c for c in workload}
    while events:
        at, cid = heapq.heappop(events)
        clock.now = at
        conv = by_id[cid]
        crng = random.Random(conv.seed + conv.turn)
        if conv.turn == 0:
            conv.messages = [
                {"role": "system", "content": _text(crng, crng.randint(1500, 4000), f"system {cid}")},
                {"role": "user", "content": _text(crng, crng.randint(50, 400), f"task {cid}")},
            ]
        completion = crng.randint(150, 900)
        body = {"model": conv.model, "messages": conv.messages, "tools": TOOLS, "max_tokens": 8000}
        chain = affinity.prefix_chain(body)
        tokens = [max(1, size // affinity.BYTES_PER_TOKEN) for size in chain.sizes]
        while at >= next_scrape:  # the gateway scrapes vLLM's /metrics on an interval
            apply_load(router, vllm.upstream, servers[vllm.label].load(next_scrape))
            next_scrape += SCRAPE_EVERY_S
        if policy in ("round-robin", "random", "always-standard", "always-turbo"):
            if policy == "round-robin":
                chosen, rr = candidates[rr % len(candidates)], rr + 1
            elif policy == "random":
                chosen = rng.choice(candidates)
            else:
                chosen = next(c for c in candidates if c.label == BASELINES[policy])
            plan = option = None
        else:
            route = routes[conv.model]
            plan = await router.plan(tenant, route, body, tokens[-1] * affinity.BYTES_PER_TOKEN)
            option = plan.options[0]
            chosen = option.candidate
            router.dispatched(option)
        # could any candidate have met the TTFT SLO at this moment?
        if conv.slo_ms is not None:
            best = min(s.ttft_at(at, tokens[-1], s.cache.peek(chain.hashes, tokens, at)) for s in servers.values())
            feasible = best * 1000 <= conv.slo_ms
        else:
            feasible = False
        server = servers[chosen.label]
        cached, ttft, total = server.serve(at, chain.hashes, tokens, completion)
        u = server.model
        prompt = tokens[-1]
        outcome.spend += (
            (prompt - cached) * Decimal(u.miss) + cached * Decimal(u.hit) + completion * Decimal(u.out)
        ) / MILLION
        outcome.prompt += prompt
        outcome.cached += cached
        outcome.requests += 1
        outcome.ttfts.append(ttft)
        outcome.latencies.append(total)
        outcome.served[chosen.label] = outcome.served.get(chosen.label, 0) + 1
        if feasible:
            outcome.slo_total += 1
            outcome.slo_met += ttft * 1000 <= conv.slo_ms  # type: ignore[operator]
        if plan is not None and option is not None:
            clock.now = at + total  # the answer settles when it ends
            usage = Usage(prompt, completion, cached, 0)
            await router.served(tenant, plan, option, ttft, total - ttft, usage)
        # the next turn: the assistant's answer and a tool result join the prompt
        conv.turn += 1
        if conv.turn < conv.turns:
            conv.messages = [
                *conv.messages,
                {"role": "assistant", "content": _text(crng, completion // 3, f"answer {cid}.{conv.turn}")},
                {
                    "role": "tool",
                    "tool_call_id": f"call_{conv.turn}",
                    "content": _text(crng, crng.randint(100, 2500), "result"),
                },
            ]
            heapq.heappush(events, (at + total + crng.uniform(0.3, 4.0), cid))
    return outcome


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]


POLICIES = (
    "balanced",
    "cost",
    "latency",
    "pinned",
    "round-robin",
    "random",
    "always-standard",
    "always-turbo",
    "latency-no-cache",
    "balanced-no-cache",
)


def report(outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    rows = []
    for name, o in outcomes.items():
        rows.append(
            {
                "policy": name,
                "requests": o.requests,
                "spend_usd": float(o.spend),
                "cache_hit_share": o.cached / o.prompt if o.prompt else 0.0,
                "slo_attainment": o.slo_met / o.slo_total if o.slo_total else 1.0,
                "slo_feasible_requests": o.slo_total,
                "mean_ttft_s": sum(o.ttfts) / len(o.ttfts) if o.ttfts else 0.0,
                "p95_ttft_s": percentile(o.ttfts, 0.95),
                "p95_latency_s": percentile(o.latencies, 0.95),
                "served": dict(sorted(o.served.items())),
            }
        )
    return rows
