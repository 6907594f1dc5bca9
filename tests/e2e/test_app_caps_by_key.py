"""App caps follow the key, never ``x-gateway-tags``: the forged-tag test.

Two apps of one tenant own one key each; ``web`` has a small daily cap, ``batch`` a large one. A
client holding web's key who sends ``x-gateway-tags: app=batch`` is charged against web's cap (the
ledger row says app ``web``, the tag is kept for reporting), and a request that only batch's cap
could hold is refused naming web's cap. Stream and non-stream, with the budget counters in process
memory and in Redis.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml
from tests.waiting import wait_until

WEB_KEY, BATCH_KEY = "sk-app-web", "sk-app-batch"
WEB_CAP = "0.001"  # holds a 100-token answer, not the worst case of a 1000-token one


def policy() -> str:
    return f"""\
tenant: caps
keys: ["{hashed(WEB_KEY)}", "{hashed(BATCH_KEY)}"]
apps:
  web: {{keys: ["{hashed(WEB_KEY)}"]}}
  batch: {{keys: ["{hashed(BATCH_KEY)}"]}}
models:
  k2: {{candidates: [sim/kimi-k2-thinking]}}
budget:
  daily_usd: 10
  when_exhausted: reject
  apps: {{web: {{daily_usd: '{WEB_CAP}'}}, batch: {{daily_usd: 5}}}}
"""


@pytest.fixture(params=["memory", "redis"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path, simulator: Process) -> Iterator[tuple[Process, Path]]:
    extra, namespace, url = "", None, ""
    if request.param == "redis":
        url, namespace = shared_redis()
        extra = state_yaml(url, namespace)
    upstreams = f"  sim:\n    kind: openai\n    base_url: {simulator.url}/v1\n    models: [kimi-k2-thinking]\n"
    config = write_gateway(tmp_path, upstreams, policy(), extra_yaml=extra, name="caps")
    proc = start_gateway(config)
    try:
        yield proc, tmp_path / "caps-ledger.db"
    finally:
        proc.stop()
        if namespace is not None:
            drop_namespace(url, namespace)


def ask(proc: Process, key: str, tags: str, max_tokens: int, stream: bool) -> httpx.Response:
    body = {"model": "k2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}
    headers = {"Authorization": f"Bearer {key}", "x-gateway-tags": tags}
    return httpx.post(proc.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def ledger_row(db: Path, request_id: str) -> dict[str, Any] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("SELECT * FROM ledger WHERE request_id = ?", (request_id,)).fetchone()
        return dict(found) if found is not None else None


def cost(row: dict[str, Any]) -> Decimal:
    return Decimal(row["cost_nanos"]) / 1_000_000_000


def used(proc: Process, scope: str) -> Decimal:
    headers = {"Authorization": f"Bearer {BATCH_KEY}"}
    [tenant] = httpx.get(proc.url + "/v1/budget", headers=headers, timeout=5).json()["data"]
    return Decimal(next(w["used_usd"] for w in tenant["windows"] if w["scope"] == scope and w["window"] == "daily"))


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_a_forged_app_tag_is_charged_to_the_keys_app_and_cannot_escape_its_cap(
    gateway: tuple[Process, Path], stream: bool
) -> None:
    proc, db = gateway
    resp = ask(proc, WEB_KEY, "app=batch,team=growth", 100, stream)
    assert resp.status_code == 200, resp.text
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert row["app"] == "web"  # the key's app, whatever the header said
    assert orjson.loads(row["tags"]) == {"app": "batch", "team": "growth"}  # kept for reporting
    assert cost(row) > 0
    assert wait_until(lambda: used(proc, "app=web") == cost(row) or None)
    assert used(proc, "app=batch") == 0

    # batch's cap would hold this one; web's cannot, and the tag does not move it
    refused = ask(proc, WEB_KEY, "app=batch", 1000, stream)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and f"app web of tenant 'caps' (daily cap ${WEB_CAP}" in error["message"]

    # the batch key pretending to be web is batch's, and batch's cap holds it
    other = ask(proc, BATCH_KEY, "app=web", 1000, stream)
    assert other.status_code == 200, other.text
    other_row = wait_until(lambda: ledger_row(db, other.headers["x-request-id"]))
    assert other_row["app"] == "batch"
    assert wait_until(lambda: used(proc, "app=batch") == cost(other_row) or None)
    assert used(proc, "app=web") == cost(row)  # web's counter did not move


def test_spend_by_app_reports_the_keys_app(gateway: tuple[Process, Path]) -> None:
    proc, _ = gateway
    for key, tags in ((WEB_KEY, "app=batch"), (BATCH_KEY, "app=web"), (BATCH_KEY, "")):
        assert ask(proc, key, tags, 50, False).status_code == 200

    def by_app() -> dict[str, int] | None:
        headers = {"Authorization": f"Bearer {BATCH_KEY}"}
        data = httpx.get(proc.url + "/v1/spend?group_by=app", headers=headers, timeout=5).json()
        found = {g["app"]: g["requests"] for g in data["data"] if not g["total"]}
        return found if sum(found.values()) == 3 else None

    assert wait_until(by_app) == {"web": 1, "batch": 2}
