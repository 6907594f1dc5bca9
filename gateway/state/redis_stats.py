"""The stats exchange on Redis: one script per exchange, so merges of racing replicas never interleave.

Keys (all under the deployment's namespace, each with a TTL refreshed on every write):
``<ns>:{routestats}:labels`` (a set of the candidates anyone observed), ``<ns>:{routestats}:up:<label>``
(a hash per candidate) and ``<ns>:{routestats}:tenant:<tenant>`` (a tenant's completion average).
The script reads and writes keys named from its arguments, which a Redis Cluster allows only within
the slot of its first key: the ``{routestats}`` hash tag puts them all in that slot
(:mod:`gateway.state.redis_keys`). Numbers go in and out as strings: Redis would truncate a Lua float reply to an
integer.
"""

from __future__ import annotations

from typing import Any

from gateway.state.redis_keys import ROUTESTATS, family
from gateway.state.redis_link import Batcher, script
from gateway.state.stats_exchange import STATS_TTL_S, Completions, Observed, Rules, SharedStat, StatsExchange

# KEYS: the labels set. ARGV: prefix, now, alpha, breaker failures, cooldown s, ttl s,
# number of observed labels, then per label: label and the 10 fields of Observed;
# number of tenants with completions, then per tenant: name, n, total; then tenants to read.
# Returns {labels..., '|', tenants...}: per label its name and 9 values, per tenant name and average.
_EXCHANGE = script(
    """
local prefix, now, alpha = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, cooldown, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function fold(old, old_n, n, total)
  if n <= 0 then return old end
  local mean = total / n
  if old == nil or old_n <= 0 then return mean end
  return old + (1 - (1 - alpha) ^ n) * (mean - old)
end
local function num(x) if x then return tonumber(x) end return nil end
local function str(x) if x == nil then return '' end return tostring(x) end
local fields = {'ttft', 'ttft_n', 'tps', 'tps_n', 'samples', 'hit', 'cache_n', 'cf', 'open_until', 'opened_at'}
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  local label = ARGV[i]
  local o = {}
  for j = 1, 10 do o[j] = tonumber(ARGV[i + j]) end
  i = i + 11
  local key = prefix .. 'up:' .. label
  local h = redis.call('HMGET', key, unpack(fields))
  local ttft_n, tps_n, cache_n = tonumber(h[2] or '0'), tonumber(h[4] or '0'), tonumber(h[7] or '0')
  local ttft = fold(num(h[1]), ttft_n, o[2], o[3])
  local tps = fold(num(h[3]), tps_n, o[4], o[5])
  local hit = fold(num(h[6]), cache_n, o[6], o[7])
  local cf, open_until, opened_at = tonumber(h[8] or '0'), tonumber(h[9] or '0'), tonumber(h[10] or '0')
  if o[9] > 0 and o[9] >= opened_at then cf, open_until = 0, 0 end
  cf = cf + o[8]
  if (cf >= threshold or o[10] == 1) and open_until <= now then open_until, opened_at = now + cooldown, now end
  redis.call('HSET', key, 'ttft', str(ttft), 'ttft_n', ttft_n + o[2], 'tps', str(tps), 'tps_n', tps_n + o[4],
    'samples', tonumber(h[5] or '0') + o[1], 'hit', str(hit), 'cache_n', cache_n + o[6], 'cf', cf,
    'open_until', string.format('%.6f', open_until), 'opened_at', string.format('%.6f', opened_at))
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', KEYS[1], label)
end
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
for _ = 1, tonumber(ARGV[i]) do
  local key, n, total = prefix .. 'tenant:' .. ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 3
  local h = redis.call('HMGET', key, 'avg', 'n')
  local old_n = tonumber(h[2] or '0')
  redis.call('HSET', key, 'avg', tostring(fold(num(h[1]), old_n, n, total)), 'n', old_n + n)
  redis.call('EXPIRE', key, ttl)
end
i = i + 1
local out = {}
for _, label in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', prefix .. 'up:' .. label, unpack(fields))
  if h[2] then
    local open_until = tonumber(h[9])
    if open_until <= now then open_until = 0 end
    out[#out + 1] = label
    for j = 1, 8 do out[#out + 1] = h[j] end
    out[#out + 1] = string.format('%.6f', open_until)
  else
    redis.call('SREM', KEYS[1], label)
  end
end
out[#out + 1] = '|'
for j = i, #ARGV do
  local avg = redis.call('HGET', prefix .. 'tenant:' .. ARGV[j], 'avg')
  if avg then out[#out + 1] = ARGV[j]; out[#out + 1] = avg end
end
return out
"""
)


def _float(x: bytes) -> float | None:
    return float(x) if x else None


class RedisStatsExchange(StatsExchange):
    def __init__(self, link: Batcher, ttl_s: float = STATS_TTL_S) -> None:
        self._redis = link
        self._prefix = family(link.settings.namespace, ROUTESTATS)
        self.ttl_s = ttl_s

    async def exchange(
        self,
        rules: Rules,
        observed: dict[str, Observed],
        completions: dict[str, Completions],
        tenants: list[str],
        now: float,
    ) -> tuple[dict[str, SharedStat], dict[str, float]]:
        args: list[Any] = [self._prefix, repr(now), repr(rules.alpha), rules.breaker_failures, repr(rules.cooldown_s)]
        args += [max(1, int(self.ttl_s)), len(observed)]
        for label, o in observed.items():
            args += [label, o.samples, o.ttft_n, repr(o.ttft_sum), o.tps_n, repr(o.tps_sum), o.cache_n]
            args += [repr(o.cache_sum), o.failures, repr(o.success_at), int(o.opened)]
        args.append(len(completions))
        for tenant, c in completions.items():
            args += [tenant, c.n, repr(c.total)]
        args += tenants
        out = await self._redis.run(_EXCHANGE, [self._prefix + "labels"], args)
        split = out.index(b"|")
        stats: dict[str, SharedStat] = {}
        for k in range(0, split, 10):
            label, ttft, _, tps, _, samples, hit, cache_n, cf, open_until = out[k : k + 10]
            stats[label.decode()] = SharedStat(
                _float(ttft), _float(tps), int(samples), _float(hit), int(cache_n), int(cf), float(open_until)
            )
        averages = {out[k].decode(): float(out[k + 1]) for k in range(split + 1, len(out), 2)}
        return stats, averages
