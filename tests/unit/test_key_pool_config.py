"""An upstream's key pool (``api_keys``) is checked like every other setting: each mistake is named
with its file, line and key path, and a key's secret never appears in a message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.yamlfile import ConfigError
from tests.conftest import ROOT, write_gateway

POLICY = f'tenant: t\nkeys: ["sha256:{"a" * 64}"]\nmodels:\n  k2: {{candidates: [pool/kimi-k2-thinking]}}\n'
ENV = {"POOL_A": "sk-pool-secret-a", "POOL_B": "sk-pool-secret-b"}


def pool_config(tmp_path: Path, keys: str, extra: str = "") -> Path:
    upstream = (
        "  pool:\n    kind: openai\n    base_url: https://api.moonshot.ai/v1\n    models: [kimi-k2-thinking]\n"
        f"{extra}    api_keys:\n{keys}"
    )
    return write_gateway(tmp_path, upstream, POLICY)


def problems(path: Path, env: dict[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    return info.value.problems


def test_a_pool_resolves_every_key_with_its_limits(tmp_path: Path) -> None:
    keys = "      - POOL_A\n      - {env: POOL_B, label: b, rpm: 200, tpm: 2000000, max_concurrency: 50, weight: 2}\n"
    loaded = load_config(pool_config(tmp_path, keys), env=ENV)
    a, b = loaded.key_pools["pool"]
    assert (a.label, a.secret, a.rpm) == ("POOL_A", "sk-pool-secret-a", None)
    assert (b.label, b.rpm, b.tpm, b.max_concurrency, b.weight) == ("b", 200, 2_000_000, 50, 2.0)
    assert loaded.api_keys["pool"] is None
    assert "sk-pool" not in repr(loaded.key_pools)  # a traceback's locals never show a key


def test_config_check_names_a_pool_key_whose_variable_is_missing(tmp_path: Path) -> None:
    path = pool_config(tmp_path, "      - POOL_A\n      - {env: POOL_MISSING, label: m}\n")
    (found,) = problems(path)
    line = path.read_text().splitlines().index("      - {env: POOL_MISSING, label: m}") + 1
    assert found.startswith(f"{path}:{line}: upstreams.pool.api_keys[1]: ")
    assert "environment variable POOL_MISSING is not set" in found and "'m'" in found


def test_config_check_refuses_the_same_key_twice(tmp_path: Path) -> None:
    env = {**ENV, "POOL_COPY": ENV["POOL_A"]}
    (found,) = problems(pool_config(tmp_path, "      - POOL_A\n      - {env: POOL_COPY, label: copy}\n"), env)
    assert "upstreams.pool.api_keys[1]" in found and "same secret as api_keys[0]" in found
    assert "sk-pool-secret" not in found


@pytest.mark.parametrize(
    ("keys", "extra", "message"),
    [
        ("      - POOL_A\n      - {env: POOL_B, label: POOL_A}\n", "", "the same label 'POOL_A'"),
        ("      - POOL_A\n      - POOL_A\n", "", "same label"),
        ("      - {env: POOL_A, file: key.txt}\n", "", "exactly one of env"),
        ("      - {key: sk-inline}\n", "", "secrets never go in YAML"),
        ("      - {env: POOL_A, rpm: 0}\n", "", "greater than or equal to 1"),
        ("      - POOL_A\n", "    api_key_env: POOL_B\n", "not both"),
        ("      []\n", "", "lists no key"),
    ],
)
def test_config_check_refuses_a_malformed_pool(tmp_path: Path, keys: str, extra: str, message: str) -> None:
    found = problems(pool_config(tmp_path, keys, extra))
    assert any("upstreams.pool" in p and message in p for p in found), found
    assert all("sk-inline" not in p for p in found)


def test_a_pool_for_an_in_process_simulator_is_refused(tmp_path: Path) -> None:
    upstream = "  pool:\n    kind: simulated\n    models: [kimi-k2-thinking]\n    api_keys: [POOL_A]\n"
    found = problems(write_gateway(tmp_path, upstream, POLICY))
    assert any("api_keys (a key pool) is for kind 'openai' only" in p for p in found), found


def test_the_cli_config_check_reports_pool_problems_and_exits_2(tmp_path: Path) -> None:
    path = pool_config(tmp_path, "      - POOL_A\n      - POOL_NOT_SET_ANYWHERE\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_")} | {"POOL_A": "sk-cli-a"}
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 2 and "upstreams.pool.api_keys[1]" in out.stderr
    assert "POOL_NOT_SET_ANYWHERE is not set" in out.stderr and "sk-cli-a" not in out.stderr + out.stdout
