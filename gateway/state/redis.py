"""Redis state: what several workers and replicas must agree on, behind the same interfaces as memory.

* Budgets: every check-and-add is one Lua script, so replicas racing for the last dollar of a cap
  cannot both win. A counter is a hash ``{spent, reserved}``; its open reservations sit in a sorted
  set scored by their expiry, so the reservations of a replica that died before settling expire on
  their own (any later script on the counter frees them). A reservation record names its counters so
  that settlement needs only the request id.
* Rate limits: sliding-window counters (two fixed windows, the previous one weighted) in one hash per
  counter, checked and added for all of a request's limits in one script.
* Key-value entries: plain strings with ``PX`` expiry; a miss when Redis does not answer.

Every key starts with the deployment's namespace and has a TTL. Scripts run by SHA and are sent
again after a Redis restart (see ``redis_link``, which also pipelines the calls of concurrent
requests). On a Redis Cluster every script's keys share one slot: budgets carry the ``{budgets}``
hash tag (the settlement script reads its counters' names from the reservation record, so they must
share the record's slot), rate limits ``{rates}``; key-value entries are single keys, spread over
the cluster (:mod:`gateway.state.redis_keys` documents each family). Amounts are integer nanodollars, passed and
stored as decimal strings so Lua's doubles never round them (only the comparison with a cap beyond
2^53 nanodollars, $9M, is rounded, to a few nanodollars).

Every call is bounded: short socket timeouts, one quick reconnect attempt, an overall deadline; a
failure raises :class:`StateUnavailable` and the caller applies the configured fail mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gateway.state.base import (
    BudgetState,
    KeyValueState,
    Limit,
    RateCount,
    RateLimit,
    RateLimitState,
    Refusal,
    StateUnavailable,
)
from gateway.state.redis_cluster import ClusterLink
from gateway.state.redis_keys import BUDGETS, RATES, family
from gateway.state.redis_link import Batcher, RedisLink, RedisSettings, script

__all__ = ["RedisBudgetState", "RedisKeyValueState", "RedisRateLimitState", "RedisSettings", "connect"]

log = logging.getLogger("kimi_gateway.state")


def connect(settings: RedisSettings) -> Batcher:
    """The link for the configured Redis: one server or Sentinel (:class:`RedisLink`), or a Cluster
    (:class:`ClusterLink`)."""
    if settings.resolved.topology == "cluster":
        return ClusterLink(settings)
    return RedisLink(settings)


def _ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------- budgets

_LUA_COMMON = """
local function int(x) return string.format('%d', x) end
local function purge(counter, open, now)
  local expired = redis.call('ZRANGEBYSCORE', open, '-inf', now)
  if #expired == 0 then return end
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', open, '-inf', now)
  if tonumber(redis.call('HINCRBY', counter, 'reserved', int(-freed))) < 0 then
    redis.call('HSET', counter, 'reserved', '0')
  end
end
local function keep(key, ttl)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
"""

# KEYS: record, index, then per counter: hash, open set
# ARGV: request id, amount, now ms, reservation ttl ms, record ttl ms, then per counter: cap, ttl s
_RESERVE = script(
    _LUA_COMMON
    + """
local rid, amount, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end  -- already reserved (a retried call)
local n = (#KEYS - 2) / 2
for i = 1, n do
  local counter, open = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  purge(counter, open, now)
  local h = redis.call('HMGET', counter, 'spent', 'reserved')
  local used = tonumber(h[1] or '0') + tonumber(h[2] or '0')
  if used + amount > tonumber(ARGV[4 + 2 * i]) then return {i, h[1] or '0', h[2] or '0'} end
end
local expires = now + tonumber(ARGV[4])
local member = rid .. ':' .. ARGV[2]
local counters, ttls = {}, {}
for i = 1, n do
  local counter, open, ttl = KEYS[1 + 2 * i], KEYS[2 + 2 * i], tonumber(ARGV[5 + 2 * i])
  redis.call('HINCRBY', counter, 'reserved', ARGV[2])
  redis.call('ZADD', open, expires, member)
  keep(counter, ttl)
  keep(open, ttl)
  counters[i], ttls[i] = counter, ttl
end
redis.call('SET', KEYS[1], cjson.encode({ARGV[2], counters, ttls}), 'PX', ARGV[5])
redis.call('ZADD', KEYS[2], expires, rid)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {0}
"""
)

# KEYS: record, index; ARGV: request id, actual
_SETTLE = script(
    _LUA_COMMON
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
local amount, member = rec[1], ARGV[1] .. ':' .. rec[1]
for i, counter in ipairs(rec[2]) do
  if redis.call('ZREM', counter .. ':open', member) == 1 then
    if tonumber(redis.call('HINCRBY', counter, 'reserved', '-' .. amount)) < 0 then
      redis.call('HSET', counter, 'reserved', '0')
    end
  end
  redis.call('HINCRBY', counter, 'spent', ARGV[2])
  keep(counter, rec[3][i])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: hash, open set; ARGV: now ms
_USED = script(
    _LUA_COMMON
    + """
purge(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return redis.call('HMGET', KEYS[1], 'spent', 'reserved')
"""
)

# KEYS: hash; ARGV: amount, ttl s, only once (1/0)
_ADD_SPENT = script(
    _LUA_COMMON
    + """
if ARGV[3] == '1' and redis.call('HSETNX', KEYS[1], 'seeded', '1') == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
keep(KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# KEYS: marker, then counters; ARGV: amount, marker ttl ms, then per counter: ttl s
_ADD_ONCE = script(
    _LUA_COMMON
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 0 end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
  keep(KEYS[i], tonumber(ARGV[i + 1]))
end
return 1
"""
)

# KEYS: index; ARGV: now ms
_OPEN = script(
    """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""
)


class RedisBudgetState(BudgetState):
    """Budget counters shared by every replica of a deployment.

    ``reservation_ttl_s`` must outlast the longest request (the upstreams' ``total_s``): a live
    request's reservation must not expire, a dead replica's should not hold budget much longer.
    """

    def __init__(self, link: Batcher, reservation_ttl_s: float) -> None:
        self._redis = link
        self._prefix = family(link.settings.namespace, BUDGETS)
        self._reservation_ttl_ms = int(reservation_ttl_s * 1000)
        # a record outlives its reservation so that a late settlement still adds its spend
        self._record_ttl_ms = self._reservation_ttl_ms + 3_600_000
        self._index = f"{self._prefix}reservations"

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _record(self, request_id: str) -> str:
        return f"{self._prefix}reservation:{request_id}"

    async def reserve(self, request_id: str, limits: list[Limit], amount: int) -> Refusal | None:
        keys = [self._record(request_id), self._index]
        args: list[Any] = [request_id, str(amount), _ms(), self._reservation_ttl_ms, self._record_ttl_ms]
        for limit in limits:
            counter = self._key(limit.key)
            keys += [counter, counter + ":open"]
            args += [str(limit.cap), int(limit.ttl_s)]
        out = await self._redis.run(_RESERVE, keys, args)
        if int(out[0]) == 0:
            return None
        limit = limits[int(out[0]) - 1]
        return Refusal(limit.key, limit.cap, int(out[1]) + int(out[2]))

    async def settle(self, request_id: str, actual: int) -> None:
        await self._redis.run(_SETTLE, [self._record(request_id), self._index], [request_id, str(actual)])

    async def used(self, key: str) -> int:
        counter = self._key(key)
        spent, reserved = await self._redis.run(_USED, [counter, counter + ":open"], [_ms()])
        return int(spent or 0) + int(reserved or 0)

    async def add_spent(self, key: str, amount: int, ttl_s: int) -> None:
        await self._redis.run(_ADD_SPENT, [self._key(key)], [str(amount), int(ttl_s), "0"])

    async def add_spent_once(self, request_id: str, limits: list[Limit], amount: int) -> None:
        keys = [f"{self._prefix}applied:{request_id}", *(self._key(limit.key) for limit in limits)]
        args = [str(amount), self._record_ttl_ms, *(int(limit.ttl_s) for limit in limits)]
        await self._redis.run(_ADD_ONCE, keys, args)

    async def seed(self, key: str, amount: int, ttl_s: int) -> None:
        await self._redis.run(_ADD_SPENT, [self._key(key)], [str(amount), int(ttl_s), "1"])

    async def open_reservations(self) -> int:
        return int(await self._redis.run(_OPEN, [self._index], [_ms()]))


# ------------------------------------------------------------------------------------------ rate limits

_RATE_COMMON = """
local function roll(key, idx)
  local h = redis.call('HMGET', key, 'w', 'c', 'p')
  local w, c, p = tonumber(h[1] or '-1'), tonumber(h[2] or '0'), tonumber(h[3] or '0')
  if w == idx then return c, p end
  if w == idx - 1 then return 0, c end
  return 0, 0
end
"""

# KEYS: counters; ARGV: now ms, then per counter: limit, window ms, amount
# returns {admitted, then per counter: previous, current, elapsed ms, window index}
_HIT = script(
    _RATE_COMMON
    + """
local now = tonumber(ARGV[1])
local out, seen, admitted = {1}, {}, 1
for i, key in ipairs(KEYS) do
  local limit, window, amount = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local idx = math.floor(now / window)
  local elapsed = now - idx * window
  local c, p = roll(key, idx)
  if p * (window - elapsed) / window + c + amount > limit then admitted = 0 end
  seen[i] = {idx, c, p, amount, window}
  out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4] = p, c, elapsed, idx
end
out[1] = admitted
if admitted == 1 then
  for i, key in ipairs(KEYS) do
    local s = seen[i]
    local c = s[2] + s[4]
    redis.call('HSET', key, 'w', s[1], 'c', c, 'p', s[3])
    redis.call('PEXPIRE', key, 2 * s[5])
    out[1 + 4 * (i - 1) + 2] = c
  end
end
return out
"""
)

# KEYS: counter; ARGV: window index, delta, window ms. Adds delta to that window, creating or rolling
# the counter when it is behind (a correction, or a hit reconciled after an outage); older windows
# than the previous one are left alone.
_ADJUST = script(
    """
local h = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local idx, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local w, c, p = tonumber(h[1] or '-1'), tonumber(h[2] or '0'), tonumber(h[3] or '0')
if w == idx then c = c + delta
elseif w == idx + 1 then p = p + delta
elseif w == idx - 1 then w, p, c = idx, c, delta
elseif w < idx - 1 then w, p, c = idx, 0, delta
else return 0 end
if c < 0 then c = 0 end
if p < 0 then p = 0 end
redis.call('HSET', KEYS[1], 'w', w, 'c', c, 'p', p)
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""
)


class RedisRateLimitState(RateLimitState):
    """Request and token counters shared by every replica; each counter expires two windows after use."""

    def __init__(self, link: Batcher) -> None:
        self._redis = link
        self._prefix = family(link.settings.namespace, RATES)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def hit(self, limits: list[RateLimit], now: float) -> tuple[bool, list[RateCount]]:
        args: list[Any] = [int(now * 1000)]
        for limit in limits:
            args += [limit.limit, limit.window_s * 1000, limit.amount]
        out = await self._redis.run(_HIT, [self._key(lim.key) for lim in limits], args)
        counts = [
            RateCount(limit, int(out[1 + 4 * i]), int(out[2 + 4 * i]), int(out[3 + 4 * i]) / 1000, int(out[4 + 4 * i]))
            for i, limit in enumerate(limits)
        ]
        return int(out[0]) == 1, counts

    async def adjust(self, key: str, window_s: int, window: int, delta: int) -> None:
        await self._redis.run(_ADJUST, [self._key(key)], [window, delta, window_s * 1000])


# ------------------------------------------------------------------------------------------- key-value


class RedisKeyValueState(KeyValueState):
    """Shared small entries (affinity, reasoning store, upstream stats) as strings with ``PX`` expiry.

    Everything here is an optimisation a request can do without, so a Redis that does not answer
    makes a read a miss and a write a no-op (logged at most every few seconds), never a failed request;
    after a failure Redis is not asked again for ``cooldown_s``, so a hung Redis costs requests one
    deadline, not one per call. TTLs are capped at ``max_ttl_s`` so no entry lives forever.
    """

    def __init__(self, link: Batcher, max_ttl_s: float = 7 * 86400, cooldown_s: float = 1.0) -> None:
        self._redis = link
        self._prefix = f"{link.settings.namespace}:kv:"
        self._max_ttl_ms = int(max_ttl_s * 1000)
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._warned_at = 0.0

    async def _call(self, *args: Any) -> Any:
        """The reply, or None while Redis is known to be down or when it fails now."""
        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            return await self._redis.call(*args)
        except StateUnavailable as exc:
            self._down_until = time.monotonic() + self._cooldown_s
            if now - self._warned_at > 5:
                self._warned_at = now
                log.warning("key-value state unavailable, serving without it: %s", exc)
            return None

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", self._prefix + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        ms = min(self._max_ttl_ms, max(1, int(ttl_s * 1000)))
        await self._call("SET", self._prefix + key, value, "PX", ms)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self._redis.cluster:  # keys of different slots: one GET each, all in the same batch
            found = await asyncio.gather(*(self._call("GET", self._prefix + k) for k in keys))
            return [v if isinstance(v, bytes) else None for v in found]
        values = await self._call("MGET", *(self._prefix + k for k in keys))
        if values is None:
            return [None] * len(keys)
        return [v if isinstance(v, bytes) else None for v in values]

    async def delete(self, key: str) -> None:
        await self._call("DEL", self._prefix + key)

    async def put_if_absent(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        ms = min(self._max_ttl_ms, max(1, int(ttl_s * 1000)))
        await self._call("SET", self._prefix + key, value, "NX", "PX", ms)
        current = await self._call("GET", self._prefix + key)  # ours, or the one another process set first
        return current if isinstance(current, bytes) else None
