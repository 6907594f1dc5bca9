"""The backends under test: every state contract test runs against memory and against a real Redis
(a unique namespace per test, deleted afterwards), every ledger test against SQLite and a real
PostgreSQL (a unique schema per test, dropped afterwards); skipped loudly when the server does not
answer, failed under KIMI_GATEWAY_REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.state.base import BudgetState, KeyValueState, RateLimitState
from gateway.state.key_quota import KeyQuotaState, MemoryKeyQuotaState
from gateway.state.memory import MemoryBudgetState, MemoryKeyValueState, MemoryRateLimitState
from tests.conftest import require_service

REDIS_URL = os.environ.get("KIMI_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("KIMI_GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def with_schema(url: str, schema: str) -> str:
    return url + ("&" if "?" in url else "?") + f"schema={schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    try:
        admin = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        require_service("PostgreSQL", f"cannot connect to {PG_URL} ({exc!r}); set KIMI_GATEWAY_TEST_POSTGRES_URL")
        return
    schema = f"kg_ledger_test_{uuid.uuid4().hex[:12]}"
    try:
        yield with_schema(PG_URL, schema)
    finally:
        await admin.execute("SET lock_timeout = '10s'")
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@dataclass
class Backend:
    name: str
    link: Any = None

    @property
    def client(self) -> Any:
        return self.link.client

    @property
    def settings(self) -> Any:
        return self.link.settings

    def budgets(self, reservation_ttl_s: float = 60) -> BudgetState:
        if self.name == "memory":
            return MemoryBudgetState()
        from gateway.state.redis import RedisBudgetState

        return RedisBudgetState(self.link, reservation_ttl_s)

    def rates(self) -> RateLimitState:
        if self.name == "memory":
            return MemoryRateLimitState()
        from gateway.state.redis import RedisRateLimitState

        return RedisRateLimitState(self.link)

    def kv(self, **kwargs: Any) -> KeyValueState:
        if self.name == "memory":
            return MemoryKeyValueState(**kwargs)
        from gateway.state.redis import RedisKeyValueState

        return RedisKeyValueState(self.link)

    def key_quotas(self) -> KeyQuotaState:
        if self.name == "memory":
            return MemoryKeyQuotaState()
        from gateway.state.redis_key_quota import RedisKeyQuotaState

        return RedisKeyQuotaState(self.link)


async def redis_backend(namespace: str | None = None) -> Backend:
    from redis.exceptions import RedisError

    from gateway.state.redis import RedisSettings, connect

    settings = RedisSettings(REDIS_URL, namespace or f"kgtest-{uuid.uuid4().hex[:12]}", timeout_s=1.0)
    link = connect(settings)
    try:
        await link.client.ping()
    except (RedisError, OSError) as exc:
        await link.close()
        require_service("Redis", f"cannot connect to {REDIS_URL} ({exc!r}); set KIMI_GATEWAY_TEST_REDIS_URL")
    return Backend("redis", link)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a 3-master Redis Cluster of this test session's own (started once, ~2 s)."""
    from tests.redis_servers import ClusterServers

    servers = ClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield servers.start().url
    finally:
        servers.stop()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield Backend("memory")
        return
    if request.param == "redis-cluster":
        from gateway.state.redis import RedisSettings, connect

        url = request.getfixturevalue("redis_cluster")
        b = Backend("redis-cluster", connect(RedisSettings(url, f"kgtest-{uuid.uuid4().hex[:12]}", timeout_s=1.0)))
    else:
        b = await redis_backend()
    try:
        yield b
    finally:
        keys = [k async for k in b.client.scan_iter(match=b.settings.namespace + ":*")]
        if keys:
            await b.client.delete(*keys)
        await b.link.close()
