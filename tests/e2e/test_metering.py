"""Metering end to end: exact costs from published prices, estimates, hard budgets under concurrency,
a ledger that survives restarts and crashes, and spend visible only to whom it belongs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.waiting import settled, wait_until

KEY_A, KEY_B, ADMIN = "sk-meter-a", "sk-meter-b", "sk-finance-admin"
MISS, HIT, OUT = Decimal("0.60"), Decimal("0.15"), Decimal("2.50")  # kimi-k2-thinking, USD per 1M tokens
M = Decimal(1_000_000)
# a system prompt long enough for Moonshot-style prefix caching (> 256 tokens)
SYSTEM = {"role": "system", "content": "You are a meticulous assistant. " * 120}


def expected_cost(usage: dict) -> Decimal:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage.get("cached_tokens") or (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (Decimal(prompt - cached) * MISS + Decimal(cached) * HIT + Decimal(completion) * OUT) / M


def upstream_yaml(sim: Process) -> str:
    return f"""\
  sim:
    kind: openai
    base_url: {sim.url}/v1
    models: [kimi-k2-thinking]
    timeouts: {{connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 5}}
"""


def policy_yaml(tenant: str, key: str, budget: str = "") -> str:
    return (
        f'tenant: {tenant}\nkeys: ["{hashed(key)}"]\n'
        f"models:\n  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}\n{budget}"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metering")


@pytest.fixture(scope="module")
def gateway(folder: Path, simulator: Process) -> Iterator[Process]:
    config = write_gateway(folder, upstream_yaml(simulator), policy_yaml("tenant-a", KEY_A), name="meter")
    (folder / "meter-policies" / "b.yaml").write_text(policy_yaml("tenant-b", KEY_B))
    proc = start_gateway(config, env={"KIMI_GATEWAY_ADMIN_KEY": ADMIN})
    yield proc
    proc.stop()


def ledger_row(gateway: Process, request_id: str, key: str = ADMIN) -> dict:
    """The ledger row of one request, through the finance API grouped finely enough to isolate it."""
    for _ in range(40):
        resp = httpx.get(
            gateway.url + "/v1/spend", params={"group_by": "tenant"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert resp.status_code == 200, resp.text
        time.sleep(0.02)
        if resp.json()["data"]:
            break
    return resp.json()


def spend_total(gateway: Process, key: str = ADMIN, **params: str) -> dict:
    resp = settled(
        lambda: httpx.get(
            gateway.url + "/v1/spend",
            params={"group_by": "tenant", **params},
            headers={"Authorization": f"Bearer {key}"},
        )
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][-1]


@pytest.mark.parametrize("stream", [False, True])
def test_exact_cost_with_and_without_cache_hits(gateway: Process, sim: Process, stream: bool) -> None:
    client = gateway.openai(KEY_A)
    before = Decimal(spend_total(gateway)["cost_usd"])
    messages = [SYSTEM, {"role": "user", "content": f"Tell me about caching ({stream})"}]
    usages = []
    for _ in range(2):  # the second turn hits the prefix cached by the first
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="kimi-k2-thinking",
                    messages=messages,
                    max_tokens=200,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[-1].choices == [] and chunks[-1].usage is not None  # OpenAI's usage chunk
            usages.append(chunks[-1].usage.model_dump())
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="kimi-k2-thinking", messages=messages, max_tokens=200
            )
            reply = raw.parse()
            assert reply.usage is not None
            usage = reply.usage.model_dump()
            usages.append(usage)
            assert Decimal(raw.headers["x-gateway-cost-usd"]) == expected_cost(usage)
    first, second = usages
    assert (first.get("cached_tokens") or 0) == 0
    cached = second.get("cached_tokens") or second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 256, second
    total = spend_total(gateway)
    assert Decimal(total["cost_usd"]) - before == expected_cost(first) + expected_cost(second)
    # what the cache hit saved against the miss price
    assert Decimal(total["cache_savings_usd"]) >= Decimal(cached) * (MISS - HIT) / M


def test_stream_without_include_usage_gets_no_usage_chunk_but_is_metered(gateway: Process, sim: Process) -> None:
    client = gateway.openai(KEY_A)
    before = spend_total(gateway)
    chunks = list(client.chat.completions.create(model="kimi-k2-thinking", messages=[SYSTEM], stream=True))
    assert all(chunk.choices for chunk in chunks)  # no choices: [] usage chunk for a client that did not ask
    [seen] = httpx.get(sim.url + "/_sim/requests").json()
    assert seen["body"]["stream_options"] == {"include_usage": True}  # the gateway asked the upstream
    after = spend_total(gateway)
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] > before["completion_tokens"]
    assert after["estimated_requests"] == before["estimated_requests"]


def test_cut_stream_is_estimated(gateway: Process, sim: Process) -> None:
    before = spend_total(gateway)
    body = {
        "model": "kimi-k2-thinking",
        "messages": [SYSTEM],
        "stream": True,
        "sim": {"fault": {"cut_after_events": 6}},
    }
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as resp:
        text = b"".join(resp.iter_raw()).decode()
    assert '"error"' in text.splitlines()[-2]
    for _ in range(50):  # the estimate is computed off the event loop, just after the response
        after = spend_total(gateway)
        if after["requests"] > before["requests"]:
            break
        time.sleep(0.05)
    assert after["estimated_requests"] == before["estimated_requests"] + 1
    assert after["prompt_tokens"] > before["prompt_tokens"]  # estimated, not dropped


def test_client_disconnect_is_estimated(gateway: Process, sim: Process) -> None:
    before = spend_total(gateway)
    body = {
        "model": "kimi-k2-thinking",
        "messages": [SYSTEM],
        "stream": True,
        "sim": {"reasoning_chunks": 300, "fault": {"stall_mid_s": 1.0}},
    }
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as resp:
        next(resp.iter_raw())
    for _ in range(50):
        after = spend_total(gateway)
        if after["requests"] > before["requests"]:
            break
        time.sleep(0.05)
    assert after["estimated_requests"] == before["estimated_requests"] + 1
    assert Decimal(after["cost_usd"]) > Decimal(before["cost_usd"])


def test_tenant_sees_only_its_own_spend(gateway: Process) -> None:
    for key in (KEY_A, KEY_B):
        gateway.openai(key).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
    own = settled(
        lambda: httpx.get(
            gateway.url + "/v1/spend", params={"group_by": "tenant"}, headers={"Authorization": f"Bearer {KEY_B}"}
        )
    )
    assert [r["tenant"] for r in own.json()["data"] if not r["total"]] == ["tenant-b"]
    other = httpx.get(
        gateway.url + "/v1/spend", params={"tenant": "tenant-a"}, headers={"Authorization": f"Bearer {KEY_B}"}
    )
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    admin = settled(
        lambda: httpx.get(
            gateway.url + "/v1/spend", params={"group_by": "tenant"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
    )
    assert {r["tenant"] for r in admin.json()["data"] if not r["total"]} == {"tenant-a", "tenant-b"}
    assert httpx.get(gateway.url + "/v1/spend", headers={"Authorization": "Bearer nope"}).status_code == 401
    csv = httpx.get(gateway.url + "/v1/spend", params={"format": "csv"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert csv.headers["content-type"].startswith("text/csv") and "cache_savings_usd" in csv.text.splitlines()[0]
    bad = httpx.get(
        gateway.url + "/v1/spend", params={"group_by": "planet"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- budgets


def worst_case(body: dict, max_tokens: int) -> Decimal:
    raw = json.dumps(body).encode()  # the gateway bounds prompt tokens by body bytes / 2 + 16
    return (Decimal(len(raw) // 2 + 16) * MISS + Decimal(max_tokens) * OUT) / M


async def _fire(url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=20) as client:
        return await asyncio.gather(
            *[client.post(url, json=body, headers={"Authorization": f"Bearer {KEY_A}"}) for _ in range(n)]
        )


def test_fifty_concurrent_against_a_budget_that_fits_ten(tmp_path: Path, simulator: Process) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    body = {
        "model": "kimi-k2-thinking",
        "messages": [{"role": "user", "content": "budget test"}],
        "max_tokens": 1000,
        "sim": {"fault": {"stall_s": 0.8}},  # every request is in flight at once
    }
    # the gateway's exact JSON may differ in spacing; bound the reservation from the compact form
    compact = json.dumps(body, separators=(",", ":")).encode()
    per_request = (Decimal(len(compact) // 2 + 16) * MISS + Decimal(1000) * OUT) / M
    cap = (per_request * 10 + Decimal("0.0000001")).quantize(Decimal("0.000000001"))
    budget = f"budget: {{daily_usd: '{cap}', when_exhausted: reject}}\n"
    config = write_gateway(tmp_path, upstream_yaml(simulator), policy_yaml("tenant-a", KEY_A, budget), name="budget")
    proc = start_gateway(config, env={"KIMI_GATEWAY_ADMIN_KEY": ADMIN})
    try:
        responses = asyncio.run(_fire(proc.url + "/v1/chat/completions", 50, body))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(ok) == 10, [r.status_code for r in responses]
        assert len(refused) == 40
        for r in refused:
            error = r.json()["error"]
            assert r.status_code == 429 and error["type"] == "budget_exceeded"
            assert "remaining" in error["message"] and "resets at" in error["message"]
            assert r.headers["x-should-retry"] == "false"
        total = spend_total(proc)
        assert Decimal(total["cost_usd"]) <= cap
        assert total["requests"] == 50  # refused requests are in the ledger too, at zero cost
        assert total["completion_tokens"] > 0
        [tenant] = httpx.get(proc.url + "/v1/budget", headers={"Authorization": f"Bearer {KEY_A}"}).json()["data"]
        daily = next(w for w in tenant["windows"] if w["window"] == "daily")
        # nothing left reserved: used is exactly what the ledger says was spent
        assert Decimal(daily["used_usd"]) == Decimal(total["cost_usd"])
    finally:
        proc.stop()


def test_downgrade_lowers_max_tokens_to_what_fits(tmp_path: Path, simulator: Process) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "downgrade"}], "max_tokens": 100000}
    budget = "budget: {daily_usd: '0.01', when_exhausted: downgrade, min_max_tokens: 256}\n"
    config = write_gateway(tmp_path, upstream_yaml(simulator), policy_yaml("tenant-a", KEY_A, budget), name="down")
    proc = start_gateway(config)
    try:
        resp = httpx.post(proc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        assert resp.status_code == 200, resp.text
        assert "max_tokens lowered" in resp.headers["x-gateway-route-reason"]
        [seen] = httpx.get(simulator.url + "/_sim/requests").json()
        assert 256 <= seen["body"]["max_tokens"] < 4000  # $0.01 buys < 4,000 output tokens at $2.50/M
    finally:
        proc.stop()


# ---------------------------------------------------------------- durability


def open_reservations_on_disk(db: Path) -> int:
    """Open reservations the ledger has written to its SQLite file (read by a separate connection)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return int(conn.execute("SELECT count(*) FROM open_reservations").fetchone()[0])


def test_ledger_survives_restart_and_crash_is_reconciled(tmp_path: Path, simulator: Process) -> None:
    budget = "budget: {daily_usd: '100'}\n"
    config = write_gateway(tmp_path, upstream_yaml(simulator), policy_yaml("tenant-a", KEY_A, budget), name="crash")
    env = {"KIMI_GATEWAY_ADMIN_KEY": ADMIN}
    proc = start_gateway(config, env=env)
    client = proc.openai(KEY_A)
    client.chat.completions.create(model="kimi-k2-thinking", messages=[{"role": "user", "content": "x"}], max_tokens=50)
    first = spend_total(proc)
    proc.stop()  # graceful: everything flushed
    proc = start_gateway(config, env=env)
    assert spend_total(proc)["cost_usd"] == first["cost_usd"]
    # a request in flight when the process dies: its reservation is on disk, its row is not
    body = {
        "model": "kimi-k2-thinking",
        "messages": [{"role": "user", "content": "y"}],
        "stream": True,
        "max_tokens": 400,
        "sim": {"fault": {"stall_mid_s": 5}},
    }
    with httpx.stream(
        "POST", proc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as resp:
        chunks = resp.iter_raw()  # keep the generator: dropping it would close the connection
        next(chunks)
        wait_until(lambda: open_reservations_on_disk(tmp_path / "crash-ledger.db"))  # the writer stored it
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait()
    proc.stop()
    proc = start_gateway(config, env=env)
    try:
        after = spend_total(proc)
        assert after["requests"] == first["requests"] + 1
        assert after["estimated_requests"] == first["estimated_requests"] + 1
        assert Decimal(after["cost_usd"]) > Decimal(first["cost_usd"])
        assert "replayed 1 segment(s) of stopped processes: 0 finished rows, 1 interrupted" in proc.output()
    finally:
        proc.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_open_reservation_after_failover_describes_the_candidate_that_holds_it(
    tmp_path: Path, simulator: Process, stream: bool
) -> None:
    import sqlite3
    import threading

    import orjson

    upstreams = upstream_yaml(simulator).replace("first_byte_s: 2", "first_byte_s: 5") + (
        "  down:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    models: [kimi-k2-thinking]\n"
    )
    policy = (
        f'tenant: tenant-a\nkeys: ["{hashed(KEY_A)}"]\nbudget: {{daily_usd: "100"}}\n'
        "models:\n  k2: {candidates: [down/kimi-k2-thinking, sim/kimi-k2-thinking], strategy: pinned}\n"
    )
    # the refused candidate is the dearer one: its reservation would overstate the money at stake
    dear = {"input_miss": "1.15", "input_hit": "0.15", "output": "8.00"}
    config = write_gateway(tmp_path, upstreams, policy, name="fo", prices={"down/kimi-k2-thinking": dear})
    body = {
        "model": "k2",
        "messages": [{"role": "user", "content": "fail over, then hang"}],
        "max_tokens": 400,
        "stream": stream,
        "sim": {"fault": {"stall_s": 10}},  # in flight until the process dies
    }
    raw = orjson.dumps(body)
    bound = len(raw) // 2 + 16  # the gateway's prompt bound (metering/tokens.py upper_bound_tokens)
    held = (Decimal(bound) * MISS + Decimal(400) * OUT) / M  # sim's worst case, not down's
    proc = start_gateway(config)
    url, headers = proc.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY_A}"}

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url, content=raw, headers={**headers, "content-type": "application/json"}, timeout=60)

    threading.Thread(target=send, daemon=True).start()
    db = tmp_path / "fo-ledger.db"
    found: list[tuple] = []
    for _ in range(100):  # mid-flight: read what a crash would leave behind
        time.sleep(0.05)
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                found = conn.execute("SELECT upstream, amount_nanos FROM open_reservations").fetchall()
            if found and found[0][0] == "sim":
                break
    assert found == [("sim", int(held * 1_000_000_000))]
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    proc.stop()
    proc = start_gateway(config)  # start-up replays the journal: an estimated row for the candidate called
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT upstream, cost_nanos, outcome, stream, status FROM ledger").fetchall()
            still_open = conn.execute("SELECT COUNT(*) FROM open_reservations").fetchone()[0]
        # billed for the prompt it sent (4 bytes a token), not the worst case the budget held
        prompt_cost = Decimal(len(raw) // 4) * MISS / M
        assert prompt_cost < held
        assert rows == [("sim", int(prompt_cost * 1_000_000_000), "interrupted", int(stream), 0)]
        assert still_open == 0  # the replayed row settled the reservation: one mechanism, one row
    finally:
        proc.stop()


def test_spend_report_cli_reads_the_ledger(gateway: Process, folder: Path) -> None:
    import subprocess
    import sys

    gateway.openai(KEY_A).chat.completions.create(
        model="kimi-k2-thinking", messages=[{"role": "user", "content": "for the report"}], max_tokens=20
    )
    expected = spend_total(gateway, group_by="tenant")  # flushes the ledger
    cmd = [sys.executable, "-m", "gateway.cli", "spend", "report", "--config", str(folder / "meter.yaml")]
    out = subprocess.run([*cmd, "--group-by", "tenant", "--format", "csv"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tenant,requests") and "cache_savings_usd" in lines[0]
    assert lines[-1].split(",")[0] == "TOTAL" and expected["cost_usd"] in lines[-1]
    bad = subprocess.run([*cmd, "--group-by", "colour"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "colour" in bad.stderr


def test_a_spend_report_answers_at_once_while_the_writer_is_held_up(gateway: Process, folder: Path) -> None:
    """A database that does not take the writer's batch (here: another process holds SQLite's write
    lock) must not hold the finance API up: the report answers at once with what is written, the time
    it is as of, and how many of this process's rows it does not include yet."""
    import sqlite3

    before = spend_total(gateway)
    lock = sqlite3.connect(folder / "meter-ledger.db", timeout=5, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the gateway's writer now waits on SQLite's busy timeout
        gateway.openai(KEY_A).chat.completions.create(
            model="kimi-k2-thinking", messages=[{"role": "user", "content": "held up"}], max_tokens=20
        )
        started = time.monotonic()
        resp = httpx.get(
            gateway.url + "/v1/spend", params={"group_by": "tenant"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        took = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        assert took < 2.0, took  # the writer is stuck for up to 10 s: the report did not wait for it
        body = resp.json()
        assert body["unwritten"] >= 1 and resp.headers["x-gateway-ledger-unwritten"] == str(body["unwritten"])
        assert body["as_of"].endswith("Z") and resp.headers["x-gateway-ledger-as-of"] == body["as_of"]
        assert body["data"][-1]["requests"] == before["requests"]  # what is written, nothing invented
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert spend_total(gateway)["requests"] == before["requests"] + 1  # written once the lock is gone
