"""Two gateway replicas on one Redis share a key pool: its quotas (neither spends a key's full
minute on its own), and where each conversation's prefix is cached (a turn served by the other
replica still goes out with the key that holds it)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from simulator.keys import key_label
from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml

KEY = "sk-tenant-pool-replicas"
RPM = 3
SECRETS = {label: f"sk-replica-{label}-{uuid.uuid4().hex}" for label in ("a", "b")}
STICKY = {label: f"sk-replica-sticky-{label}-{uuid.uuid4().hex}" for label in ("a", "b", "c")}
SYSTEM = "You are a careful coding agent working in a large repository. " * 80


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_simulator(
        tmp_path_factory.mktemp("replica-sim"), "moonshot-standard", "--ttft-ms", "0", "--tokens-per-s", "0"
    )
    limits = {secret: {"rpm": RPM} for secret in SECRETS.values()}
    assert httpx.post(proc.url + "/_sim/keys", json={"limits": limits}).status_code == 200
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, sim: Process) -> Iterator[tuple[Process, Process]]:
    url, namespace = shared_redis()
    keys = "\n".join(f"      - {{env: SHARED_{label.upper()}, label: {label}, rpm: {RPM}}}" for label in SECRETS)
    sticky = "\n".join(f"      - {{env: STICKY_{label.upper()}, label: {label}}}" for label in STICKY)
    upstreams = (
        f"  shared:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [kimi-k2-thinking]\n"
        f"    api_keys:\n{keys}\n"
        f"  sticky:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [kimi-k2-thinking]\n"
        f"    api_keys:\n{sticky}\n"
    )
    policy = (
        f'tenant: replicas\nkeys: ["{hashed(KEY)}"]\nmodels:\n'
        "  shared: {candidates: [shared/kimi-k2-thinking]}\n  sticky: {candidates: [sticky/kimi-k2-thinking]}\n"
    )
    env = {f"SHARED_{k.upper()}": v for k, v in SECRETS.items()} | {f"STICKY_{k.upper()}": v for k, v in STICKY.items()}
    procs = []
    for name in ("one", "two"):
        config = write_gateway(
            tmp_path_factory.mktemp(f"replica-{name}"), upstreams, policy, state_yaml(url, namespace)
        )
        procs.append(start_gateway(config, env=env))
    yield procs[0], procs[1]
    for proc in procs:
        proc.stop()
    drop_namespace(url, namespace)


def chat(gateway: Process, model: str, messages: list[dict[str, Any]], stream: bool) -> httpx.Response:
    body = {"model": model, "messages": messages, "stream": stream, "max_tokens": 100}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as r:
        r.read()
    return r


def test_two_replicas_share_each_keys_quota(sim: Process, replicas: tuple[Process, Process]) -> None:
    answers = [
        chat(replicas[i % 2], "shared", [{"role": "user", "content": f"replica task {i}"}], stream=i % 4 < 2)
        for i in range(10)
    ]
    assert sorted(r.status_code for r in answers) == [200] * (2 * RPM) + [429] * (10 - 2 * RPM)
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.json()["error"]["code"] == "upstream_keys_exhausted"
    stats = httpx.get(sim.url + "/_sim/stats").json()["keys"]
    for secret in SECRETS.values():  # each key got exactly its minute's requests, none was refused
        assert stats[key_label(secret)]["requests"] == RPM
        assert stats[key_label(secret)]["rate_limited"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_conversation_keeps_its_key_whichever_replica_serves_the_turn(
    replicas: tuple[Process, Process], stream: bool
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM + str(stream)},
        {"role": "user", "content": "start"},
    ]
    used = []
    for turn in range(4):
        r = chat(replicas[turn % 2], "sticky", messages, stream)
        assert r.status_code == 200
        used.append(re.search(r"; key ([abc]) \((.*?)\)", r.headers["x-gateway-route-reason"]))
        messages += [{"role": "assistant", "content": f"step {turn}"}, {"role": "user", "content": f"result {turn}"}]
    assert len({m.group(1) for m in used if m}) == 1
    assert all(m and m.group(2).startswith("holds this conversation's prefix") for m in used[1:])
