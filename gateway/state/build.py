"""Build the configured state backends: one set per process, sharing one Redis pool when configured."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.config import StateConfig
from gateway.state.base import BudgetState, KeyValueState, RateLimitState, StateUnavailable
from gateway.state.key_quota import KeyQuotaState, MemoryKeyQuotaState
from gateway.state.memory import MemoryBudgetState, MemoryKeyValueState, MemoryRateLimitState
from gateway.state.stats_exchange import StatsExchange

log = logging.getLogger("kimi_gateway.state")


@dataclass(slots=True)
class States:
    budgets: BudgetState
    rate_limits: RateLimitState
    kv: KeyValueState
    description: str = "memory"
    link: Any = field(default=None)  # the Redis link (pool + pipelined connection) when shared
    # where replicas pool upstream statistics and breakers (None: this process is on its own)
    stats: StatsExchange | None = None
    # the quotas of upstream key pools (requests, tokens, in flight, cool-downs per key)
    key_quotas: KeyQuotaState = field(default_factory=MemoryKeyQuotaState)

    async def open(self) -> None:
        """Say where state lives; a Redis that does not answer yet is logged, not fatal (the fail
        modes apply until it does)."""
        if self.link is None:
            return
        try:
            await self.link.call("PING")
            log.info("state: %s", self.description)
        except Exception as exc:
            log.warning("state: %s is not answering yet (%s); fail modes apply until it does", self.description, exc)

    async def close(self) -> None:
        for state in (self.budgets, self.rate_limits, self.kv, self.key_quotas):
            with contextlib.suppress(StateUnavailable):
                await state.close()
        if self.link is not None:
            await self.link.close()


def build_states(config: StateConfig, longest_request_s: float) -> States:
    """Memory, or Redis behind the configured fail modes; ``longest_request_s`` bounds how long a
    reservation must live (a request in flight must not lose it)."""
    if config.backend == "memory":
        return States(MemoryBudgetState(), MemoryRateLimitState(), MemoryKeyValueState())
    from gateway.state.failover import FailoverBudgetState, FailoverRateLimitState
    from gateway.state.redis import (
        RedisBudgetState,
        RedisKeyValueState,
        RedisRateLimitState,
        RedisSettings,
        connect,
    )
    from gateway.state.redis_keys import RedisKeyQuotaState
    from gateway.state.redis_stats import RedisStatsExchange

    assert config.url is not None  # the config model requires it for redis
    settings = RedisSettings(
        url=config.url,
        namespace=config.namespace,
        password=os.environ.get(config.password_env) if config.password_env else None,
        connect_timeout_s=config.connect_timeout_s,
        timeout_s=config.timeout_s,
        health_check_interval_s=config.health_check_interval_s,
    )
    link = connect(settings)
    return States(
        FailoverBudgetState(RedisBudgetState(link, longest_request_s + 60), config.fail.budgets),
        FailoverRateLimitState(RedisRateLimitState(link), config.fail.rate_limits),
        RedisKeyValueState(link),
        description=f"redis {config.url} (namespace {config.namespace!r})",
        link=link,
        stats=RedisStatsExchange(link),
        key_quotas=RedisKeyQuotaState(link),
    )
