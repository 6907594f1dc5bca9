"""Several gateway processes on one Redis answer as one: one budget cap, one rate limit, metrics that
add up across workers; and a Redis that hangs, dies and comes back mid-load fails requests cleanly
(or serves them, by config) without losing a ledger row or needing a gateway restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, Process, free_port, start_gateway, write_gateway
from tests.e2e.redis_helpers import RedisServer, drop_namespace, shared_redis, state_yaml
from tests.e2e.test_metering import ADMIN, KEY_A, MISS, OUT, M, policy_yaml, spend_total, upstream_yaml

pytestmark = pytest.mark.redis
ENV = {"KIMI_GATEWAY_ADMIN_KEY": ADMIN}
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def replicas(tmp_path: Path, sim: Process, policy: str, state: str, n: int = 2) -> list[Process]:
    """``n`` gateways with the same tenant policy and Redis state, each with its own ledger file."""
    procs: list[Process] = []
    try:
        for i in range(n):
            config = write_gateway(tmp_path, upstream_yaml(sim), policy, extra_yaml=state, name=f"replica{i}")
            procs.append(start_gateway(config, env=ENV))
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url, socket_timeout=2)


async def fire(urls: list[str], n: int, body: dict) -> list[httpx.Response]:
    """``n`` requests at once, spread round-robin over the replicas."""
    async with httpx.AsyncClient(timeout=20) as client:
        return await asyncio.gather(
            *[client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=AUTH) for i in range(n)]
        )


def test_two_replicas_enforce_one_budget_cap(tmp_path: Path, simulator: Process) -> None:
    url, ns = shared_redis()
    httpx.post(simulator.url + "/_sim/reset")
    body = {
        "model": "kimi-k2-thinking",
        "messages": [{"role": "user", "content": "budget across replicas"}],
        "max_tokens": 1000,
        "sim": {"fault": {"stall_s": 0.8}},  # every request is in flight at once
    }
    compact = json.dumps(body, separators=(",", ":")).encode()
    per_request = (Decimal(len(compact) // 2 + 16) * MISS + Decimal(1000) * OUT) / M
    cap = (per_request * 10 + Decimal("0.0000001")).quantize(Decimal("0.000000001"))
    policy = policy_yaml("tenant-a", KEY_A, f"budget: {{daily_usd: '{cap}', when_exhausted: reject}}\n")
    procs = replicas(tmp_path, simulator, policy, state_yaml(url, ns, timeout_s=1.0))
    try:
        responses = asyncio.run(fire([p.url for p in procs], 50, body))
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 40
        assert all(r.json()["error"]["type"] == "budget_exceeded" for r in responses if r.status_code == 429)
        # both replicas answered (25 each): enforced per process, the cap would have let 20 through;
        # which replica won which of the ten is a race, so it is not asserted
        answered = {r.headers["x-request-id"][:16] for r in responses}
        assert len(answered) == 2
        totals = [spend_total(p) for p in procs]
        spent = sum(Decimal(t["cost_usd"]) for t in totals)
        assert spent <= cap
        assert sum(t["requests"] for t in totals) == 50
        # no reservation leaked: nothing open, nothing reserved, used is exactly what was spent
        r = redis_client(url)
        assert r.zcard(f"{ns}:{{budgets}}:reservations") == 0
        counters = [k for k in r.scan_iter(match=f"{ns}:{{budgets}}:budget:tenant-a:*") if not k.endswith(b":open")]
        assert counters and all(int(r.hget(k, "reserved") or 0) == 0 for k in counters)
        [tenant] = httpx.get(procs[1].url + "/v1/budget", headers=AUTH).json()["data"]
        daily = next(w for w in tenant["windows"] if w["window"] == "daily")
        assert Decimal(daily["used_usd"]) == spent
    finally:
        for proc in procs:
            proc.stop()
        drop_namespace(url, ns)


def test_two_replicas_share_one_rate_limit(tmp_path: Path, sim: Process) -> None:
    url, ns = shared_redis()
    policy = policy_yaml("tenant-a", KEY_A, "rate_limits: {rpm: 6}\n")
    procs = replicas(tmp_path, sim, policy, state_yaml(url, ns))
    try:
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "rate"}], "max_tokens": 5}
        statuses = []
        for i in range(10):  # alternating: each replica alone would admit all five of its own
            stream = i % 4 >= 2
            resp = httpx.post(
                procs[i % 2].url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH, timeout=10
            )
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                assert resp.headers["x-ratelimit-remaining-requests"] == str(5 - i)
            else:
                assert resp.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in resp.headers
        assert statuses == [200] * 6 + [429] * 4
    finally:
        for proc in procs:
            proc.stop()
        drop_namespace(url, ns)


def test_workers_share_state_and_metrics_add_up(tmp_path: Path, sim: Process) -> None:
    """``serve --workers 2`` with Redis state: both workers answer, the budget and /metrics span both."""
    url, ns = shared_redis()
    policy = policy_yaml("tenant-a", KEY_A, "budget: {daily_usd: 100}\nrate_limits: {rpm: 1000}\n")
    config = write_gateway(tmp_path, upstream_yaml(sim), policy, extra_yaml=state_yaml(url, ns), name="workers")
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port), "--workers", "2"]
    proc = Process(args, port, tmp_path / "workers.log", "/readyz", env=ENV)
    try:
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "workers"}], "max_tokens": 5}
        sent, prefixes = 0, set()
        while len(prefixes) < 2 and sent < 400:
            for r in asyncio.run(fire([proc.url], 20, body)):
                assert r.status_code == 200, r.text
                prefixes.add(r.headers["x-request-id"][:16])
            sent += 20
        assert len(prefixes) == 2, "one worker answered everything"

        def counted() -> float:
            text = httpx.get(proc.url + "/metrics").text
            found = re.findall(r'^gateway_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
            return sum(float(v) for v in found)

        # each worker writes its counts to its multiprocess file as it serves; whichever worker answers
        # a scrape adds up every file, so every scrape reports both workers' requests, never more than
        # were sent (the deadline only covers the requests' own settling after their answers)
        deadline = time.monotonic() + 5.0
        while (seen := counted()) < sent and time.monotonic() < deadline:
            assert seen <= sent
            time.sleep(0.1)
        for _ in range(6):
            assert counted() == sent
        assert spend_total(proc)["requests"] == sent
    finally:
        proc.stop()
        drop_namespace(url, ns)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # the test process is untouched


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_redis_hang_and_restart_mid_load(tmp_path: Path, sim: Process, fail: str) -> None:
    """Load runs while Redis first hangs (SIGSTOP: timeouts), then dies and restarts (refused, then a
    fresh connection). Every request ends within its bound as 200 or, failing closed, 503; every
    request has its ledger row; the shared counters end equal to the ledger; the last second is all
    200 without restarting the gateway."""
    redis_server = RedisServer(tmp_path, persist=True)
    redis_server.start()
    proc = None
    try:
        policy = policy_yaml("tenant-a", KEY_A, "budget: {daily_usd: 100}\nrate_limits: {rpm: 100000}\n")
        state = state_yaml(redis_server.url, "kgtest-fault", fail=fail, timeout_s=0.2)
        config = write_gateway(tmp_path, upstream_yaml(sim), policy, extra_yaml=state, name="fault")
        proc = start_gateway(config, env=ENV)
        results: list[tuple[float, float, int, dict]] = []  # start, duration, status, error
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "fault"}], "max_tokens": 5}

        async def worker(client: httpx.AsyncClient, until: float, stream: bool) -> None:
            while time.monotonic() < until:
                started = time.monotonic()
                resp = await client.post(
                    proc.url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH
                )
                error = resp.json().get("error") if resp.status_code != 200 else None
                if resp.status_code == 200 and stream:  # a whole stream, never a cut one
                    assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-200:]
                results.append((started, time.monotonic() - started, resp.status_code, error or {}))

        async def chaos() -> None:
            assert redis_server.proc is not None
            await asyncio.sleep(1.0)
            redis_server.proc.send_signal(signal.SIGSTOP)  # hangs: every call times out
            await asyncio.sleep(1.5)
            redis_server.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.0)
            redis_server.stop()  # dies: connections drop, then are refused
            await asyncio.sleep(1.5)
            redis_server.start()  # same port, data reloaded from its append-only file

        async def run() -> float:
            start = time.monotonic()
            async with httpx.AsyncClient(timeout=5) as client:  # a hang would raise ReadTimeout here
                await asyncio.gather(chaos(), *(worker(client, start + 9.0, i % 2 == 1) for i in range(4)))
            return start

        start = asyncio.run(run())
        statuses = {status for _, _, status, _ in results}
        assert statuses <= ({200, 503} if fail == "closed" else {200}), statuses
        assert max(duration for _, duration, _, _ in results) < 2.5
        refused = [error for _, _, status, error in results if status == 503]
        if fail == "closed":
            assert refused, "no request saw the outage"
            assert all(e["code"] == "state_unavailable" and "fail closed" in e["message"] for e in refused)
        last = [status for begun, _, status, _ in results if begun > start + 8.0]
        assert last and set(last) == {200}, "the gateway did not recover by itself"
        total = poll(lambda: spend_total(proc), lambda t: t["requests"] == len(results))
        assert total["requests"] == len(results)  # no ledger row lost
        # what Redis missed was replayed: the shared counter equals the ledger's spend
        used = poll(
            lambda: httpx.get(proc.url + "/v1/budget", headers=AUTH).json()["data"][0]["windows"][0]["used_usd"],
            lambda v: Decimal(v) == Decimal(total["cost_usd"]),
            timeout=15,
        )
        assert Decimal(used) == Decimal(total["cost_usd"])
        assert "shared state unavailable" in proc.output() and "answers again" in proc.output()
        metrics = httpx.get(proc.url + "/metrics").text
        assert re.search(r'^gateway_state_unavailable_total\{concern="budgets"\} [1-9]', metrics, re.M)
    finally:
        if proc is not None:
            proc.stop()
        redis_server.stop()


def poll(get, done, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    value = get()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = get()
    return value


def test_gateway_started_before_redis_serves_once_it_answers(tmp_path: Path, sim: Process) -> None:
    """Start-up does not wait for Redis (seeding is replayed later); until Redis answers, a budgeted
    request fails closed at once; then the gateway connects by itself."""
    redis_server = RedisServer(tmp_path)
    policy = policy_yaml("tenant-a", KEY_A, "budget: {daily_usd: 100}\n")
    state = state_yaml(redis_server.url, "kgtest-late", timeout_s=0.2)
    config = write_gateway(tmp_path, upstream_yaml(sim), policy, extra_yaml=state, name="late")
    started = time.monotonic()
    proc = start_gateway(config, env=ENV)
    try:
        assert time.monotonic() - started < 10
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "late"}], "max_tokens": 5}
        before = time.monotonic()
        resp = httpx.post(proc.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=5)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "state_unavailable"
        assert time.monotonic() - before < 2
        redis_server.start()
        status = poll(
            lambda: httpx.post(proc.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=5).status_code,
            lambda s: s == 200,
        )
        assert status == 200
        assert "not answering yet" in proc.output()
    finally:
        proc.stop()
        redis_server.stop()
