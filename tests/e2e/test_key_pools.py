"""Upstream key pools end to end: a real gateway in front of the simulator with per-key tier limits
(429 with Retry-After and x-ratelimit-* headers), per-key prompt caches and a revoked key.

One simulator and one gateway serve every test here; each test routes to its own pool upstream (its
own secrets, so its own quotas and caches), through a virtual model of the same name.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from simulator.keys import key_label
from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.waiting import settled, wait_until

KEY = "sk-tenant-key-pools"
POOLS: dict[str, dict[str, str]] = {
    pool: {label: f"sk-{pool}-{label}-{uuid.uuid4().hex}" for label in ("a", "b", "c")}
    for pool in (
        *("quota", "quotas", "storm", "storms", "revoked", "revokeds", "sticky", "stickys", "rr", "rrs"),
        *("dead", "deads"),
    )
}
GATEWAY_RPM = 3  # what the config tells the gateway about each key of the quota pools
SYSTEM = "You are a careful coding agent. " * 120  # about 1,000 tokens: cached by the provider


def env_name(pool: str, label: str) -> str:
    return f"POOL_{pool.upper()}_{label.upper()}"


def upstream_yaml(sim: Process, pool: str) -> str:
    limits = f", rpm: {GATEWAY_RPM}" if pool.startswith("quota") else ""
    selection = "round_robin" if pool.startswith("rr") else "cache_aware"
    keys = "\n".join(f"      - {{env: {env_name(pool, label)}, label: {label}{limits}}}" for label in POOLS[pool])
    return (
        f"  {pool}:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [kimi-k2-thinking]\n"
        f"    key_selection: {selection}\n    api_keys:\n{keys}\n"
    )


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_simulator(
        tmp_path_factory.mktemp("pool-sim"), "moonshot-standard", "--ttft-ms", "0", "--tokens-per-s", "0"
    )
    limits: dict[str, Any] = {}
    for pool in ("quota", "quotas"):  # the provider's limits match what the gateway was told
        limits.update({secret: {"rpm": GATEWAY_RPM} for secret in POOLS[pool].values()})
    revoked = [POOLS["revoked"]["b"], POOLS["revokeds"]["b"], *POOLS["dead"].values(), *POOLS["deads"].values()]
    assert httpx.post(proc.url + "/_sim/keys", json={"limits": limits, "revoked": revoked}).status_code == 200
    # a 429 storm on key a of the storm pools: every request sent with it is refused
    storms = [{"status": 429, "retry_after": 20, "key": POOLS[p]["a"], "count": -1} for p in ("storm", "storms")]
    assert httpx.post(proc.url + "/_sim/faults", json=storms).status_code == 200
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sim: Process) -> Iterator[Process]:
    models = "\n".join(f"  {pool}: {{candidates: [{pool}/kimi-k2-thinking]}}" for pool in POOLS)
    config = write_gateway(
        tmp_path_factory.mktemp("pool-gw"),
        "".join(upstream_yaml(sim, pool) for pool in POOLS),
        f'tenant: pools\nkeys: ["{hashed(KEY)}"]\ndefault_max_tokens: 256\nmodels:\n{models}\n',
    )
    env = {env_name(pool, label): secret for pool, keys in POOLS.items() for label, secret in keys.items()}
    proc = start_gateway(config, env=env)
    yield proc
    proc.stop()


def chat(gateway: Process, model: str, messages: list[dict[str, Any]], stream: bool) -> tuple[httpx.Response, str]:
    """The response and, for a stream, its whole text (the status and headers arrive first)."""
    body = {"model": model, "messages": messages, "stream": stream, "max_tokens": 200}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        text = r.read().decode()
    return r, text


def sim_keys(sim: Process, pool: str) -> dict[str, dict[str, int]]:
    stats = httpx.get(sim.url + "/_sim/stats").json()["keys"]
    return {label: stats.get(key_label(secret), {}) for label, secret in POOLS[pool].items()}


def metric(gateway: Process, name: str, **labels: str) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def cached_tokens(response: httpx.Response, text: str, stream: bool) -> int:
    if not stream:
        return int(response.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))
    found = re.findall(r'"cached_tokens":\s*(\d+)', text)
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_requests_spread_over_the_keys_within_each_quota_and_none_is_sent_over_it(
    gateway: Process, sim: Process, stream: bool
) -> None:
    pool = "quotas" if stream else "quota"
    for i in range(3 * GATEWAY_RPM):
        r, _ = chat(gateway, pool, [{"role": "user", "content": f"task {i}"}], stream)
        assert r.status_code == 200, r.text if not stream else r.status_code
        assert re.search(r"; key [abc] \(", r.headers["x-gateway-route-reason"])
    seen = sim_keys(sim, pool)
    assert {label: s["requests"] for label, s in seen.items()} == dict.fromkeys("abc", GATEWAY_RPM)
    assert all(s["rate_limited"] == 0 for s in seen.values())
    # every key is at its requests per minute: the gateway answers 429 itself and sends nothing
    r, _ = chat(gateway, pool, [{"role": "user", "content": "one too many"}], stream)
    assert r.status_code == 429
    error = r.json()["error"] if not stream else httpx.Response(429, content=_).json()["error"]
    assert error["code"] == "upstream_keys_exhausted" and error["type"] == "rate_limit_error"
    # the provider's x-ratelimit-remaining-requests: 0 rested each key already, the count agrees
    assert all(f"{label} cooling down" in error["message"] for label in "abc"), error["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 61
    assert all(s["rate_limited"] == 0 for s in sim_keys(sim, pool).values())
    assert metric(gateway, "gateway_upstream_keys_exhausted_total", upstream=pool) == 1
    for label in "abc":
        assert metric(gateway, "gateway_upstream_key_requests_total", upstream=pool, key=label) == GATEWAY_RPM


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_429_on_one_key_cools_it_and_the_request_moves_to_another_key(
    gateway: Process, sim: Process, stream: bool
) -> None:
    pool = "storms" if stream else "storm"
    reasons = []
    for i in range(9):
        r, _ = chat(gateway, pool, [{"role": "user", "content": f"storm {i}"}], stream)
        assert r.status_code == 200  # no client ever sees the key's 429 while another key has room
        reasons.append(r.headers["x-gateway-route-reason"])
    seen = sim_keys(sim, pool)
    # key a answers every request with 429: its first 429 rests it for the Retry-After, so it is
    # tried exactly once, and b and c serve the rest
    assert seen["b"]["requests"] + seen["c"]["requests"] == 9
    assert sum("key a rate limited (429, resting 20 s)" in reason for reason in reasons) == 1
    assert metric(gateway, "gateway_upstream_key_rate_limited_total", upstream=pool, key="a") == 1
    assert metric(gateway, "gateway_upstream_key_cooldowns_total", upstream=pool, key="a", reason="429") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_revoked_key_is_taken_out_alone_with_an_alert_and_never_shown(
    gateway: Process, sim: Process, stream: bool
) -> None:
    pool = "revokeds" if stream else "revoked"
    for i in range(6):
        r, text = chat(gateway, pool, [{"role": "user", "content": f"revoked {i}"}], stream)
        assert r.status_code == 200
        assert POOLS[pool]["b"] not in text and POOLS[pool]["b"] not in str(r.headers)
    seen = sim_keys(sim, pool)
    assert seen["b"]["unauthorized"] == 1 and seen["b"].get("requests", 0) == 0
    assert seen["a"]["requests"] + seen["c"]["requests"] == 6
    assert metric(gateway, "gateway_upstream_key_revoked_total", upstream=pool, key="b") == 1
    log = wait_until(lambda: next((t for t in [gateway.output()] if "refused pool key b" in t), None))
    alert = next(line for line in log.splitlines() if "ALERT" in line and f"upstream {pool} " in line)
    assert "HTTP 401" in alert and "key b" in alert
    assert all(secret not in log for keys in POOLS.values() for secret in keys.values())


def tool_loop(gateway: Process, pool: str, stream: bool, turns: int = 10) -> tuple[list[str], list[int]]:
    """A 10-turn agent loop: each turn repeats the conversation so far and appends to it."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM + pool},
        {"role": "user", "content": "Fix the failing test in the repository."},
    ]
    reasons, cached = [], []
    for turn in range(turns):
        r, text = chat(gateway, pool, messages, stream)
        assert r.status_code == 200
        reasons.append(r.headers["x-gateway-route-reason"])
        cached.append(cached_tokens(r, text, stream))
        messages += [
            {"role": "assistant", "content": f"Step {turn}: I looked at the next file."},
            {"role": "user", "content": f"Tool result {turn}: " + "output line\n" * 40},
        ]
    return reasons, cached


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_ten_turn_tool_loop_stays_on_the_key_that_holds_its_prefix(gateway: Process, stream: bool) -> None:
    reasons, cached = tool_loop(gateway, "stickys" if stream else "sticky", stream)
    keys = [re.search(r"; key ([abc]) \(", reason).group(1) for reason in reasons]  # type: ignore[union-attr]
    assert len(set(keys)) == 1, reasons
    assert all("holds this conversation's prefix" in reason for reason in reasons[1:]), reasons
    assert cached[0] == 0 and all(c >= 900 for c in cached[1:]), cached
    # round-robin over the same pool spreads the loop over three caches and loses most hits
    rr_reasons, rr_cached = tool_loop(gateway, "rrs" if stream else "rr", stream)
    assert len({re.search(r"; key ([abc]) \(", r).group(1) for r in rr_reasons}) == 3  # type: ignore[union-attr]
    assert sum(cached) >= 1.2 * sum(rr_cached)


def test_explain_names_the_key_a_conversation_would_use_and_why(gateway: Process) -> None:
    messages = [{"role": "system", "content": SYSTEM + "explain"}, {"role": "user", "content": "go"}]
    r, _ = chat(gateway, "sticky", messages, False)
    used = re.search(r"; key ([abc]) \(", r.headers["x-gateway-route-reason"]).group(1)  # type: ignore[union-attr]
    messages += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "next"}]
    plan = httpx.post(
        gateway.url + "/v1/route/explain",
        json={"model": "sticky", "messages": messages},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    choice = plan["plan"][0]["key_choice"]
    assert choice["selection"] == "cache_aware" and choice["key"] == used
    assert "holds this conversation's prefix" in choice["reason"]
    assert choice["keys"][0]["key"] == used and choice["keys"][0]["held_prefix_tokens"] > 900


def test_the_ledger_records_the_key_label_and_spend_groups_by_it(gateway: Process) -> None:
    messages = [{"role": "system", "content": SYSTEM + "ledger"}, {"role": "user", "content": "go"}]
    for stream in (False, True):
        r, _ = chat(gateway, "sticky", messages, stream)
        assert r.status_code == 200
    spend = settled(
        lambda: httpx.get(
            gateway.url + "/v1/spend",
            params={"group_by": "upstream,upstream_key"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
    ).json()
    rows = {(g["upstream"], g["upstream_key"]): g["requests"] for g in spend["data"]}
    assert sum(n for (upstream, key), n in rows.items() if upstream == "sticky" and key in "abc") >= 2
    assert not [key for (upstream, key) in rows if upstream == "sticky" and key is None]
    # a request no key had room for (the quota tests' last ones) went out over no key
    assert {key for (upstream, key) in rows if upstream in POOLS} <= {"a", "b", "c", None}
    assert all(secret not in str(spend) for keys in POOLS.values() for secret in keys.values())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_pool_whose_every_key_is_refused_answers_like_one_bad_key(
    gateway: Process, sim: Process, stream: bool
) -> None:
    pool = "deads" if stream else "dead"
    r, text = chat(gateway, pool, [{"role": "user", "content": "anyone?"}], stream)
    assert r.status_code == 502
    error = (r.json() if not stream else httpx.Response(502, content=text).json())["error"]
    assert error["code"] == "upstream_auth_failed" and "credentials" in error["message"]
    assert all(secret not in text for secret in POOLS[pool].values())
    assert [s["unauthorized"] for s in sim_keys(sim, pool).values()] == [1, 1, 1]
    again, _ = chat(gateway, pool, [{"role": "user", "content": "still?"}], stream)  # taken out: nothing is sent
    assert again.status_code == 502
    assert [s["unauthorized"] for s in sim_keys(sim, pool).values()] == [1, 1, 1]
