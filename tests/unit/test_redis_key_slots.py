"""On a Redis Cluster a script may touch only keys of one hash slot. Every state call is recorded here
(no server: a link that answers each script with a reply of the right shape) and, for every script
and every key family, the keys it names and the keys it derives inside Lua (a counter's ``:open``
set, the statistics' per-label hashes) must hash to one slot by redis-py's own ``key_slot``. A new
script that no call here reaches fails the coverage test."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.crc import key_slot

from gateway.state import redis as redis_state
from gateway.state import redis_key_quota, redis_stats
from gateway.state.base import Limit, RateLimit
from gateway.state.key_quota import KeyLimits
from gateway.state.redis import RedisBudgetState, RedisKeyValueState, RedisRateLimitState
from gateway.state.redis_link import RedisSettings, Script
from gateway.state.redis_stats import RedisStatsExchange
from gateway.state.stats_exchange import Completions, Observed, Rules

NS = "kimi-gateway"
# counters of two tenants, their apps, days and months: the tag, not the names, decides the slot
BUDGET_LINES = [
    Limit("budget:acme:tenant:d20424", 10**12, 86400),
    Limit("budget:acme:tenant:m669", 10**12, 86400 * 40),
    Limit("budget:acme:app=ci:d20424", 10**9, 86400),
    Limit("budget:globex:tenant:d20424", 10**12, 86400),
]
RATE_LIMITS = [
    RateLimit("rate:acme:tenant:rpm", 1000, 60, 1),
    RateLimit("rate:acme:tenant:tpm", 10**6, 60, 500),
    RateLimit("rate:acme:key=0123456789ab:rpm", 100, 60, 1),
    RateLimit("rate:globex:tenant:rpm", 1000, 60, 1),
]


class RecordingLink:
    """The link interface, answering without a server; every script call and command is kept."""

    def __init__(self, cluster: bool = False) -> None:
        self.settings = RedisSettings("redis://127.0.0.1:6379/0", NS)
        self.cluster = cluster
        self.scripts: list[tuple[Script, list[str], list[Any]]] = []
        self.commands: list[tuple[Any, ...]] = []

    async def run(self, s: Script, keys: list[str], args: list[Any]) -> Any:
        self.scripts.append((s, keys, args))
        if s is redis_state._HIT:
            return [1] + [0, 0, 0, 0] * len(keys)
        if s is redis_state._USED:
            return [b"0", b"0"]
        if s is redis_state._RESERVE:
            return [0]
        if s is redis_stats._EXCHANGE:
            return [b"|"]
        if s is redis_key_quota._ACQUIRE:
            return [1, 0] + [b"ok"] * (len(keys) // 3)
        if s is redis_key_quota._VIEW:
            return [0] * (5 * (len(keys) // 3))
        return 0

    async def call(self, *args: Any) -> Any:
        self.commands.append(args)
        return [None] * (len(args) - 1) if args[0] == "MGET" else None


def all_scripts() -> dict[str, Script]:
    found = {}
    for module in (redis_state, redis_stats, redis_key_quota):
        for name, value in vars(module).items():
            if isinstance(value, Script):
                found[f"{module.__name__}.{name}"] = value
    return found


async def every_state_call(link: RecordingLink) -> None:
    budgets = RedisBudgetState(link, reservation_ttl_s=600)  # type: ignore[arg-type]
    rates = RedisRateLimitState(link)  # type: ignore[arg-type]
    kv = RedisKeyValueState(link)  # type: ignore[arg-type]
    stats = RedisStatsExchange(link)  # type: ignore[arg-type]
    for lines in (BUDGET_LINES[:1], BUDGET_LINES[:3], BUDGET_LINES):
        await budgets.reserve("req_1", lines, 1000)
        await budgets.add_spent_once("req_2", lines, 1000)
    await budgets.settle("req_1", 900)
    await budgets.used(BUDGET_LINES[2].key)
    await budgets.add_spent(BUDGET_LINES[0].key, 5, 86400)
    await budgets.seed(BUDGET_LINES[3].key, 5, 86400)
    await budgets.open_reservations()
    await rates.hit(RATE_LIMITS, time.time())
    await rates.adjust(RATE_LIMITS[1].key, 60, 29_000_000, -100)
    rules = Rules(alpha=0.2, breaker_failures=3, cooldown_s=30)
    observed = {"kimi/us": Observed(samples=1, ttft_n=1, ttft_sum=0.5), "kimi/eu": Observed(failures=1)}
    await stats.exchange(rules, observed, {"acme": Completions(2, 300.0)}, ["acme", "globex"], time.time())
    await kv.get_many(["affinity:acme:aa", "reasoning:acme:bb", "affinity:globex:cc"])
    await kv.put("affinity:acme:aa", b"x", 60)
    await kv.put_if_absent("seal:key", b"k", 60)
    await kv.get("seal:key")
    await kv.delete("affinity:acme:aa")
    quotas = redis_key_quota.RedisKeyQuotaState(link)  # type: ignore[arg-type]
    pool = [KeyLimits("moonshot/a/f1", 500, 100_000, 10), KeyLimits("moonshot/b/f2"), KeyLimits("moonshot/c/f3", 3)]
    await quotas.acquire(pool, [1000, 1000, 1000], "lease-1", time.time(), 600, least_loaded=False)
    await quotas.adjust(pool[0], "lease-1", 1000, 800)
    await quotas.cool(pool[1], time.time() + 5)
    await quotas.revoke(pool[2], time.time() + 3600)
    await quotas.correct(pool[0], time.time(), 3, 4000, 60)
    await quotas.view(pool, time.time())


def derived_keys(s: Script, keys: list[str], args: list[Any]) -> list[str]:
    """Keys a script reaches without naming them in KEYS (computed inside Lua)."""
    if s is redis_state._RESERVE:  # the settlement later reaches <counter>:open through the record
        return [counter + ":open" for counter in keys[2::2]]
    if s is redis_stats._EXCHANGE:
        prefix = args[0]
        labels = [args[7 + 11 * i] for i in range(args[6])]
        n_tenants_at = 7 + 11 * args[6]
        tenants = [args[n_tenants_at + 1 + 3 * i] for i in range(args[n_tenants_at])]
        tenants += args[n_tenants_at + 1 + 3 * args[n_tenants_at] :]
        return [prefix + "up:" + label for label in labels] + [prefix + "tenant:" + t for t in tenants]
    return []


async def test_every_script_keeps_its_keys_in_one_slot() -> None:
    link = RecordingLink()
    await every_state_call(link)
    assert link.scripts
    for s, keys, args in link.scripts:
        touched = keys + derived_keys(s, keys, args)
        slots = {key_slot(k.encode()) for k in touched}
        assert len(slots) == 1, f"a script touches keys of {len(slots)} slots: {touched}"
        assert all(k.startswith(NS + ":{") for k in touched), touched  # namespace first, then the tag


async def test_every_script_is_covered_by_the_slot_check() -> None:
    link = RecordingLink()
    await every_state_call(link)
    called = {id(s) for s, _, _ in link.scripts}
    missing = sorted(name for name, s in all_scripts().items() if id(s) not in called)
    assert not missing, f"scripts whose keys no test checks for one slot: {missing}"


@pytest.mark.parametrize(
    ("family", "tag"),
    [("budgets", "{budgets}"), ("rates", "{rates}"), ("routestats", "{routestats}")],
)
async def test_each_counter_family_has_its_documented_tag(family: str, tag: str) -> None:
    """The tag per family is the one gateway/state/redis_keys.py and the README document."""
    link = RecordingLink()
    await every_state_call(link)
    module_of = {"budgets": "RedisBudgetState", "rates": "RedisRateLimitState", "routestats": "RedisStatsExchange"}
    scripts = {
        "budgets": [redis_state._RESERVE, redis_state._SETTLE, redis_state._USED, redis_state._ADD_SPENT],
        "rates": [redis_state._HIT, redis_state._ADJUST],
        "routestats": [redis_stats._EXCHANGE],
    }[family]
    keys = [k for s, ks, _ in link.scripts if s in scripts for k in ks]
    assert keys, module_of[family]
    assert all(k.startswith(f"{NS}:{tag}:") for k in keys), keys
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_key_value_entries_spread_and_a_cluster_reads_them_one_key_per_command() -> None:
    """Key-value entries carry no tag (they are the bulk of the memory): several keys are read with
    MGET on one server, with one GET each on a cluster, never one command across slots."""
    single, cluster = RecordingLink(), RecordingLink(cluster=True)
    await every_state_call(single)
    await every_state_call(cluster)
    assert any(c[0] == "MGET" for c in single.commands)
    assert not any(c[0] == "MGET" for c in cluster.commands)
    for command in cluster.commands:
        keys = [a for a in command[1:] if isinstance(a, str) and a.startswith(NS + ":")]
        assert len(keys) == 1, command
        assert keys[0].startswith(f"{NS}:kv:") and "{" not in keys[0]
    gets = [c[1] for c in cluster.commands if c[0] == "GET"]
    assert len({key_slot(k.encode()) for k in gets}) > 1  # spread over slots, not pinned to one
