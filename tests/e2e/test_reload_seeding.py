"""A tenant added by a policy hot reload starts its budget counters from the ledger, as tenants present
at start-up do: what it already spent today counts against its cap."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.metering.ledger_factory import ledger_from_url
from gateway.metering.ledger_rows import LedgerRow
from tests.conftest import Process, start_gateway, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml
from tests.e2e.test_metering import KEY_A, KEY_B, policy_yaml, upstream_yaml

SPENT = Decimal("0.004")


def earlier_spend(tenant: str, request_id: str) -> LedgerRow:
    """A row of a request served earlier today (by an earlier run that still had this tenant)."""
    return LedgerRow(
        request_id=request_id,
        ts=time.time() - 1,
        tenant=tenant,
        key_id="0123456789ab",
        app=None,
        user=None,
        tags={},
        virtual_model="kimi-k2-thinking",
        upstream="sim",
        upstream_model="kimi-k2-thinking",
        stream=False,
        prompt_tokens=1000,
        cached_tokens=0,
        completion_tokens=1000,
        reasoning_tokens=0,
        tool_calls_billed=0,
        cost_usd=SPENT,
        cache_savings_usd=Decimal(0),
        price_version=None,
        ttft_ms=10.0,
        latency_ms=20.0,
        status=200,
        outcome="ok",
        estimated=False,
        estimate_reason=None,
        route_reason="primary",
    )


async def write_rows(db: Path, rows: list[LedgerRow]) -> None:
    ledger = ledger_from_url(f"sqlite:///{db}")
    await ledger.open()
    for row in rows:
        ledger.record(row)
    await ledger.close()


def used_today(gw: Process, key: str) -> Decimal:
    resp = httpx.get(gw.url + "/v1/budget", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert resp.status_code == 200, resp.text
    [tenant] = resp.json()["data"]
    return Decimal(next(w for w in tenant["windows"] if w["window"] == "daily")["used_usd"])


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_tenant_added_by_reload_starts_from_its_ledger_spend(tmp_path: Path, sim: Process, backend: str) -> None:
    url, ns = shared_redis() if backend == "redis" else ("", "")
    state = state_yaml(url, ns) if backend == "redis" else ""
    policy_a = policy_yaml("tenant-a", KEY_A, "budget: {daily_usd: 1}\n")
    config = write_gateway(tmp_path, upstream_yaml(sim), policy_a, extra_yaml=state, name="reseed")
    asyncio.run(
        write_rows(
            tmp_path / "reseed-ledger.db", [earlier_spend("tenant-b", "early-b"), earlier_spend("tenant-a", "a")]
        )
    )
    gw = start_gateway(config)
    try:
        assert used_today(gw, KEY_A) == SPENT  # start-up seeding, for comparison
        # tenant-b arrives by reload with a cap its earlier spend nearly exhausts
        cap = "budget: {daily_usd: '0.0045', when_exhausted: reject}\n"
        (tmp_path / "reseed-policies" / "b.yaml").write_text(policy_yaml("tenant-b", KEY_B, cap))
        deadline = time.monotonic() + 10
        while "policies reloaded" not in gw.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "policies reloaded" in gw.output()
        assert used_today(gw, KEY_B) == SPENT
        client = OpenAI(base_url=gw.url + "/v1", api_key=KEY_B, max_retries=0)
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
        for stream in (False, True):  # $0.0025 of output fits the cap, not what is left of it
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(**body, stream=stream)  # type: ignore[call-overload]
            assert info.value.response.json()["error"]["code"] == "budget_exceeded"
        # a reload that changes nothing for tenant-b seeds nothing twice
        (tmp_path / "reseed-policies" / "b.yaml").write_text(policy_yaml("tenant-b", KEY_B, cap) + "\n# touched\n")
        deadline = time.monotonic() + 10
        while gw.output().count("policies reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.output().count("policies reloaded") == 2
        assert used_today(gw, KEY_B) == SPENT
    finally:
        gw.stop()
        if backend == "redis":
            drop_namespace(url, ns)
