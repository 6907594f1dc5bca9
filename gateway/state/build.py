"""Build the configured state backends: one set per process, sharing one Redis pool when configured."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import StateConfig
from gateway.state.base import BudgetState, KeyValueState, RateLimitState, StateUnavailable
from gateway.state.key_quota import KeyQuotaState, MemoryKeyQuotaState
from gateway.state.memory import MemoryBudgetState, MemoryKeyValueState, MemoryRateLimitState
from gateway.state.stats_exchange import StatsExchange

if TYPE_CHECKING:
    from gateway.state.redis_connect import RedisSettings

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


def redis_settings(config: StateConfig, base_dir: Path | None = None) -> RedisSettings:
    """The connection settings for ``config`` (a redis backend): its address as parsed by
    :mod:`gateway.redisurl`, secrets from the environment, TLS files relative to ``base_dir`` (the
    config file's folder)."""
    from gateway.state.redis_connect import RedisSettings

    assert config.url is not None or config.sentinels  # the config model requires one for redis
    target = config.target()
    tls = config.tls

    def path(value: str | None) -> str | None:
        if value is None or base_dir is None:
            return value
        return str((base_dir / value).resolve())

    return RedisSettings(
        url=config.url or "sentinel://" + ",".join(config.sentinels or ()),
        namespace=config.namespace,
        password=os.environ.get(config.password_env) if config.password_env else None,
        connect_timeout_s=config.connect_timeout_s,
        timeout_s=config.timeout_s,
        health_check_interval_s=config.health_check_interval_s,
        target=target,
        username=config.username,
        sentinel_password=os.environ.get(config.sentinel_password_env) if config.sentinel_password_env else None,
        tls_ca_file=path(tls.ca_file) if tls else None,
        tls_cert_file=path(tls.cert_file) if tls else None,
        tls_key_file=path(tls.key_file) if tls else None,
        tls_check_hostname=tls.check_hostname if tls else True,
        wait_replicas=config.wait_replicas,
    )


def describe(settings: RedisSettings) -> str:
    """Where state lives, for the start-up log line (no secret: passwords never sit in these)."""
    target = settings.resolved
    tls = " over TLS" if target.tls else ""
    nodes = ",".join(f"{host}:{port}" for host, port in target.nodes)
    where = {
        "single": f"redis {target.url}",
        "cluster": f"redis cluster via {nodes}",
        "sentinel": f"redis master {target.master!r} via sentinels {nodes}",
    }[target.topology]
    wait = f", writes confirmed by {settings.wait_replicas} replicas" if settings.wait_replicas else ""
    return f"{where}{tls} (namespace {settings.namespace!r}{wait})"


def build_states(config: StateConfig, longest_request_s: float, base_dir: Path | None = None) -> States:
    """Memory, or Redis behind the configured fail modes; ``longest_request_s`` bounds how long a
    reservation must live (a request in flight must not lose it)."""
    if config.backend == "memory":
        return States(MemoryBudgetState(), MemoryRateLimitState(), MemoryKeyValueState())
    from gateway.state.failover import FailoverBudgetState, FailoverRateLimitState
    from gateway.state.redis import RedisBudgetState, RedisKeyValueState, RedisRateLimitState, connect
    from gateway.state.redis_key_quota import RedisKeyQuotaState
    from gateway.state.redis_stats import RedisStatsExchange

    settings = redis_settings(config, base_dir)
    link = connect(settings)
    return States(
        FailoverBudgetState(RedisBudgetState(link, longest_request_s + 60), config.fail.budgets),
        FailoverRateLimitState(RedisRateLimitState(link), config.fail.rate_limits),
        RedisKeyValueState(link),
        description=describe(settings),
        link=link,
        stats=RedisStatsExchange(link),
        key_quotas=RedisKeyQuotaState(link),
    )
