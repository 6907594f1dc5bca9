"""Key-pool quotas in Redis: what :class:`~gateway.state.key_quota.MemoryKeyQuotaState` keeps, shared
by every replica so two replicas never each spend a key's full quota.

Per key, three Redis keys: a hash (``q`` requests and ``t`` tokens of the minute, ``c`` cooled and
``r`` revoked until, in ms), the minute's grants as a sorted set scored by expiry (member
``<lease>:<requests>:<tokens>``, so a purge knows what to subtract) and the requests in flight as a
sorted set of leases scored by their expiry (a dead replica's leases lapse). One script checks and
counts a whole pool, so replicas racing for a key's last request cannot both win.

All of a pool's keys carry the hash tag ``{keypool:<upstream>}``: every script touches one hash slot,
as Redis Cluster requires. A Redis that does not answer raises :class:`StateUnavailable`; the key
picker then accounts in this process alone until it answers again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from gateway.state.key_quota import MARGIN_S, UNKNOWN_WAIT_S, WINDOW_S, KeyGrant, KeyLimits, KeyQuotaState, KeyView
from gateway.state.redis_link import Batcher, script

_COMMON = """
local function purge(h, w, f, now)
  local gone = redis.call('ZRANGEBYSCORE', w, '-inf', now)
  if #gone > 0 then
    local q, t = 0, 0
    for _, m in ipairs(gone) do
      local a, b = string.match(m, ':(%d+):(%d+)$')
      q, t = q + tonumber(a), t + tonumber(b)
    end
    redis.call('ZREMRANGEBYSCORE', w, '-inf', now)
    if tonumber(redis.call('HINCRBY', h, 'q', string.format('%d', 0 - q))) < 0 then redis.call('HSET', h, 'q', 0) end
    if tonumber(redis.call('HINCRBY', h, 't', string.format('%d', 0 - t))) < 0 then redis.call('HSET', h, 't', 0) end
  end
  redis.call('ZREMRANGEBYSCORE', f, '-inf', now)
  local v = redis.call('HMGET', h, 'q', 't', 'c', 'r')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0'),
    redis.call('ZCARD', f)
end
local function until_fits(w, now, need_q, need_t)
  local entries = redis.call('ZRANGE', w, 0, -1, 'WITHSCORES')
  local fq, ft = 0, 0
  for i = 1, #entries, 2 do
    local a, b = string.match(entries[i], ':(%d+):(%d+)$')
    fq, ft = fq + tonumber(a), ft + tonumber(b)
    if fq >= need_q and ft >= need_t then return tonumber(entries[i + 1]) - now end
  end
  return 60000
end
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: per key hash, window, flight; ARGV: now ms, (unused), lease, lease ms, least (1/0), window ms,
# unknown-wait ms, then per key rpm, tpm, max concurrency (0 = unknown), tokens of this request.
# Returns {chosen (0: none), wait ms (-1: never), reason per key...}
_ACQUIRE = script(
    _COMMON
    + """
local now, lease = tonumber(ARGV[1]), ARGV[3]
local least, window = ARGV[5] == '1', tonumber(ARGV[6])
local n = #KEYS / 3
local reasons, best, best_load, wait, granted = {}, 0, 0, -1, 0
local function waited(ms) if ms >= 0 and (wait < 0 or ms < wait) then wait = ms end end
for i = 1, n do
  local h, w, f = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local rpm, tpm, conc = tonumber(ARGV[4 + 4 * i]), tonumber(ARGV[5 + 4 * i]), tonumber(ARGV[6 + 4 * i])
  local tokens = tonumber(ARGV[7 + 4 * i])
  local q, t, c, r, flight = purge(h, w, f, now)
  local reason = ''
  if r > now then reason = 'revoked'; waited(r - now)
  elseif c > now then reason = 'cooling'; waited(c - now)
  elseif conc > 0 and flight >= conc then reason = 'concurrency'; waited(tonumber(ARGV[7]))
  elseif rpm > 0 and q + 1 > rpm then reason = 'rpm'; waited(until_fits(w, now, q + 1 - rpm, 0))
  elseif tpm > 0 and t + tokens > tpm then
    if tokens > tpm then reason = 'too_large' else reason = 'tpm'; waited(until_fits(w, now, 0, t + tokens - tpm)) end
  end
  reasons[i] = reason
  if reason == '' then
    if not least then best = i; granted = tokens; break end
    local load = flight + 1
    if rpm > 0 or tpm > 0 or conc > 0 then
      load = 0
      if rpm > 0 then load = math.max(load, (q + 1) / rpm) end
      if tpm > 0 then load = math.max(load, (t + tokens) / tpm) end
      if conc > 0 then load = math.max(load, (flight + 1) / conc) end
    end
    if best == 0 or load < best_load then best, best_load, granted = i, load, tokens end
  end
end
for i = #reasons + 1, n do reasons[i] = '' end
if best == 0 then
  local out = {0, wait}
  for i = 1, n do out[#out + 1] = reasons[i] end
  return out
end
local h, w, f = KEYS[3 * best - 2], KEYS[3 * best - 1], KEYS[3 * best]
redis.call('ZADD', w, now + window, lease .. ':1:' .. string.format('%d', granted))
redis.call('HINCRBY', h, 'q', 1)
redis.call('HINCRBY', h, 't', string.format('%d', granted))
redis.call('ZADD', f, now + tonumber(ARGV[4]), lease)
keep(h, window * 2)
keep(w, window * 2)
keep(f, tonumber(ARGV[4]))
local out = {best, 0}
for i = 1, n do out[#out + 1] = reasons[i] end
return out
"""
)

# KEYS: hash, window, flight; ARGV: now ms, requests, tokens, expires ms, marker
_CORRECT = script(
    _COMMON
    + """
purge(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[4]), ARGV[5] .. ':' .. ARGV[2] .. ':' .. ARGV[3])
redis.call('HINCRBY', KEYS[1], 'q', ARGV[2])
redis.call('HINCRBY', KEYS[1], 't', ARGV[3])
keep(KEYS[1], 2 * tonumber(ARGV[4]))
keep(KEYS[2], 2 * tonumber(ARGV[4]))
return 1
"""
)

# KEYS: hash, window; ARGV: old member, new member, token delta
_ADJUST = script(
    """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[2], score, ARGV[2])
if tonumber(redis.call('HINCRBY', KEYS[1], 't', ARGV[3])) < 0 then redis.call('HSET', KEYS[1], 't', 0) end
return 1
"""
)

# KEYS: hash; ARGV: field, until ms, ttl ms (a later mark never shortens an earlier one)
_MARK = script(
    """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
)

# KEYS: per key hash, window, flight; ARGV: now ms. Returns per key q, t, flight, cooled, revoked
_VIEW = script(
    _COMMON
    + """
local out = {}
for i = 1, #KEYS / 3 do
  local q, t, c, r, flight = purge(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], tonumber(ARGV[1]))
  out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = q, t, flight, c, r
end
return out
"""
)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisKeyQuotaState(KeyQuotaState):
    def __init__(self, link: Batcher) -> None:
        self._redis = link
        self._ns = link.settings.namespace
        self._names: dict[str, tuple[str, str, str]] = {}

    def _keys(self, key_id: str) -> tuple[str, str, str]:
        """The hash, window and flight names of a key id ``<upstream>/<label>/<fingerprint>``, tagged
        with its upstream so a pool's keys share one hash slot."""
        names = self._names.get(key_id)
        if names is None:
            pool = key_id.split("/", 1)[0]
            base = f"{self._ns}:{{keypool:{pool}}}:{key_id}"
            names = self._names[key_id] = (base + ":h", base + ":w", base + ":f")
        return names

    async def acquire(
        self,
        keys: Sequence[KeyLimits],
        tokens: Sequence[int],
        lease: str,
        now: float,
        lease_s: float,
        *,
        least_loaded: bool,
    ) -> KeyGrant:
        names: list[str] = []
        args: list[Any] = [
            _ms(now), 0, lease, _ms(lease_s), 1 if least_loaded else 0, _ms(WINDOW_S + MARGIN_S),
            _ms(UNKNOWN_WAIT_S),
        ]  # fmt: skip
        for key, need in zip(keys, tokens, strict=True):
            names.extend(self._keys(key.id))
            args += [key.rpm or 0, key.tpm or 0, key.max_concurrency or 0, int(need)]
        out = await self._redis.run(_ACQUIRE, names, args)
        chosen, wait = int(out[0]), int(out[1])
        reasons = tuple(r.decode() if isinstance(r, bytes) else str(r) for r in out[2:])
        if chosen == 0:
            return KeyGrant(None, reasons, None if wait < 0 else wait / 1000)
        return KeyGrant(chosen - 1, reasons)

    async def release(self, key: KeyLimits, lease: str) -> None:
        await self._redis.call("ZREM", self._keys(key.id)[2], lease)

    async def adjust(self, key: KeyLimits, lease: str, granted: int, actual: int) -> None:
        h, w, _ = self._keys(key.id)
        actual = max(0, actual)
        await self._redis.run(_ADJUST, [h, w], [f"{lease}:1:{granted}", f"{lease}:1:{actual}", actual - granted])

    async def _mark(self, key: KeyLimits, field: str, until: float) -> None:
        ttl = max(0, _ms(until - time.time())) + _ms(2 * WINDOW_S)  # outlasts the mark, then goes
        await self._redis.run(_MARK, [self._keys(key.id)[0]], [field, _ms(until), ttl])

    async def cool(self, key: KeyLimits, until: float) -> None:
        await self._mark(key, "c", until)

    async def revoke(self, key: KeyLimits, until: float) -> None:
        await self._mark(key, "r", until)

    async def correct(self, key: KeyLimits, now: float, requests: int, tokens: int, expires_s: float) -> None:
        if requests <= 0 and tokens <= 0:
            return
        args = [_ms(now), max(0, requests), max(0, tokens), _ms(expires_s), f"correction-{os.urandom(6).hex()}"]
        await self._redis.run(_CORRECT, list(self._keys(key.id)), args)

    async def view(self, keys: Sequence[KeyLimits], now: float) -> list[KeyView]:
        names = [name for key in keys for name in self._keys(key.id)]
        out = await self._redis.run(_VIEW, names, [_ms(now)])
        ms = _ms(now)
        views = []
        for i in range(len(keys)):
            q, t, flight, cooled, revoked = (int(v) for v in out[5 * i : 5 * i + 5])
            views.append(KeyView(q, t, flight, max(0.0, (cooled - ms) / 1000), revoked > ms))
        return views
