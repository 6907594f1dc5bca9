"""The access log as an operator reads it: one JSON line per request on the gateway's stderr, with
the fields the issue lists, for every wire format, stream or not, refused or served; never the
prompt, the answer or the key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.test_metering import policy_yaml, upstream_yaml
from tests.waiting import wait_until

KEY = "sk-access-log-secret-key"
PROMPT = "the-prompt-marker-8f3a: what is in my access log?"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("access-log")
    config = write_gateway(folder, upstream_yaml(simulator), policy_yaml("tenant-log", KEY), name="access")
    proc = start_gateway(config)
    yield proc
    proc.stop()


def access_lines(proc: Process, text: str | None = None) -> list[dict]:
    out = []
    for line in (proc.output() if text is None else text).splitlines():
        if line.startswith("{") and '"kimi_gateway.access"' in line:
            out.append(json.loads(line))
    return out


def line_for(proc: Process, request_id: str) -> dict:
    def find() -> dict | None:
        return next((d for d in access_lines(proc) if d["request_id"] == request_id), None)

    return wait_until(find, timeout=5)


@pytest.mark.parametrize("stream", [False, True])
def test_access_log_line_has_the_request_fields(gateway: Process, stream: bool) -> None:
    body = {
        "model": "kimi-k2-thinking",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 20,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    if not stream:
        del body["stream_options"]
    resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    assert resp.status_code == 200, resp.text
    if stream:
        events = [json.loads(x[6:]) for x in resp.text.splitlines() if x.startswith("data: {")]
        usage = next(e["usage"] for e in events if e.get("usage"))
    else:
        usage = resp.json()["usage"]
    line = line_for(gateway, resp.headers["x-request-id"])
    assert line["level"] == "info" and line["ts"].endswith("Z")
    assert line["tenant"] == "tenant-log"
    assert line["key_id"] == hashed(KEY).removeprefix("sha256:")[:12]
    assert line["model"] == "kimi-k2-thinking"
    assert line["upstream"] == "sim/kimi-k2-thinking"
    assert line["endpoint"] == "chat/completions"
    assert line["stream"] is stream
    assert (line["status"], line["outcome"], line["estimated"]) == (200, "ok", False)
    assert 0 < line["ttfb_ms"] <= line["total_ms"]
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert line["cached_tokens"] == cached
    assert Decimal(line["cost_usd"]) > 0
    if not stream:
        assert line["cost_usd"] == resp.headers["x-gateway-cost-usd"]
    log = gateway.output()
    assert PROMPT not in log and KEY not in log, "the access log must hold no prompt and no key"


@pytest.mark.parametrize("stream", [False, True])
def test_access_log_line_for_anthropic_messages(gateway: Process, stream: bool) -> None:
    body = {
        "model": "kimi-k2-thinking",
        "max_tokens": 20,
        "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    resp = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=10)
    assert resp.status_code == 200, resp.text
    line = line_for(gateway, resp.headers["x-request-id"])
    assert (line["endpoint"], line["status"], line["stream"]) == ("messages", 200, stream)
    assert line["completion_tokens"] > 0
    assert PROMPT not in gateway.output()


def test_access_log_line_for_a_refused_request(gateway: Process) -> None:
    wrong = "sk-not-a-known-key-55e1"
    body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": PROMPT}]}
    resp = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {wrong}"}, timeout=10
    )
    assert resp.status_code == 401
    line = line_for(gateway, resp.headers["x-request-id"])
    assert (line["status"], line["outcome"], line["key_id"], line["cost_usd"]) == (401, "rejected", None, "0.000000000")
    # an unknown model is refused by the front end too: one line, with the tenant it came from
    resp = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "model": "nope"}, headers=AUTH, timeout=10)
    assert resp.status_code == 404
    line = line_for(gateway, resp.headers["x-request-id"])
    assert (line["status"], line["tenant"], line["endpoint"]) == (404, "tenant-log", "chat/completions")
    assert wrong not in gateway.output()


def test_access_log_line_for_a_budget_refusal_inside_the_pipeline(tmp_path: Path, simulator: Process) -> None:
    policy = policy_yaml("tenant-poor", KEY, "budget: {daily_usd: '0.000000001', when_exhausted: reject}\n")
    config = write_gateway(tmp_path, upstream_yaml(simulator), policy, name="poor")
    proc = start_gateway(config)
    try:
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50}
        resp = httpx.post(proc.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
        assert resp.status_code == 429
        lines = [d for d in access_lines(proc) if d["request_id"] == resp.headers["x-request-id"]]
        if not lines:
            lines = [line_for(proc, resp.headers["x-request-id"])]
        assert len(lines) == 1, "a request refused inside the pipeline gets exactly one line"
        assert (lines[0]["status"], lines[0]["outcome"], lines[0]["tenant"]) == (429, "rejected", "tenant-poor")
    finally:
        proc.stop()


@pytest.mark.parametrize("setting", ["access_log: false", "log_level: warning"])
def test_access_log_off(tmp_path: Path, simulator: Process, setting: str) -> None:
    config = write_gateway(tmp_path, upstream_yaml(simulator), policy_yaml("t", KEY), extra_yaml=setting, name="off")
    proc = start_gateway(config)
    try:
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        for stream in (False, True):
            resp = httpx.post(proc.url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH)
            assert resp.status_code == 200
    finally:
        proc.stop()  # a clean stop flushes whatever is pending: nothing may be left to appear later
    text = proc.log.read_text()
    if setting.startswith("access_log"):  # the log was read, and holds the server's other lines
        assert "kimi-gateway ready" in text
    assert access_lines(proc, text) == []


def test_readme_demo_access_log_line_has_the_fields_the_gateway_writes(gateway: Process) -> None:
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = next(json.loads(x) for x in readme.splitlines() if x.startswith("{") and '"kimi_gateway.access"' in x)
    body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "readme"}], "max_tokens": 5}
    resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    real = line_for(gateway, resp.headers["x-request-id"])
    assert list(shown) == list(real)  # the same fields, in the same order
    assert all(f"`{key}`" in readme for key in real if key not in ("level", "logger"))  # each one explained
