"""An upstream 200 that is not an answer — a proxy's HTML page, a JSON body cut in half, an HTML page
to a stream request — is never relayed as a success nor billed as one: with another candidate the
request fails over (nothing reached the client yet), alone it is a 502 ``upstream_invalid_response``,
and the ledger row says what happened, with the prompt estimated and flagged.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.waiting import wait_until

KEY = "sk-invalid-answers"


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    folder = tmp_path_factory.mktemp("invalid-sims")
    a, b = start_simulator(folder, "instant"), start_simulator(folder, "instant")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sims: tuple[Process, Process]) -> Iterator[tuple[Process, Path]]:
    a, b = sims
    folder = tmp_path_factory.mktemp("invalid-gw")
    upstreams = f"""\
  a:
    kind: openai
    base_url: {a.url}/v1
    models: [kimi-k2-thinking]
  b:
    kind: openai
    base_url: {b.url}/v1
    models: [kimi-k2-thinking]
"""
    policy = f"""\
tenant: invalid
keys: ["{hashed(KEY)}"]
models:
  alone: {{candidates: [a/kimi-k2-thinking]}}
  with-spare: {{candidates: [a/kimi-k2-thinking, b/kimi-k2-thinking], strategy: pinned}}
"""
    extra = "routing: {breaker_failures: 1000}"  # every case meets the candidate with its breaker closed
    config = write_gateway(folder, upstreams, policy, name="invalid", extra_yaml=extra)
    proc = start_gateway(config)
    yield proc, folder / "invalid-ledger.db"
    proc.stop()


def ledger_row(db: Path, request_id: str) -> dict[str, Any] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("SELECT * FROM ledger WHERE request_id = ?", (request_id,)).fetchone()
        return dict(found) if found is not None else None


CASES = [("html", False), ("html", True), ("truncated", False)]


def ask(proc: Process, upstream_a: Process, garbage: str, model: str, stream: bool) -> httpx.Response:
    """One request to ``model`` while upstream ``a`` answers its next request with ``garbage``."""
    httpx.post(upstream_a.url + "/_sim/faults", json={"garbage": garbage}).raise_for_status()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(proc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize(("garbage", "stream"), CASES)
def test_alone_it_is_a_502_and_never_billed_as_a_success(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], garbage: str, stream: bool
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], garbage, "alone", stream)
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "upstream_invalid_response" and error["type"] == "upstream_error"
    assert "'a' answered 200 with" in error["message"]
    assert "<html>" not in resp.text  # the proxy's page is not the client's answer
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["status"], row["outcome"], row["estimated"]) == (502, "upstream_error", 1)
    assert "answered 200 with" in row["estimate_reason"]
    assert row["prompt_tokens"] > 0  # the prompt it may have billed, estimated


@pytest.mark.parametrize(("garbage", "stream"), CASES)
def test_with_a_spare_candidate_the_request_fails_over(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], garbage: str, stream: bool
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], garbage, "with-spare", stream)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-gateway-upstream"] == "b/kimi-k2-thinking"
    assert "invalid_response" in resp.headers["x-gateway-route-reason"]
    assert ("data: [DONE]" in resp.text) if stream else resp.json()["choices"][0]["message"]["content"]
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["status"], row["outcome"], row["upstream"]) == (200, "ok", "b")
