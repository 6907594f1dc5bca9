"""The ``state`` section: Redis settings validated with precise messages, and the app built from it
hands the request path Redis-backed budgets, rate limits and key-value state."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import GatewayApp
from gateway.state.failover import FailoverBudgetState, FailoverRateLimitState
from gateway.state.memory import MemoryKeyValueState
from gateway.state.redis import RedisKeyValueState
from gateway.wiring import load_all
from tests.conftest import write_gateway
from tests.unit.conftest import redis_backend
from tests.unit.test_config_errors import GOOD_UPSTREAMS, problems

SIM = "  sim: {kind: simulated, profile: instant, models: [kimi-k2-thinking]}\n"
POLICY = (
    f'tenant: acme\nkeys: ["sha256:{"a" * 64}"]\nmodels:\n  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}\n'
)


def app_with(tmp_path: Path, state: str = "") -> GatewayApp:
    return GatewayApp(load_all(write_gateway(tmp_path, SIM, POLICY, extra_yaml=state)))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("{backend: redis}", "backend 'redis' needs url"),
        ("{backend: memory, url: 'redis://h:6379/0'}", "for backend 'redis' only"),
        ("{backend: redis, url: 'http://h:6379'}", "expected redis://"),
        ("{backend: redis, url: 'redis://:hunter2@h:6379/0'}", "password_env"),
        ("{backend: redis, url: 'redis://h/0', fail: {budgets: maybe}}", "state.fail.budgets"),
        ("{backend: redis, url: 'redis://h/0', namespace: 'a b'}", "state.namespace"),
        ("{backend: redis, url: 'redis://h/0', password_env: NO_SUCH_VAR_KG}", "NO_SUCH_VAR_KG is not set"),
    ],
)
def test_state_mistakes_are_named(tmp_path: Path, state: str, expected: str) -> None:
    found = problems(tmp_path, f"state: {state}\n" + GOOD_UPSTREAMS)
    assert any(expected in p for p in found), found
    assert "hunter2" not in " ".join(found)


def test_memory_is_the_default(tmp_path: Path) -> None:
    app = app_with(tmp_path)
    assert isinstance(app.runtime.kv, MemoryKeyValueState)


@pytest.mark.redis
async def test_redis_state_reaches_the_request_path(tmp_path: Path) -> None:
    """Runtime.kv is the Redis key-value state, so whatever is stored through it (the reasoning store,
    affinity) is seen by every replica: two apps on one namespace share entries."""
    b = await redis_backend()
    await b.link.close()
    ns = b.settings.namespace
    state = f"state: {{backend: redis, url: '{b.settings.url}', namespace: {ns}, fail: {{budgets: open}}}}\n"
    apps = [app_with(tmp_path, state) for _ in range(2)]
    try:
        assert isinstance(apps[0].runtime.kv, RedisKeyValueState)
        assert isinstance(apps[0].budgets.state, FailoverBudgetState) and apps[0].budgets.state.mode == "open"
        assert isinstance(apps[0].runtime.limits.state, FailoverRateLimitState)
        assert apps[0].runtime.limits.state.mode == "closed"
        await apps[0].runtime.kv.put("reasoning:acme:turn1", b"thought", 30)
        assert await apps[1].runtime.kv.get("reasoning:acme:turn1") == b"thought"
        await apps[1].runtime.kv.delete("reasoning:acme:turn1")
    finally:
        for app in apps:
            await app.state.close()


def test_replicas_config_is_valid() -> None:
    """config/replicas.yaml (docker-compose.replicas.yml runs it) validates with Redis state."""
    from gateway.config import load_config
    from tests.conftest import ROOT

    loaded = load_config(ROOT / "config" / "replicas.yaml")
    state = loaded.settings.state
    assert state.backend == "redis" and state.fail.budgets == "closed" and loaded.settings.workers == 2
