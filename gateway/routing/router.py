"""The router: builds the ranked plan for a request and learns from what happened.

The plan is computed per request, so the cheap cases stay cheap: a route with one candidate, or a
``pinned`` route, is ordered without estimating anything (only dead candidates and open breakers are
skipped); prefix hashes are computed only for strategies that price cache hits. The pipeline tries
the plan in order until one candidate answers before any byte reached the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import LoadedConfig, ModelShaping
from gateway.metering.budget import Budgets, lines_for
from gateway.metering.prices import PriceBook
from gateway.metering.tokens import requested_max_tokens
from gateway.observability import log
from gateway.policy.store import Route, Tenant
from gateway.routing import affinity
from gateway.routing.expected import Option, estimate
from gateway.routing.keys import KeyPicker, pools_from_config
from gateway.routing.metrics import BREAKER_OPENED
from gateway.routing.retired import Retired
from gateway.routing.stats import COLD_COMPLETION_TOKENS, MemoryRouteStats, RouteStats
from gateway.routing.strategies import CHEAPNESS, STRATEGIES, prefix_holder, stay_with_prefix
from gateway.state.base import KeyValueState
from gateway.state.key_quota import KeyQuotaState, MemoryKeyQuotaState
from gateway.state.stats_exchange import StatsExchange
from gateway.upstreams.priors import Speed, prior_of
from gateway.upstreams.usage import Usage

# the failure kind of a 404 for the model: the candidate is dead (a retired id), the request moves on
RETIRED = "404"
_WHY = {RETIRED: "404 for the model: retired"}

# strategies that expect cache hits (cheaper input, shorter prefill), so need the prompt's prefix hashes
_CACHE_AWARE = frozenset(("cost", "balanced", "latency"))
# strategies that keep a tool loop on the candidate holding its prefix (strategies.stay_with_prefix)
_STICKY = frozenset(("cost", "balanced"))


@dataclass(frozen=True, slots=True)
class Traits:
    """What the router needs of one upstream from the config."""

    prior: Speed
    cache_ttl_s: float = 300.0
    shaping: dict[str, ModelShaping] = field(default_factory=dict)


@dataclass(slots=True)
class Plan:
    strategy: str  # the strategy in effect (a budget step may have made it cheaper)
    options: list[Option]  # in the order to try
    excluded: list[Option]  # dead or behind an open breaker
    reason: str  # why options[0] leads
    slo_ttft_ms: float | None = None
    slo_total_ms: float | None = None
    chain: affinity.PrefixChain | None = None
    estimated: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # label -> failure kind, filled while trying
    held: dict[str, int] = field(default_factory=dict)  # label -> prompt tokens of this prefix it served
    held_bytes: dict[str, int] = field(default_factory=dict)  # label -> that prefix's canonical bytes
    holder: str | None = None  # the live candidate holding the conversation's longest prefix
    kept: bool = False  # the holder was moved first, against the strategy's own order (affinity)

    def reason_for(self, option: Option) -> str:
        """The route reason of the option actually used (a failover names what failed before it, and how)."""
        if option is self.options[0]:
            return self.reason
        before = [self._failed_text(o.label) for o in self.options[: self.options.index(option)]]
        return (
            f"{self.strategy}: failover to candidate {self.options.index(option) + 1} after {', '.join(before)} failed"
        )

    def _failed_text(self, label: str) -> str:
        kind = self.failed.get(label)
        return f"{label} ({_WHY.get(kind, kind)})" if kind else label


def budget_strategy(strategy: str, tenant: Tenant, fraction: float | None) -> tuple[str, str]:
    """The strategy after the tenant's budget steps, and a note when a step changed it."""
    if fraction is None:
        return strategy, ""
    for step in reversed(tenant.budget_steps):  # the lowest threshold crossed wins
        if fraction < step.remaining_below:
            if CHEAPNESS[step.strategy] > CHEAPNESS[strategy]:
                return step.strategy, (
                    f"; budget {fraction:.0%} left (< {step.remaining_below:.0%}): {strategy} -> {step.strategy}"
                )
            return strategy, ""
    return strategy, ""


async def remaining_fraction(budgets: Budgets, tenant: Tenant, app: str | None, now: float) -> float | None:
    """The smallest remaining/cap over the budget lines that cap this request (None: no steps)."""
    if not tenant.budget_steps or tenant.budget is None:
        return None
    fractions = []
    for line in lines_for(tenant.name, tenant.budget, app, now):
        used = await budgets.state.used(line.limit.key)
        fractions.append(max(0.0, (line.limit.cap - used) / line.limit.cap))
    return min(fractions) if fractions else None


def slo_text(ttft_ms: float | None, total_ms: float | None) -> str:
    parts = [f"ttft <= {ttft_ms:g} ms"] if ttft_ms is not None else []
    if total_ms is not None:
        parts.append(f"total <= {total_ms:g} ms")
    return "the SLO (" + ", ".join(parts) + ")" if parts else "the SLO (none set)"


class Router:
    def __init__(
        self,
        traits: dict[str, Traits],
        prices: PriceBook | None,
        kv: KeyValueState,
        stats: RouteStats | None = None,
        dead: Retired | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.traits = traits
        self.prices = prices
        self.kv = kv
        self.stats: RouteStats = stats if stats is not None else MemoryRouteStats()
        self.dead: Retired = dead if dead is not None else Retired()
        self.clock = clock
        self.wall = wall
        self.cache_aware = True  # False: expect no cache hits anywhere (a baseline for the benchmark)
        # self-hosted vLLM servers whose /metrics are scraped (routing/load.py), by upstream name
        self.loads: dict[str, Any] = {}
        self._default = Traits(Speed(1.5, 40.0))
        self.keys: KeyPicker | None = None  # upstreams with a key pool (routing/keys.py)
        # of those, every one: where the prefix is held bounds a request's tokens per key, and a
        # cache_aware pool keeps the prefix on its key
        self._pooled: frozenset[str] = frozenset()

    def use_keys(self, keys: KeyPicker | None) -> None:
        """Route over these key pools (None: every upstream has one key)."""
        self.keys = keys if keys is not None and keys.pools else None
        pools = self.keys.pools if self.keys is not None else {}
        self._pooled = frozenset(pools)

    @classmethod
    def from_config(
        cls,
        config: LoadedConfig,
        prices: PriceBook | None,
        kv: KeyValueState,
        dead: Retired | None = None,
        exchange: StatsExchange | None = None,
        key_state: KeyQuotaState | None = None,
    ) -> Router:
        """``exchange``: where replicas pool statistics and breakers (None: this process alone);
        ``key_state``: where key pools count their quotas (memory when None)."""
        r = config.settings.routing
        traits = {
            name: Traits(prior_of(up), up.cache_ttl_s, dict(up.shaping))
            for name, up in config.settings.upstreams.items()
        }
        stats: RouteStats
        if exchange is None:
            stats = MemoryRouteStats(r.ewma_alpha, r.breaker_failures, r.breaker_cooldown_s)
        else:
            from gateway.routing.shared_stats import SharedRouteStats

            stats = SharedRouteStats(exchange, r.ewma_alpha, r.breaker_failures, r.breaker_cooldown_s)
        router = cls(traits, prices, kv, stats, dead if dead is not None else Retired(r.retired_probe_s))
        if config.key_pools:
            state = key_state if key_state is not None else MemoryKeyQuotaState()
            router.use_keys(KeyPicker(pools_from_config(config), state))
        return router

    def traits_of(self, upstream: str) -> Traits:
        return self.traits.get(upstream, self._default)

    async def plan(
        self,
        tenant: Tenant,
        route: Route,
        body: dict[str, Any],
        raw_len: int,
        *,
        max_latency_ms: float | None = None,
        budget_fraction: float | None = None,
        explain: bool = False,
    ) -> Plan:
        now = self.clock()
        slo_ttft, slo_total = route.slo_ttft_ms, route.slo_total_ms
        if max_latency_ms is not None:
            slo_total = max_latency_ms if slo_total is None else min(slo_total, max_latency_ms)
        strategy, note = budget_strategy(route.strategy, tenant, budget_fraction)
        live: list[Option] = []
        excluded: list[Option] = []
        stats = self.stats
        for i, candidate in enumerate(route.candidates):
            option = Option(candidate, i)
            label = candidate.label
            if label in self.dead:
                option.excluded = "dead: its upstream answered 404 for the model"
                excluded.append(option)
            elif stats.stat(label, self.traits_of(candidate.upstream).prior).open_until > now:
                option.excluded = "circuit breaker open after consecutive failures"
                excluded.append(option)
            else:
                live.append(option)
        cooling = [o for o in excluded if not o.excluded.startswith("dead")]
        last_resort = not live and bool(cooling)
        if last_resort:
            # every live candidate is cooling down: probe them rather than refuse (a single-candidate
            # route keeps working as it would without a breaker)
            live = [replace(o, excluded="") for o in cooling]
            excluded = [o for o in excluded if o.excluded.startswith("dead")]
        plan = Plan(strategy, live, excluded, "", slo_ttft, slo_total)
        if not live:
            return plan
        needs_estimates = explain or (strategy != "pinned" and len(live) > 1)
        if needs_estimates:
            await self._estimate(
                plan, tenant, body, raw_len, self.cache_aware and (strategy in _CACHE_AWARE or explain)
            )
        if (
            plan.chain is None
            and self._pooled
            and self.cache_aware
            and any(o.candidate.upstream in self._pooled for o in live)
        ):
            await self._prefixes(plan, tenant, body)  # the key that holds the prefix, for the key pick
        if needs_estimates or strategy == "pinned":
            ranked, reason = STRATEGIES[strategy](live, lambda: slo_text(slo_ttft, slo_total))
            if plan.held:
                ranked, reason, note = self._affinity(plan, ranked, reason, note)
        else:  # one live candidate: nothing to compare
            ranked, reason = live, f"{strategy}: the only {'live ' if excluded else ''}candidate"
        plan.options = ranked
        skipped = f"; skipped {', '.join(o.label for o in excluded)}" if excluded else ""
        if excluded and any(o.excluded.startswith("dead") for o in excluded):
            skipped += " (404 for the model: retired)"
        lost = [f"{o.label} ({plan.held[o.label]} tokens)" for o in excluded if o.label in plan.held]
        if lost:
            skipped += f"; the conversation's cached prefix at {', '.join(lost)} is lost"
        plan.reason = reason + note + skipped
        if last_resort:
            plan.reason += "; every candidate's circuit breaker is open: trying anyway"
        return plan

    def _affinity(self, plan: Plan, ranked: list[Option], reason: str, note: str) -> tuple[list[Option], str, str]:
        """Keep the loop on the candidate holding its prefix, unless a budget step (``note``) routes by
        cost; returns the order, the reason and the budget note."""
        holder = prefix_holder(ranked)
        if holder is None:
            return ranked, reason, note
        plan.holder = holder.label
        if plan.strategy not in _STICKY or holder is ranked[0]:
            return ranked, reason, note
        if note:
            return ranked, reason, note + f"; moved off {holder.label}, which holds this conversation's prefix"

        def slo() -> str:
            return slo_text(plan.slo_ttft_ms, plan.slo_total_ms)

        ranked, reason, plan.kept = stay_with_prefix(ranked, reason, plan.strategy, slo)
        return ranked, reason, note

    async def _estimate(self, plan: Plan, tenant: Tenant, body: dict[str, Any], raw_len: int, cache: bool) -> None:
        held: dict[str, int] = {}
        if cache:
            held = await self._prefixes(plan, tenant, body)
            assert plan.chain is not None
            prompt = max(plan.chain.sizes[-1] // affinity.BYTES_PER_TOKEN if plan.chain.sizes else 0, 1)
        else:
            prompt = max(raw_len // affinity.BYTES_PER_TOKEN, 1)
        prompt = max([prompt, *held.values()])
        asked = requested_max_tokens(body) or tenant.default_max_tokens
        average = self.stats.completion_avg(tenant.name)
        output = int(min(asked, average if average is not None else COLD_COMPLETION_TOKENS))
        when, now = self.wall(), self.clock()
        for option in plan.options:
            c = option.candidate
            price = self.prices.at(c.label, when) if self.prices is not None else None
            stat = self.stats.stat(c.label, self.traits_of(c.upstream).prior)
            load = self.loads.get(c.upstream)
            queue = load.queue_delay(stat.ttft_s, stat.tokens_per_s, now) if load is not None else 0.0
            estimate(
                option, price, stat, prompt, output, held.get(c.label, 0), queue, plan.slo_ttft_ms, plan.slo_total_ms
            )
        plan.estimated = True

    async def _prefixes(self, plan: Plan, tenant: Tenant, body: dict[str, Any]) -> dict[str, int]:
        """Where this conversation's prefix is held: per candidate label, and per pool key as
        ``<label>#<key>`` (a candidate holds what its best key holds)."""
        plan.chain = affinity.prefix_chain(body)
        held = await affinity.held_prefixes(self.kv, tenant.name, plan.chain, self.wall(), plan.held_bytes)
        if self.keys is not None:
            for label, tokens in list(held.items()):
                base, sep, _ = label.partition("#")
                if sep and tokens > held.get(base, 0):
                    held[base] = tokens
        plan.held = held
        return held

    # ------------------------------------------------------------------ learning

    def dispatched(self, option: Option) -> None:
        """A request is about to be sent: a scraped server counts it until its next scrape."""
        load = self.loads.get(option.candidate.upstream)
        if load is not None:
            load.dispatched += 1

    def failed(self, option: Option, kind: str) -> None:
        c = option.candidate
        if self.stats.failure(c.label, self.traits_of(c.upstream).prior, self.clock()):
            BREAKER_OPENED.labels(c.label).inc()
            log.warning(
                "circuit breaker for %s opened after repeated failures (last: %s); skipped for %g s",
                c.label,
                kind,
                getattr(self.stats, "cooldown_s", 0),
            )

    async def served(
        self,
        tenant: Tenant,
        plan: Plan,
        option: Option,
        ttft_s: float | None,
        gen_s: float | None,
        usage: Usage | None,
    ) -> None:
        """A candidate answered: close its breaker, learn its speed, cache hits and where the prefix lives."""
        c = option.candidate
        traits = self.traits_of(c.upstream)
        prior = traits.prior
        stats = self.stats
        stats.success(c.label, prior)
        tokens = usage.completion_tokens if usage is not None else 0
        stat = stats.stat(c.label, prior)
        uncached = (usage.prompt_tokens - usage.cached_tokens) if usage is not None else 0
        load = self.loads.get(c.upstream)
        if load is not None and not plan.estimated:
            # a scraped vLLM on a plan that expected no wait (one candidate, pinned): its times hold an
            # unknown queue wait, so only a stream's decode speed is learned from them
            if ttft_s is not None:
                stats.observe_speed(c.label, prior, None, tokens, gen_s)
        else:
            if load is not None and gen_s is not None:  # how long it held a slot, for the queue model
                load.served((ttft_s or 0.0) + gen_s - option.queue_s)
            # learn the first-token time net of prefill and of the queue wait the load model accounts
            # for (counted in both, a queueing vLLM would look slow twice)
            if ttft_s is not None:
                ttft_s = max(0.0, ttft_s - uncached / stat.prefill_tps - option.queue_s)
            elif gen_s is not None:  # a whole answer: decode time is what the expected first token leaves
                gen_s -= stat.ttft_s + uncached / stat.prefill_tps + option.queue_s
            stats.observe_speed(c.label, prior, ttft_s, tokens, gen_s)
        if usage is None:
            return
        stats.observe_completion(tenant.name, usage.completion_tokens)
        if option.held_tokens:
            stats.observe_cache(c.label, prior, option.held_tokens, usage.cached_tokens)
        if plan.chain is not None and usage.prompt_tokens:
            ttl = traits.cache_ttl_s
            # a pool key's cache is its own: the prefix is remembered under the key that served it
            label = c.label if option.key is None else f"{c.label}#{option.key}"
            await affinity.remember(self.kv, tenant.name, plan.chain, label, usage.prompt_tokens, ttl, self.wall())
