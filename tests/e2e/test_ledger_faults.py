"""The fault suite: a real gateway under mixed load is killed with SIGKILL at seeded random moments and
restarted, again and again; afterwards its ledger is reconciled against the upstream's own request
log (the simulator's ``--request-log``). Nothing lost, nothing duplicated, nothing misbilled:

* every request the upstream answered has exactly one row (requests carry a unique ``user``);
* every row whose request completed is exact: the upstream's usage, its cost at the listed price, and
  the ``x-gateway-cost-usd`` the client was told;
* every request the client saw complete has a completed row, whenever the kill fell;
* an interrupted request is marked so, with its stream flag and upstream, and billed below the
  worst case its budget would have held.

It runs with SQLite and PostgreSQL, with one gateway, and with two replicas on one ledger (one killed
over and over while the other keeps serving). ``KIMI_GATEWAY_FAULT_SEED`` picks the seed (default 17).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.metering.prices import cost_of, load_prices
from gateway.metering.tokens import upper_bound_tokens
from tests.conftest import Process, hashed, require_service, start_gateway, start_simulator, write_gateway
from tests.unit.conftest import PG_URL, with_schema

SEED = int(os.environ.get("KIMI_GATEWAY_FAULT_SEED", "17"))
KEYS = {"budgeted": "sk-fault-budgeted", "free": "sk-fault-free"}
MODEL = "kimi-k2-thinking"


@dataclass
class Sent:
    """What the client asked and saw, by its unique ``user``."""

    stream: bool
    tenant: str
    body: bytes
    max_tokens: int
    complete: bool = False
    cost_header: str | None = None


@dataclass
class Load:
    """The gateways under test (their URLs change at each restart) and everything sent to them."""

    urls: list[str]
    sent: dict[str, Sent] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield "sqlite:///faults-ledger.db"
        return
    import asyncpg

    async def admin(sql: str | None) -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        try:
            if sql:
                await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(None))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        require_service("PostgreSQL", f"cannot connect to {PG_URL} ({exc!r})")
    schema = f"kg_faults_{uuid.uuid4().hex[:12]}"
    yield with_schema(PG_URL, schema)
    asyncio.run(admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture()
def upstream(tmp_path: Path) -> Iterator[tuple[Process, Path]]:
    """A simulator that takes time (streams last ~0.1-0.3 s) and logs every answer it plans."""
    log = tmp_path / "upstream-requests.jsonl"
    proc = start_simulator(tmp_path, "instant", "--ttft-ms", "5", "--tokens-per-s", "300", "--request-log", str(log))
    yield proc, log
    proc.stop()


def write_config(tmp_path: Path, sim: Process, ledger_url: str) -> Path:
    upstreams = (
        f"  sim:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [{MODEL}]\n"
        "    timeouts: {connect_s: 1, first_byte_s: 5, idle_s: 5, total_s: 10}\n"
    )
    route = f"models:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\n"
    budgeted = f'tenant: budgeted\nkeys: ["{hashed(KEYS["budgeted"])}"]\nbudget: {{daily_usd: "1000"}}\n{route}'
    config = write_gateway(tmp_path, upstreams, budgeted, name="faults")
    (tmp_path / "faults-policies" / "free.yaml").write_text(f'tenant: free\nkeys: ["{hashed(KEYS["free"])}"]\n{route}')
    default = 'ledger: {url: "sqlite:///faults-ledger.db"}'
    config.write_text(config.read_text().replace(default, f'ledger: {{url: "{ledger_url}", journal_dir: journal}}'))
    return config


async def one_request(client: httpx.AsyncClient, load: Load, rng: random.Random, n: int) -> None:
    url = rng.choice(load.urls)
    tenant = rng.choice(sorted(KEYS))
    stream = rng.random() < 0.6
    max_tokens = rng.randint(16, 64)
    user = f"u{n:06d}"
    words = " ".join(rng.choice(("ledger", "crash", "stream", "replay", "money")) for _ in range(rng.randint(3, 40)))
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": words}], "stream": stream, "max_tokens": max_tokens,
         "user": user}
    )  # fmt: skip
    sent = load.sent[user] = Sent(stream, tenant, body, max_tokens)
    headers = {"Authorization": f"Bearer {KEYS[tenant]}", "content-type": "application/json"}
    try:
        if stream:
            async with client.stream("POST", url + "/v1/chat/completions", content=body, headers=headers) as resp:
                text = b"".join([chunk async for chunk in resp.aiter_raw()])
            sent.complete = resp.status_code == 200 and b"data: [DONE]" in text
        else:
            resp = await client.post(url + "/v1/chat/completions", content=body, headers=headers)
            sent.complete = resp.status_code == 200 and b'"usage"' in resp.content
            sent.cost_header = resp.headers.get("x-gateway-cost-usd")
    except httpx.HTTPError:
        await asyncio.sleep(0.01)  # the gateway is down or died mid-answer: the next one tries again


async def drive(load: Load, workers: int, seed: int) -> None:
    counter = iter(range(1_000_000))

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        async with httpx.AsyncClient(timeout=15) as client:
            while not load.stop.is_set():
                await one_request(client, load, rng, next(counter))

    await asyncio.gather(*(worker(w) for w in range(workers)))


def kill_and_restart(procs: list[Process], load: Load, victim: int, kills: int, seed: int, config: Path) -> int:
    """SIGKILL ``procs[victim]`` ``kills`` times at seeded random moments, restarting it each time."""
    rng = random.Random(seed)
    done = 0
    for _ in range(kills):
        time.sleep(rng.uniform(0.15, 0.6))
        proc = procs[victim]
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait()
        proc.stop()
        done += 1
        procs[victim] = start_gateway(config)
        load.urls[victim] = procs[victim].url
    time.sleep(0.3)
    return done


def read_ledger(url: str, folder: Path) -> list[dict[str, Any]]:
    columns = "request_id, end_user, tenant, outcome, stream, status, upstream, prompt_tokens, cached_tokens," \
        " completion_tokens, estimated"  # fmt: skip
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(folder / "faults-ledger.db")) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute(f"SELECT {columns}, cost_nanos FROM ledger").fetchall()
        return [{**dict(r), "cost": Decimal(r["cost_nanos"]) / 10**9} for r in found]
    import asyncpg

    async def fetch() -> list[dict[str, Any]]:
        schema = url.rsplit("schema=", 1)[1]
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        try:
            return [
                {**dict(r), "cost": r["cost_usd"]} for r in await conn.fetch(f"SELECT {columns}, cost_usd FROM ledger")
            ]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def reconcile(load: Load, rows: list[dict[str, Any]], upstream_log: Path, prices_path: Path) -> dict[str, int]:
    """Assert the ledger against the upstream's log and what the client saw; returns the counts."""
    answered = {e["user"]: e for e in map(orjson.loads, upstream_log.read_bytes().splitlines())}
    assert len(answered) == len(upstream_log.read_bytes().splitlines()), "one upstream answer per user"
    by_user: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_user.setdefault(row["end_user"], []).append(row)
    duplicated = sorted(u for u, found in by_user.items() if len(found) > 1)
    missing = sorted(u for u in answered if u not in by_user)
    assert (missing, duplicated) == ([], []), f"missing {missing[:10]}, duplicated {duplicated[:10]}"
    price = load_prices(prices_path).at(f"sim/{MODEL}", time.time())
    assert price is not None
    counts = {"rows": len(rows), "ok": 0, "interrupted": 0, "interrupted_mid_stream": 0}
    for user, [row] in by_user.items():
        sent = load.sent[user]
        assert (row["tenant"], bool(row["stream"]), row["upstream"]) == (sent.tenant, sent.stream, "sim"), row
        up = answered.get(user)
        if row["outcome"] == "ok":
            counts["ok"] += 1
            assert up is not None, row
            usage = (up["prompt_tokens"], up["cached_tokens"], up["completion_tokens"])
            assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == usage, row
            assert row["cost"] == cost_of(price, *usage).usd and not row["estimated"], row
            if sent.cost_header is not None:
                assert Decimal(sent.cost_header) == row["cost"], row
        else:
            assert not sent.complete, f"the client got the whole answer, the row says {row}"
        if row["outcome"] == "interrupted":
            counts["interrupted"] += 1
            counts["interrupted_mid_stream"] += row["status"] == 200
            worst = cost_of(price, upper_bound_tokens(sent.body), 0, sent.max_tokens).usd
            assert row["estimated"] and row["cost"] < worst, row
        if sent.complete:
            assert row["outcome"] == "ok", row
    return counts


def run_faults(tmp_path: Path, upstream: tuple[Process, Path], ledger_url: str, replicas: int, kills: int) -> None:
    sim, upstream_log = upstream
    config = write_config(tmp_path, sim, ledger_url)
    procs = [start_gateway(config) for _ in range(replicas)]
    load = Load([p.url for p in procs])
    driver = threading.Thread(target=lambda: asyncio.run(drive(load, 8, SEED)), daemon=True)
    try:
        driver.start()
        done = kill_and_restart(procs, load, 0, kills, SEED, config)
    finally:
        load.stop.set()
        driver.join(30)
        for proc in procs:
            proc.stop()  # graceful: the batch writer drains
    counts = reconcile(load, read_ledger(ledger_url, tmp_path), upstream_log, tmp_path / "faults-prices.yaml")
    print(f"\nfault suite ({ledger_url.split(':', 1)[0]}, {replicas} replica(s), seed {SEED}): {done} kills, {counts}")
    assert done == kills
    assert counts["ok"] > 10 * kills  # the load kept flowing between the kills
    assert counts["interrupted"] > 0  # kills did fall inside requests
    assert not list((tmp_path / "journal").glob("*.journal"))  # every journal was replayed or closed cleanly


def test_sigkill_under_mixed_load_loses_and_duplicates_no_row(
    tmp_path: Path, upstream: tuple[Process, Path], ledger_url: str
) -> None:
    run_faults(tmp_path, upstream, ledger_url, replicas=1, kills=20)


def test_two_replicas_on_one_ledger_one_killed_while_the_other_serves(
    tmp_path: Path, upstream: tuple[Process, Path], ledger_url: str
) -> None:
    run_faults(tmp_path, upstream, ledger_url, replicas=2, kills=6)
