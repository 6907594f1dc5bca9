"""``kimi-gateway serve --workers 2`` with Redis state, the documented way to use every core of one
machine: both worker processes answer, one budget holds across them for streams and non-streams
alike, and SIGTERM to the supervisor drains each worker so a stream in flight on either finishes."""

from __future__ import annotations

import asyncio
import json
import signal
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, Process, free_port, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml
from tests.e2e.test_metering import ADMIN, KEY_A, MISS, OUT, M, policy_yaml, spend_total, upstream_yaml
from tests.e2e.test_sigterm_drain import KEY, StreamInFlight, finished_ok, readyz
from tests.waiting import wait_until

pytestmark = pytest.mark.redis
ENV = {"KIMI_GATEWAY_ADMIN_KEY": ADMIN}
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def serve_workers(config: Path, n: int = 2) -> Process:
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port), "--workers", str(n)]
    return Process(args, port, config.parent / f"workers-{port}.log", "/readyz", env=ENV)


@pytest.mark.parametrize("stream", [False, True])
def test_two_workers_enforce_one_budget_cap(tmp_path: Path, simulator: Process, stream: bool) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    body = {
        "model": "kimi-k2-thinking",
        "messages": [{"role": "user", "content": "budget across workers"}],
        "max_tokens": 1000,
        "stream": stream,
        "sim": {"fault": {"stall_s": 0.8, "count": -1}},  # every request is in flight at once
    }
    compact = json.dumps(body, separators=(",", ":")).encode()
    # the worst case a reservation holds; a stream's body also gets stream_options added upstream
    # but is bounded from the client's bytes, as here
    per_request = (Decimal(len(compact) // 2 + 16) * MISS + Decimal(1000) * OUT) / M
    cap = (per_request * 10 + Decimal("0.0000001")).quantize(Decimal("0.000000001"))
    policy = policy_yaml("tenant-a", KEY_A, f"budget: {{daily_usd: '{cap}', when_exhausted: reject}}\n")

    async def fire(proc: Process) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=60)) as client:

            async def one(wave: int) -> httpx.Response:
                # five waves 40 ms apart, all still in flight together (the upstream stalls 0.8 s):
                # a worker busy accepting one wave leaves the next to the other more often
                await asyncio.sleep(wave * 0.04)
                return await client.post(proc.url + "/v1/chat/completions", json=body, headers=AUTH)

            return await asyncio.gather(*[one(i % 5) for i in range(50)])

    # the kernel hands each new connection to whichever worker accepts first; on a busy machine one
    # worker can take a whole burst, which proves nothing about sharing, so such a run is repeated
    # with a fresh budget (a new namespace and process), a few times at most
    shared = False
    for attempt in range(8):
        url, ns = shared_redis()
        config = write_gateway(
            tmp_path, upstream_yaml(simulator), policy, extra_yaml=state_yaml(url, ns), name=f"wb{attempt}"
        )
        proc = serve_workers(config)
        try:
            responses = asyncio.run(fire(proc))
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 10, statuses
            assert statuses.count(429) == 40
            assert all(r.json()["error"]["type"] == "budget_exceeded" for r in responses if r.status_code == 429)
            total = wait_until(lambda p=proc: (t := spend_total(p)) and t["requests"] == 50 and t, timeout=10)
            assert Decimal(total["cost_usd"]) <= cap
            answered = {r.headers["x-request-id"][:16] for r in responses}  # the id's per-process prefix
            shared = len(answered) == 2
        finally:
            proc.stop()
            drop_namespace(url, ns)
        if shared:
            break
    assert shared, "one worker took every burst: the cap was never tested across two workers"
    httpx.post(simulator.url + "/_sim/reset")


def test_sigterm_to_the_supervisor_drains_every_worker(tmp_path: Path, sim: Process) -> None:
    url, ns = shared_redis()
    upstreams = upstream_yaml(sim).replace("idle_s: 2, total_s: 5", "idle_s: 10, total_s: 20")
    extra = state_yaml(url, ns) + "\nshutdown: {drain_s: 1.0, grace_s: 20}\n"
    config = write_gateway(tmp_path, upstreams, policy_yaml("t", KEY), extra_yaml=extra, name="wd")
    proc = serve_workers(config)
    try:
        streams = [StreamInFlight(proc.url) for _ in range(4)]  # spread over both workers
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(10) and s.events, (s.status, s.error)
        proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: readyz(proc) == 503, timeout=3)
        wait_until(lambda: readyz(proc) is None, timeout=5)
        for s in streams:
            s.join(20)
            finished_ok(s)
        wait_until(lambda: proc.proc.poll() is not None, timeout=15)
        assert proc.output().count("SIGTERM: draining") == 2  # each worker drained
    finally:
        proc.stop()
        drop_namespace(url, ns)
