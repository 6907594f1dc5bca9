"""Policy hot reload with requests in flight, and POST /v1/route/explain for each strategy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, write_gateway

KEY = "sk-reload-tenant"


POLICY = f"""\
tenant: reload
keys: ["{hashed(KEY)}"]
models:
  k2: {{candidates: [sim/kimi-k2-thinking]}}
"""


def wait_for(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def in_flight(client: OpenAI, stream: bool, out: dict[str, Any]) -> threading.Thread:
    """A request the simulator holds for 1.5 s before its first byte."""

    def run() -> None:
        raw = client.chat.completions.with_raw_response.create(
            model="k2",
            messages=[{"role": "user", "content": "slow"}],
            stream=stream,
            extra_body={"sim": {"fault": {"stall_s": 1.5}}},
        )
        out["status"] = raw.http_response.status_code
        out["upstream"] = raw.headers["x-gateway-upstream"]
        out["body"] = raw.http_response.read().decode()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_hot_reload_valid_then_invalid_edit_with_requests_in_flight(
    tmp_path: Path, simulator: Process, stream: bool
) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking, kimi-k2-thinking-turbo]
    timeouts: {{connect_s: 1, first_byte_s: 5, idle_s: 5, total_s: 10}}
"""
    config = write_gateway(
        tmp_path,
        upstreams,
        POLICY,
        extra_yaml="routing: {policy_reload_s: 0.1}",
        prices={"sim/kimi-k2-thinking-turbo": {"input_miss": "1.15", "input_hit": "0.15", "output": "8.00"}},
    )
    policy_file = tmp_path / "gateway-policies" / "tenant.yaml"
    proc = start_gateway(config)
    try:
        client = proc.openai(KEY)
        assert [m.id for m in client.models.list()] == ["k2"]
        first: dict[str, Any] = {}
        thread = in_flight(client, stream, first)
        time.sleep(0.3)  # the request is waiting at the simulator
        policy_file.write_text(POLICY + "  turbo: {candidates: [sim/kimi-k2-thinking-turbo]}\n")
        assert wait_for(lambda: "turbo" in [m.id for m in client.models.list()]), proc.output()
        raw = client.chat.completions.with_raw_response.create(
            model="turbo", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-gateway-upstream"] == "sim/kimi-k2-thinking-turbo"
        thread.join(10)
        assert first["status"] == 200 and first["upstream"] == "sim/kimi-k2-thinking"
        assert ("[DONE]" in first["body"]) if stream else '"choices"' in first["body"]
        assert "policies reloaded" in proc.output()

        # an invalid edit while a request is in flight: the last good policy stays, one line says why
        second: dict[str, Any] = {}
        thread = in_flight(client, stream, second)
        time.sleep(0.3)
        policy_file.write_text(POLICY.replace("models:", "modles:"))
        assert wait_for(lambda: "policy reload rejected" in proc.output()), proc.output()
        log = [line for line in proc.output().splitlines() if "policy reload rejected" in line]
        assert len(log) == 1
        assert f"{policy_file}:3: modles: unknown key" in log[0] and "models: required key is missing" in log[0]
        assert sorted(m.id for m in client.models.list()) == ["k2", "turbo"]
        thread.join(10)
        assert second["status"] == 200
        time.sleep(0.3)  # no new line per poll for the same bad file
        assert proc.output().count("policy reload rejected") == 1
        # fixing the file is picked up again
        policy_file.write_text(POLICY)
        assert wait_for(lambda: [m.id for m in client.models.list()] == ["k2"]), proc.output()
    finally:
        proc.stop()


# ---------------------------------------------------------------- explain

ALL = "[ext/kimi-k2-thinking, std/kimi-k2-thinking, turbo/kimi-k2-thinking-turbo, vllm/kimi-k2-thinking]"
EXPLAIN_POLICY = f"""\
tenant: explain
keys: ["{hashed(KEY)}"]
models:
  m-cost: {{candidates: {ALL}, strategy: cost}}
  m-latency: {{candidates: {ALL}, strategy: latency}}
  m-balanced: {{candidates: {ALL}, slo: {{total_ms: 15000}}}}
  m-open: {{candidates: {ALL}}}
  m-pinned: {{candidates: {ALL}, strategy: pinned}}
"""
EXT, STD, TURBO, VLLM = (
    "ext/kimi-k2-thinking",
    "std/kimi-k2-thinking",
    "turbo/kimi-k2-thinking-turbo",
    "vllm/kimi-k2-thinking",
)


@pytest.fixture(scope="module")
def explain_gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("explain")
    upstreams = f"""\
  ext:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
    prior: {{ttft_ms: 900, tokens_per_s: 30}}
  std: {{kind: simulated, profile: moonshot-standard, models: [kimi-k2-thinking]}}
  turbo: {{kind: simulated, profile: moonshot-turbo, models: [kimi-k2-thinking-turbo]}}
  vllm: {{kind: simulated, profile: vllm, reasoning_field: reasoning, models: [kimi-k2-thinking]}}
"""
    prices = {
        EXT: {"input_miss": "0.80", "input_hit": "0.20", "output": "3.00"},
        TURBO: {"input_miss": "1.15", "input_hit": "0.15", "output": "8.00"},
        VLLM: {"input_miss": "0.10", "input_hit": "0.01", "output": "0.40"},
    }
    config = write_gateway(folder, upstreams, EXPLAIN_POLICY, prices=prices, name="explain")
    proc = start_gateway(config)
    yield proc
    proc.stop()


def explain(gw: Process, model: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = httpx.post(
        gw.url + "/v1/route/explain",
        json={"model": model, "messages": [{"role": "user", "content": "plan this"}], "max_tokens": 4000},
        headers={"Authorization": f"Bearer {KEY}", **(headers or {})},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize(
    ("model", "strategy", "order", "reason"),
    [
        ("m-cost", "cost", [VLLM, STD, EXT, TURBO], "cost: lowest expected cost $"),
        ("m-latency", "latency", [TURBO, VLLM, STD, EXT], "latency: fastest expected completion 11.41 s"),
        ("m-balanced", "balanced", [TURBO, VLLM, STD, EXT], "balanced: cheapest of 1/4 candidates expected to meet"),
        ("m-pinned", "pinned", [EXT, STD, TURBO, VLLM], "pinned: first candidate"),
    ],
)
def test_explain_ranks_each_strategy_without_calling_upstreams(
    explain_gateway: Process, simulator: Process, model: str, strategy: str, order: list[str], reason: str
) -> None:
    httpx.post(simulator.url + "/_sim/reset")
    plan = explain(explain_gateway, model)
    assert plan["strategy"] == strategy
    assert [c["candidate"] for c in plan["plan"]] == order
    assert plan["plan"][0]["reason"].startswith(reason)
    assert [c["rank"] for c in plan["plan"]] == [1, 2, 3, 4]
    for c in plan["plan"]:
        assert set(c) >= {"expected_cost_usd", "expected_latency_ms", "expected_cached_tokens", "reason"}
        assert c["expected_output_tokens"] == 1000  # max_tokens 4000 capped by the cold average
        assert c["reason"]
    costs = {c["candidate"]: float(c["expected_cost_usd"]) for c in plan["plan"]}
    assert costs[VLLM] < costs[STD] < costs[EXT] < costs[TURBO]
    assert plan["excluded"] == []
    assert httpx.get(simulator.url + "/_sim/stats").json()["requests"] == 0


def test_explain_header_tightens_the_slo(explain_gateway: Process) -> None:
    open_plan = explain(explain_gateway, "m-open")  # no SLO here beyond defaults: the cheapest
    assert open_plan["plan"][0]["candidate"] == VLLM
    tight = explain(explain_gateway, "m-open", {"x-gateway-max-latency-ms": "15000"})
    assert tight["slo"]["total_ms"] == 15000
    assert tight["plan"][0]["candidate"] == TURBO
    assert tight["plan"][1]["reason"] == "balanced: not expected to meet the SLO; ranked by speed after those that do"


def test_explain_errors_are_openai_shaped(explain_gateway: Process) -> None:
    resp = httpx.post(
        explain_gateway.url + "/v1/route/explain",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = httpx.post(explain_gateway.url + "/v1/route/explain", json={"model": "m-cost"})
    assert resp.status_code == 401
