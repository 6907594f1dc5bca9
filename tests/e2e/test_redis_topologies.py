"""The gateway on Redis beyond one plain server, each started by the test: a 3-master Redis Cluster,
a master + replica behind 3 sentinels forced through a failover under load, and a TLS-only server
with client certificates and an ACL user. Budgets and rate limits hold on each, streamed and not."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, hashed, running, start_gateway, write_gateway
from tests.e2e.test_metering import ADMIN, KEY_A, KEY_B, MISS, OUT, M, policy_yaml, spend_total, upstream_yaml
from tests.redis_servers import ClusterServers, SentinelServers, TLSServer, client
from tests.waiting import settled, wait_until

pytestmark = pytest.mark.redis
ENV = {"KIMI_GATEWAY_ADMIN_KEY": ADMIN}
BODY = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "beyond one node"}], "max_tokens": 1000}


def worst_case(body: dict) -> Decimal:
    compact = json.dumps(body, separators=(",", ":")).encode()  # prompt tokens bounded by bytes / 2 + 16
    return (Decimal(len(compact) // 2 + 16) * MISS + Decimal(body["max_tokens"]) * OUT) / M


def cap_for(n: int, body: dict) -> Decimal:
    """A daily cap that fits the worst case of exactly ``n`` requests."""
    return (worst_case(body) * n + Decimal("0.0000001")).quantize(Decimal("0.000000001"))


def budget_policy(n: int, body: dict, rpm: int = 100_000) -> str:
    cap = cap_for(n, body)
    return policy_yaml(
        "tenant-a", KEY_A, f"budget: {{daily_usd: '{cap}', when_exhausted: reject}}\nrate_limits: {{rpm: {rpm}}}\n"
    )


def bodies(n: int, stream: bool) -> list[dict]:
    """``n`` requests of one size (so one worst case), different prompts, all in flight at once (the
    upstream stalls), so that their reservations compete for the cap."""
    return [
        {**BODY, "messages": [{"role": "user", "content": f"prompt {i:03d} " * 40}], "stream": stream,
         "sim": {"fault": {"stall_s": 0.8}}}
        for i in range(n)
    ]  # fmt: skip


def fire(gateway: Process, sent: list[dict]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        gateway.url + "/v1/chat/completions", json=b, headers={"Authorization": f"Bearer {KEY_A}"}
                    )
                    for b in sent
                )
            )

    responses = asyncio.run(run())
    for resp, body in zip(responses, sent, strict=True):
        if resp.status_code == 200 and body["stream"]:  # a whole stream, never a cut one
            assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-200:]
    return responses


def check_cap_holds(gateway: Process, responses: list[httpx.Response], n: int, body: dict) -> None:
    """``n`` of the requests fit the cap, the rest were refused in OpenAI's error format; the ledger
    has every request and the shared counter equals the ledger's spend (no reservation leaked)."""
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == n, statuses
    refused = [r.json()["error"] for r in responses if r.status_code == 429]
    assert len(refused) == len(responses) - n and all(e["type"] == "budget_exceeded" for e in refused)
    total = spend_total(gateway)
    assert total["requests"] == len(responses)
    assert Decimal(total["cost_usd"]) <= cap_for(n, body)
    [tenant] = httpx.get(gateway.url + "/v1/budget", headers={"Authorization": f"Bearer {KEY_A}"}).json()["data"]
    daily = next(w for w in tenant["windows"] if w["window"] == "daily")
    assert Decimal(daily["used_usd"]) == Decimal(total["cost_usd"])


# ------------------------------------------------------------------------------------------ cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    servers = ClusterServers(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_redis_cluster_holds_one_budget(tmp_path: Path, sim: Process, cluster: ClusterServers, stream: bool) -> None:
    """Four of seven concurrent requests fit the cap, the others are refused, whichever master holds
    what; each counter family sits on one master (its slot)."""
    ns = f"kgcluster{int(stream)}"
    state = f"state: {{backend: redis, url: '{cluster.url}', namespace: {ns}}}\n"
    sent = bodies(7, stream)
    config = write_gateway(tmp_path, upstream_yaml(sim), budget_policy(4, sent[0]), extra_yaml=state, name="cluster")
    with running(start_gateway(config, env=ENV)) as gateway:
        check_cap_holds(gateway, fire(gateway, sent), 4, sent[0])
        assert f"state: redis cluster via {cluster.url.split('//')[1]}" in gateway.output()
        keys_by_node = {port: [k.decode() for k in client(port).scan_iter(match=f"{ns}:*")] for port in cluster.ports}
    families = {tag: {p for p, keys in keys_by_node.items() for k in keys if k.startswith(f"{ns}:{tag}:")} for tag in
                ("{budgets}", "{rates}")}  # fmt: skip
    assert all(len(nodes) == 1 for nodes in families.values()), families


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    server = TLSServer(tmp_path_factory.mktemp("tls")).start()
    try:
        yield server
    finally:
        server.stop()


def tls_state(server: TLSServer, ca: Path) -> str:
    return (
        f"state:\n  backend: redis\n  url: '{server.url}'\n  password_env: KG_REDIS_PASSWORD\n"
        f"  namespace: {server.NAMESPACE}\n  timeout_s: 0.5\n"
        f"  tls: {{ca_file: '{ca}', cert_file: '{server.cert}', key_file: '{server.key}'}}\n"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tls_with_client_certificates_and_an_acl_user(
    tmp_path: Path, sim: Process, tls_server: TLSServer, stream: bool
) -> None:
    admin = tls_server.admin()
    for key in admin.scan_iter(match=f"{tls_server.NAMESPACE}:*"):
        admin.delete(key)
    sent = bodies(5, stream)
    config = write_gateway(
        tmp_path, upstream_yaml(sim), budget_policy(3, sent[0]), extra_yaml=tls_state(tls_server, tls_server.ca)
    )
    with running(start_gateway(config, env={**ENV, "KG_REDIS_PASSWORD": tls_server.PASSWORD})) as gateway:
        check_cap_holds(gateway, fire(gateway, sent), 3, sent[0])
        assert "over TLS" in gateway.output() and tls_server.PASSWORD not in gateway.output()
    # the counters live on the TLS server, written by the ACL user within its key pattern
    assert list(admin.scan_iter(match=f"{tls_server.NAMESPACE}:{{budgets}}:*"))
    assert admin.acl_log() == []  # nothing the gateway sent was refused by its ACL


def test_a_server_certificate_from_another_ca_fails_closed_in_the_clients_format(
    tmp_path: Path, sim: Process, tls_server: TLSServer
) -> None:
    """The gateway does not trust a server its CA did not sign: the budget cannot be checked, so the
    request is refused with 503 state_unavailable, as an OpenAI and as an Anthropic error."""
    config = write_gateway(
        tmp_path, upstream_yaml(sim), budget_policy(3, BODY), extra_yaml=tls_state(tls_server, tls_server.other_ca)
    )
    with running(start_gateway(config, env={**ENV, "KG_REDIS_PASSWORD": tls_server.PASSWORD})) as gateway:
        resp = httpx.post(
            gateway.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10
        )
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "state_unavailable"
        resp = httpx.post(
            gateway.url + "/v1/messages",
            json={"model": "kimi-k2-thinking", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": KEY_A, "anthropic-version": "2023-06-01"},
            timeout=10,
        )
        assert resp.status_code == 503
        error = resp.json()
        assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
        assert "shared state store (Redis) is not answering" in error["error"]["message"]
        assert "CERTIFICATE_VERIFY_FAILED" in gateway.output()


# ----------------------------------------------------------------------------------------- Sentinel


def test_sentinel_failover_under_load_holds_the_budget_and_loses_no_ledger_row(tmp_path: Path, sim: Process) -> None:
    """Load from two tenants (one with a budget that runs out, one only rate-limited) while a
    sentinel forces the replica to take over. Every request ends within its bound as 200, 429
    (the budget) or 503 (state unavailable while the master changes); the budget is never overrun;
    every request has its ledger row; the new master's counter equals the ledger's spend; the
    rate-limited tenant is served again without restarting the gateway."""
    # wait_replicas equals the number of replicas: a write confirmed only by some replicas could be
    # lost if another is promoted and the confirming one is then pointed at it (with two replicas
    # and wait_replicas 1 this test sees the cap overrun). The price: after the promotion, writes
    # fail closed until the old master rejoins as a replica (a sentinel's next check, up to ~10 s).
    servers = SentinelServers(tmp_path / "sentinel", replicas=1).start()
    gateway = None
    try:
        # the output always runs to max_tokens, so a request costs nearly its worst case and a
        # reservation or spend lost in the failover would let the ledger overrun the cap
        body = {**BODY, "max_tokens": 200, "sim": {"reasoning_chunks": 5000, "fault": {"stall_s": 0.2}}}
        state = (
            f"state: {{backend: redis, url: '{servers.url}', namespace: kgsentinel, wait_replicas: 1, "
            f"connect_timeout_s: 0.25, timeout_s: 0.25}}\n"
        )
        config = write_gateway(tmp_path, upstream_yaml(sim), budget_policy(20, body), extra_yaml=state, name="snt")
        (config.parent / "snt-policies" / "b.yaml").write_text(
            f'tenant: tenant-b\nkeys: ["{hashed(KEY_B)}"]\nrate_limits: {{rpm: 100000}}\n'
            "models:\n  kimi-k2-thinking: {candidates: [sim/kimi-k2-thinking]}\n"
        )
        gateway = start_gateway(config, env=ENV)
        results: list[tuple[str, float, float, int, dict]] = []  # tenant, start, duration, status, error
        settled_at: list[float] = []
        old_master = servers.master_address()[1]

        def failover() -> None:
            time.sleep(0.5)
            servers.failover()
            wait_until(lambda: servers.settled_after_failover(old_master), timeout=30, interval=0.1)
            settled_at.append(time.monotonic())

        async def worker(http: httpx.AsyncClient, tenant: str, stream: bool) -> None:
            key, payload = (KEY_A, body) if tenant == "a" else (KEY_B, {**BODY, "max_tokens": 5})
            refused = False  # tenant a goes on until its budget has run out
            while not settled_at or time.monotonic() < settled_at[0] + 4.0 or (tenant == "a" and not refused):
                started = time.monotonic()
                resp = await http.post(
                    gateway.url + "/v1/chat/completions",
                    json={**payload, "stream": stream},
                    headers={"Authorization": f"Bearer {key}"},
                )
                if resp.status_code == 200 and stream:
                    assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-200:]
                error = resp.json().get("error", {}) if resp.status_code != 200 else {}
                results.append((tenant, started, time.monotonic() - started, resp.status_code, error))
                refused = refused or resp.status_code == 429
                if len(results) > 20_000 or time.monotonic() > deadline:
                    return

        async def run() -> None:
            async with httpx.AsyncClient(timeout=8) as http:  # a hung request would raise ReadTimeout
                await asyncio.gather(
                    *(
                        worker(http, t, s)
                        for t, s in (("a", False), ("a", False), ("a", True), ("b", False), ("b", True))
                    )
                )

        deadline = time.monotonic() + 75  # a loaded machine: the cap must still run out after the failover
        thread = threading.Thread(target=failover)
        thread.start()
        asyncio.run(run())
        thread.join()
        assert settled_at, "the failover did not complete"
        assert servers.master_address()[1] != old_master

        statuses = {status for *_, status, _ in results}
        assert statuses <= {200, 429, 503}, statuses
        assert max(duration for _, _, duration, _, _ in results) < 4.0  # bounded: deadlines, no hang
        assert all(e["code"] == "state_unavailable" for *_, status, e in results if status == 503)
        assert all(e["type"] == "budget_exceeded" for t, *_, status, e in results if status == 429 and t == "a")
        assert any(status == 429 for t, *_, status, _ in results if t == "a"), "the budget never ran out"
        end = max(begun for _, begun, *_ in results)
        tail = [status for t, begun, _, status, _ in results if t == "b" and begun > end - 1.5]
        assert tail and set(tail) == {200}, "the gateway did not follow the new master by itself"

        total_a = spend_total(gateway, tenant="tenant-a")
        settled(lambda: httpx.get(gateway.url + "/v1/spend", headers={"Authorization": f"Bearer {ADMIN}"}))
        by_status = {st: sum(1 for *_, status, _ in results if status == st) for st in (200, 429, 503)}
        assert spend_total(gateway)["requests"] == len(results), by_status  # no ledger row lost
        assert Decimal(total_a["cost_usd"]) <= cap_for(40, body)  # 0 overshoot

        def counter_matches() -> bool:
            [tenant] = httpx.get(gateway.url + "/v1/budget", headers={"Authorization": f"Bearer {KEY_A}"}).json()[
                "data"
            ]
            used = next(w for w in tenant["windows"] if w["window"] == "daily")["used_usd"]
            return Decimal(used) == Decimal(spend_total(gateway, tenant="tenant-a")["cost_usd"])

        wait_until(counter_matches, timeout=15, interval=0.2)  # what the old master lost was replayed
    finally:
        if gateway is not None:
            gateway.stop()
        servers.stop()


def sum_requests(gateway: Process) -> int:
    resp = httpx.get(
        gateway.url + "/v1/spend", params={"group_by": "tenant"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    return sum(int(row["requests"]) for row in resp.json()["data"])
