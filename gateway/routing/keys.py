"""Choosing the provider key of an upstream's key pool for one attempt.

Provider prompt caches are scoped per key (per account or project), so where a conversation's turns
go within the pool decides what they cost: cached input is a quarter of the price. ``cache_aware``
(the default) keeps a conversation on the key that served its prefix while that key has quota, and
spreads new conversations by weighted round-robin; ``round_robin`` ignores caches; ``least_loaded``
takes the key with the smallest used share of its limits. Whatever the order, a key is chosen only
when the request fits what remains of its quota (:mod:`gateway.state.key_quota`, shared by replicas
when the state is Redis): the gateway never sends a key more than its tier allows.

A 429 rests the key for its ``Retry-After`` (or a backoff that doubles while it keeps answering
429) and the pipeline tries another key of the same upstream; a 401/403 takes the key out for an
hour (a warning and ``gateway_upstream_key_revoked``) and leaves the others alone. When no key has
room the upstream counts as unavailable for this request and the usual failover applies.

Keys are named by their configured labels only; the secret never leaves the upstream adapter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway.config import LoadedConfig
from gateway.routing.metrics import (
    KEY_COOLDOWNS,
    KEY_RATE_LIMITED,
    KEY_REQUESTS,
    KEY_REVOKED,
    KEY_TOKENS,
    KEYS_EXHAUSTED,
)
from gateway.state.base import StateUnavailable
from gateway.state.key_quota import KeyGrant, KeyLimits, KeyQuotaState, KeyView, MemoryKeyQuotaState
from gateway.upstreams.rate_headers import RateHeaders
from gateway.upstreams.usage import Usage

log = logging.getLogger("kimi_gateway.keys")

REVOKED_S = 3600.0  # a refused key is probed again after an hour (a rotated secret is a new key at once)
MAX_BACKOFF_S = 300.0
_WHY = {
    "cooling": "cooling down (a 429, or the provider said its quota is spent)",
    "revoked": "refused by the provider (401/403)",
    "rpm": "at its requests per minute",
    "tpm": "at its tokens per minute",
    "concurrency": "at its concurrent requests",
    "too_large": "the request exceeds its tokens per minute",
}


@dataclass(frozen=True, slots=True)
class PoolKeySpec:
    label: str
    limits: KeyLimits
    weight: float = 1.0


class _KeyMetrics:
    """One key's metric children, looked up once (a ``labels()`` call per request costs a lock and a
    dict lookup per counter)."""

    __slots__ = ("cached", "completion", "prompt", "requests")

    def __init__(self, upstream: str, label: str) -> None:
        self.requests = KEY_REQUESTS.labels(upstream, label)
        self.prompt = KEY_TOKENS.labels(upstream, label, "prompt")
        self.cached = KEY_TOKENS.labels(upstream, label, "cached")
        self.completion = KEY_TOKENS.labels(upstream, label, "completion")


@dataclass(slots=True)
class Pool:
    """One upstream's keys and how to choose among them; the round-robin position is per process."""

    upstream: str
    keys: tuple[PoolKeySpec, ...]
    selection: str = "cache_aware"
    backoff_s: float = 5.0
    lease_s: float = 960.0  # a request in flight holds its slot at most this long (the upstream's total_s + 60)
    _current: list[float] = field(default_factory=list)
    _strikes: dict[str, int] = field(default_factory=dict)  # consecutive 429s per key label

    def rotation(self, advance: bool = True) -> list[int]:
        """Key positions in smooth weighted round-robin order, the next key first; ``advance`` moves
        the rotation on (a request the order is for), else it only reads it."""
        keys = self.keys
        if not self._current:
            self._current = [0.0] * len(keys)
        current = self._current
        if not advance:
            return sorted(range(len(keys)), key=current.__getitem__, reverse=True)
        total = 0.0
        for i, key in enumerate(keys):
            current[i] += key.weight
            total += key.weight
        order = sorted(range(len(keys)), key=current.__getitem__, reverse=True)  # stable: ties keep order
        current[order[0]] -= total
        return order


@dataclass(slots=True)
class Lease:
    """A key held for one attempt: released once when the attempt ends."""

    pool: Pool
    key: PoolKeySpec
    lease_id: str
    held: int  # prompt tokens of this conversation's prefix the key served recently
    reason: str
    tokens: int = 0  # counted against the key's tokens per minute: a bound on the prompt + max_tokens
    max_tokens: int = 0
    released: bool = False


@dataclass(frozen=True, slots=True)
class NoKey:
    """No key of the pool has room: why, per key, and the seconds until the soonest may (None: never)."""

    reason: str
    wait_s: float | None
    revoked: bool = False  # every key is out after a 401/403: an operator's problem, not a busy pool


def pools_from_config(config: LoadedConfig) -> dict[str, Pool]:
    out: dict[str, Pool] = {}
    for name, keys in config.key_pools.items():
        up = config.settings.upstreams[name]
        specs = tuple(
            PoolKeySpec(
                k.label, KeyLimits(f"{name}/{k.label}/{k.fingerprint}", k.rpm, k.tpm, k.max_concurrency), k.weight
            )
            for k in keys
        )
        out[name] = Pool(name, specs, up.key_selection, up.key_backoff_s, up.timeouts.total_s + 60)
    return out


def key_tokens(raw_len: int, max_tokens: int, held: Mapping[str, int], held_bytes: Mapping[str, int]) -> dict[str, int]:
    """Per pool key holding this conversation's prefix, a tighter bound on the request's tokens:
    the provider's own count of that prefix (as it reported it) plus the bytes/2 bound on the rest.
    Without it every key would count the whole prompt at bytes/2, about twice what the provider
    counts, and a busy pool would refuse requests its keys still had room for."""
    out: dict[str, int] = {}
    for label, tokens in held.items():
        size = held_bytes.get(label)
        if size is not None and tokens > 0:
            out[label] = tokens + max(0, raw_len - size) // 2 + 16 + max_tokens
    return out


def held_by_key(held: Mapping[str, int], label: str) -> dict[str, int]:
    """The pool keys of candidate ``label`` holding this conversation's prefix (affinity entries
    ``<label>#<key>``), with their tokens."""
    prefix = label + "#"
    return {k[len(prefix) :]: v for k, v in held.items() if k.startswith(prefix)}


class KeyPicker:
    """The pools of every upstream that has one, over the configured state (shared by replicas with
    Redis; a Redis that does not answer is replaced by this process's own count until it does)."""

    def __init__(self, pools: dict[str, Pool], state: KeyQuotaState, wall: Callable[[], float] = time.time) -> None:
        self.pools = pools
        self.state = state
        self.wall = wall
        # where quotas are counted while the shared state does not answer (None: the state is this
        # process's memory already, nothing to fall back to)
        self._local: MemoryKeyQuotaState | None = None if type(state) is MemoryKeyQuotaState else MemoryKeyQuotaState()
        self._warned_at = 0.0
        self._metrics = {
            (name, key.label): _KeyMetrics(name, key.label) for name, pool in pools.items() for key in pool.keys
        }

    def pool(self, upstream: str) -> Pool | None:
        return self.pools.get(upstream)

    async def _acquire(
        self, keys: list[KeyLimits], tokens: list[int], lease: str, lease_s: float, least: bool
    ) -> KeyGrant:
        now = self.wall()
        local = self._local
        if local is None:
            return await self.state.acquire(keys, tokens, lease, now, lease_s, least_loaded=least)
        try:
            return await self.state.acquire(keys, tokens, lease, now, lease_s, least_loaded=least)
        except StateUnavailable as exc:
            if now - self._warned_at > 5:
                self._warned_at = now
                log.warning("key pool state unavailable, counting key quotas in this process alone: %s", exc)
            return await local.acquire(keys, tokens, lease, now, lease_s, least_loaded=least)

    def order(self, pool: Pool, held: Mapping[str, int]) -> list[int]:
        """The keys in the order to try: holders of the prefix first (cache_aware), then the rotation.
        Only a conversation no key holds moves the rotation on: new conversations follow the weights."""
        keys = pool.keys
        if pool.selection != "cache_aware" or not held:
            return pool.rotation()
        rotation = pool.rotation(advance=False)
        holders = [i for i in rotation if keys[i].label in held]
        if not holders:
            return pool.rotation()
        holders.sort(key=lambda i: -held[keys[i].label])
        return [*holders, *(i for i in rotation if keys[i].label not in held)]

    async def take(
        self,
        pool: Pool,
        held: Mapping[str, int],
        tokens: int,
        lease_id: str,
        skip: frozenset[str] = frozenset(),
        max_tokens: int = 0,
        key_tokens: Mapping[str, int] | None = None,
    ) -> Lease | NoKey:
        """Hold a key for an attempt of ``tokens`` (a bound on the prompt + ``max_tokens``; a tighter
        one per key label in ``key_tokens``), passing over ``skip`` (keys this request already
        failed on)."""
        order = [i for i in self.order(pool, held) if pool.keys[i].label not in skip]
        if not order:
            return NoKey("every key of the pool failed for this request", None)
        specs = [pool.keys[i] for i in order]
        per_key = key_tokens or {}
        needs = [min(tokens, per_key.get(s.label, tokens)) for s in specs]
        grant = await self._acquire(
            [s.limits for s in specs], needs, lease_id, pool.lease_s, pool.selection == "least_loaded"
        )
        passed = [f"{s.label} {_WHY.get(r, r)}" for s, r in zip(specs, grant.reasons, strict=False) if r]
        if grant.index is None:
            KEYS_EXHAUSTED.labels(pool.upstream).inc()
            revoked = all(r == "revoked" for r in grant.reasons)
            return NoKey("no key has room: " + ", ".join(passed), grant.wait_s, revoked)
        key = specs[grant.index]
        self._metrics[pool.upstream, key.label].requests.inc()
        tokens_held = held.get(key.label, 0)
        reason = _reason(pool, key, tokens_held, held, passed)
        return Lease(pool, key, lease_id, tokens_held, reason, needs[grant.index], max_tokens)

    async def release(self, lease: Lease, usage: Usage | None) -> None:
        """The attempt ended: free the key's in-flight slot and count what the provider reported."""
        if lease.released:
            return
        lease.released = True
        pool, key = lease.pool, lease.key
        await self._both(lambda s: s.release(key.limits, lease.lease_id))
        if usage is None:
            return
        metrics = self._metrics[pool.upstream, key.label]
        metrics.prompt.inc(usage.prompt_tokens)
        metrics.cached.inc(usage.cached_tokens)
        metrics.completion.inc(usage.completion_tokens)
        # the provider counts its own prompt tokens plus max_tokens: the minute holds that from now on,
        # not the bound the grant took (twice the prompt, for English), so the key's room comes back
        actual = usage.prompt_tokens + lease.max_tokens
        if usage.prompt_tokens and actual < lease.tokens:
            await self._both(lambda s: s.adjust(key.limits, lease.lease_id, lease.tokens, actual))

    async def _both(self, call: Callable[[KeyQuotaState], Awaitable[None]]) -> None:
        """A change applied to the shared state and to this process's fallback count."""
        local = self._local
        if local is None:
            await call(self.state)
            return
        with contextlib.suppress(StateUnavailable):
            await call(self.state)
        await call(local)

    async def refused(self, lease: Lease, status: int, retry_after: str | None) -> str:
        """The provider refused the attempt's key: rest it (429) or take it out (401/403); returns the
        route-reason text."""
        pool, key = lease.pool, lease.key
        now = self.wall()
        if status in (401, 403):
            KEY_REVOKED.labels(pool.upstream, key.label).inc()
            log.warning(
                "ALERT upstream %s refused pool key %s (HTTP %d): the key is taken out for %g s; the pool's "
                "other keys keep serving. Replace or re-enable the key.",
                pool.upstream,
                key.label,
                status,
                REVOKED_S,
            )
            await self._both(lambda s: s.revoke(key.limits, now + REVOKED_S))
            return f"key {key.label} refused (HTTP {status})"
        KEY_RATE_LIMITED.labels(pool.upstream, key.label).inc()
        strikes = pool._strikes[key.label] = pool._strikes.get(key.label, 0) + 1
        wait = _retry_after_s(retry_after)
        if wait is None:
            wait = min(MAX_BACKOFF_S, pool.backoff_s * 2 ** (strikes - 1))
        KEY_COOLDOWNS.labels(pool.upstream, key.label, "429").inc()
        log.info("upstream %s: pool key %s answered 429; resting it %g s", pool.upstream, key.label, wait)
        await self._both(lambda s: s.cool(key.limits, now + wait))
        return f"key {key.label} rate limited (429, resting {wait:g} s)"

    async def observed(self, lease: Lease, rate: RateHeaders | None) -> None:
        """A key answered: forget its 429 streak, and take in the provider's view of its quota."""
        pool, key = lease.pool, lease.key
        pool._strikes.pop(key.label, None)
        if rate is None:
            return
        now = self.wall()
        limits = key.limits
        spent = (rate.remaining_requests == 0, rate.remaining_tokens == 0)
        if any(spent):
            reset = max(
                (rate.reset_requests_s or 0.0) if spent[0] else 0.0, (rate.reset_tokens_s or 0.0) if spent[1] else 0.0
            )
            if reset > 0:
                KEY_COOLDOWNS.labels(pool.upstream, key.label, "provider_headers").inc()
                await self._both(lambda s: s.cool(limits, now + reset))
        extra_requests = extra_tokens = 0
        views = await self._views(pool, [limits], now)
        if views:
            view = views[0]
            if limits.rpm and rate.remaining_requests is not None:
                extra_requests = (limits.rpm - rate.remaining_requests) - view.requests
            if limits.tpm and rate.remaining_tokens is not None:
                extra_tokens = (limits.tpm - rate.remaining_tokens) - view.tokens
        if extra_requests > 0 or extra_tokens > 0:
            expires = max(rate.reset_requests_s or 0.0, rate.reset_tokens_s or 0.0) or 60.0
            await self._both(
                lambda s: s.correct(limits, now, max(0, extra_requests), max(0, extra_tokens), min(expires, 60.0))
            )

    async def _views(self, pool: Pool, keys: list[KeyLimits], now: float) -> list[KeyView]:
        try:
            return await self.state.view(keys, now)
        except StateUnavailable:
            if self._local is None:
                raise
            return await self._local.view(keys, now)

    async def preview(self, pool: Pool, held: Mapping[str, int], tokens: int) -> dict[str, object]:
        """The key a request of ``tokens`` would go out with, and why; every key of the pool in the
        order it would try them, with its quota now and the prefix tokens it holds (route/explain).
        Takes nothing."""
        now = self.wall()
        current = list(pool._current)
        order = self.order(pool, held)
        pool._current = current  # a preview must not move the rotation
        specs = [pool.keys[i] for i in order]
        views = await self._views(pool, [s.limits for s in specs], now)
        out: list[dict[str, object]] = []
        chosen: PoolKeySpec | None = None
        passed: list[str] = []
        for spec, view in zip(specs, views, strict=True):
            limits = spec.limits
            refusal = _refusal(view, limits, tokens)
            if refusal and chosen is None:
                passed.append(f"{spec.label} {_WHY[refusal]}")
            elif chosen is None:
                chosen = spec
            out.append(
                {
                    "key": spec.label,
                    "has_room": not refusal,
                    "held_prefix_tokens": held.get(spec.label, 0),
                    "requests_last_minute": view.requests,
                    "tokens_last_minute": view.tokens,
                    "in_flight": view.in_flight,
                    "rpm": limits.rpm,
                    "tpm": limits.tpm,
                    "max_concurrency": limits.max_concurrency,
                    "cooling_s": round(view.cooling_s, 3),
                    "revoked": view.revoked,
                }
            )
        if chosen is None:
            reason = "no key has room: " + ", ".join(passed)
        else:
            reason = _reason(pool, chosen, held.get(chosen.label, 0), held, passed)
        return {
            "selection": pool.selection,
            "key": chosen.label if chosen is not None else None,
            "reason": reason,
            "keys": out,
        }


def _refusal(view: KeyView, key: KeyLimits, tokens: int) -> str:
    """Why a key would pass a request over now, as :meth:`KeyQuotaState.acquire` decides ("" = it fits)."""
    if view.revoked:
        return "revoked"
    if view.cooling_s > 0:
        return "cooling"
    if key.max_concurrency is not None and view.in_flight >= key.max_concurrency:
        return "concurrency"
    if key.rpm is not None and view.requests + 1 > key.rpm:
        return "rpm"
    if key.tpm is not None and view.tokens + tokens > key.tpm:
        return "too_large" if tokens > key.tpm else "tpm"
    return ""


def _reason(pool: Pool, key: PoolKeySpec, tokens: int, held: Mapping[str, int], passed: list[str]) -> str:
    if tokens:
        why = f"holds this conversation's prefix ({tokens} tokens)"
    elif pool.selection == "cache_aware" and held:
        holder = max(held, key=held.__getitem__)
        why = f"{holder} holds the prefix but has no room"
    elif pool.selection == "least_loaded":
        why = "least loaded"
    else:
        why = "round-robin"
    skipped = f"; passed over {', '.join(passed)}" if passed else ""
    return f"key {key.label} ({why}{skipped})"


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(MAX_BACKOFF_S, max(0.0, seconds))
