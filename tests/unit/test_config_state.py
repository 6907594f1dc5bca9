"""``state:`` in the config: every Redis form (one server, TLS, Cluster, Sentinel) parses to where the
backends connect, and each contradiction or missing piece is one ``file:line`` message."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.state.build import describe, redis_settings
from tests.unit.test_config_errors import ENV, GOOD_UPSTREAMS, problems, write

R = "  backend: redis\n"


def state_config(tmp_path: Path, state: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(write(tmp_path, f"state:\n{state}" + GOOD_UPSTREAMS), env={**ENV, **(env or {})})


@pytest.mark.parametrize(
    ("state", "topology", "tls", "nodes", "master"),
    [
        (R + "  url: redis://r:6379/2\n", "single", False, (), None),
        (R + "  url: rediss://gw@r:6380/0\n", "single", True, (), None),
        (R + "  url: redis+cluster://a:7000,b:7001\n", "cluster", False, (("a", 7000), ("b", 7001)), None),
        (R + "  url: redis://a:7000\n  cluster: true\n", "cluster", False, (("a", 7000),), None),
        (R + "  url: sentinels://s1,s2:5000/main/3\n", "sentinel", True, (("s1", 26379), ("s2", 5000)), "main"),
        (R + "  sentinels: ['s1:26379', 's2:26380']\n  master: main\n", "sentinel", False,
         (("s1", 26379), ("s2", 26380)), "main"),
    ],
)  # fmt: skip
def test_every_redis_form_parses_to_its_topology(
    tmp_path: Path, state: str, topology: str, tls: bool, nodes: tuple, master: str | None
) -> None:
    settings = redis_settings(state_config(tmp_path, state).settings.state, tmp_path)
    target = settings.resolved
    assert (target.topology, target.tls, target.nodes, target.master) == (topology, tls, nodes, master)
    assert topology.replace("single", "redis ") in describe(settings) or topology == "single"


def test_tls_files_are_relative_to_the_config_and_secrets_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RP", "pw")
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    state = (
        R + "  url: rediss://gw@r:6380/0\n  password_env: RP\n"
        "  tls: {ca_file: ca.pem, cert_file: c.pem, key_file: c.key}\n"
    )
    settings = redis_settings(state_config(tmp_path, state, {"RP": "pw"}).settings.state, tmp_path)
    assert settings.tls_ca_file == str(tmp_path / "ca.pem") and settings.tls_key_file == str(tmp_path / "c.key")
    assert settings.password == "pw" and settings.resolved.username == "gw"
    assert "pw" not in describe(settings) and "over TLS" in describe(settings)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (R + "  url: redis://gw:secret@r:6379\n", "password_env"),
        (R + "  url: memcached://r:11211\n", "redis+cluster://"),
        (R + "  url: redis+cluster://a:7000/3\n", "only database 0"),
        (R + "  url: redis://a:1,b:2\n", "several hosts"),
        (R + "  url: sentinel://s1:26379\n", "MASTER"),
        (R + "  sentinels: ['s1:26379']\n", "master"),
        (R + "  url: redis://r:6379\n  sentinels: ['s1:26379']\n  master: m\n", "either url or sentinels"),
        (R + "  url: redis://r:6379\n  tls: {ca_file: ca.pem}\n", "rediss://"),
        (R + "  url: rediss://r:6379\n  tls: {cert_file: c.pem}\n", "go together"),
        (R + "  url: redis+cluster://a:7000\n  wait_replicas: 1\n", "wait_replicas"),
        (R + "  url: sentinel://s:1/m\n  cluster: true\n", "exclude each other"),
        ("  backend: memory\n  cluster: true\n", "backend 'redis' only"),
        (R + "  sentinels: ['s1:x']\n  master: m\n", "host:port"),
    ],
)  # fmt: skip
def test_contradictions_are_one_message_at_the_state_line(tmp_path: Path, state: str, message: str) -> None:
    [p] = problems(tmp_path, f"state:\n{state}" + GOOD_UPSTREAMS)
    assert "gateway.yaml:" in p and "state" in p and message in p, p


def test_missing_tls_files_and_secrets_are_named_with_their_lines(tmp_path: Path) -> None:
    state = (
        "state:\n  backend: redis\n  url: sentinels://s1:26379/m\n  password_env: RP\n"
        "  sentinel_password_env: SP\n  tls: {ca_file: nowhere/ca.pem}\n"
    )
    found = problems(tmp_path, state + GOOD_UPSTREAMS)
    assert len(found) == 3, found
    assert any("gateway.yaml:5" in p and "RP is not set" in p for p in found)
    assert any("gateway.yaml:6" in p and "SP is not set" in p and "sentinels'" in p for p in found)
    assert any("gateway.yaml:7" in p and "no such file" in p and "ca.pem" in p for p in found)
