"""Every kind of configuration mistake is refused with the file, the key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.policy.store import load_policies
from gateway.upstreams.factory import load_checked_config
from gateway.yamlfile import ConfigError

GOOD_UPSTREAMS = """\
upstreams:
  moonshot:
    kind: openai
    base_url: https://api.moonshot.ai/v1
    api_key_env: TEST_MOONSHOT_KEY
    models: [kimi-k2-thinking]
  sim:
    kind: simulated
    profile: instant
    models: {kimi-k2-thinking: kimi-k2-thinking}
"""
GOOD_POLICY = """\
tenant: acme
keys: [sha256:%s]
models:
  kimi-k2-thinking:
    candidates: [moonshot/kimi-k2-thinking, sim/kimi-k2-thinking]
""" % ("a" * 64)
ENV = {"TEST_MOONSHOT_KEY": "sk-upstream"}


def write(tmp_path: Path, config: str, policies: dict[str, str] | None = None) -> Path:
    pol = tmp_path / "policies"
    pol.mkdir(exist_ok=True)
    for name, text in (policies if policies is not None else {"acme.yaml": GOOD_POLICY}).items():
        (pol / name).write_text(text)
    path = tmp_path / "gateway.yaml"
    path.write_text("policies_dir: policies\n" + config)
    return path


def problems(tmp_path: Path, config: str, policies: dict[str, str] | None = None, env=ENV) -> list[str]:
    path = write(tmp_path, config, policies)
    with pytest.raises(ConfigError) as info:
        load_policies(load_checked_config(path, env=env))
    return info.value.problems


def test_good_config_loads(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, GOOD_UPSTREAMS), env=ENV)
    policies = load_policies(loaded)
    assert loaded.api_keys["moonshot"] == "sk-upstream"
    route = policies.tenants["acme"].routes["kimi-k2-thinking"]
    assert [c.label for c in route.candidates] == ["moonshot/kimi-k2-thinking", "sim/kimi-k2-thinking"]


def test_unknown_key_names_path_and_allowed_keys(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("    kind: openai\n", "    kind: openai\n    base_ur: x\n"))
    assert "gateway.yaml:" in p and "upstreams.moonshot.base_ur" in p
    assert "unknown key" in p and "base_url" in p


def test_wrong_enum_value_says_what_was_expected(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("kind: openai", "kind: opneai"))
    assert "upstreams.moonshot.kind" in p and "'openai'" in p and "opneai" in p


def test_wrong_type_is_named(tmp_path: Path) -> None:
    [p] = problems(tmp_path, "listen: {port: eighty}\n" + GOOD_UPSTREAMS)
    assert "listen.port" in p and "integer" in p and "eighty" in p


def test_line_number_points_at_the_key(tmp_path: Path) -> None:
    [p] = problems(tmp_path, "listen: {port: 99999}\n" + GOOD_UPSTREAMS)
    assert "gateway.yaml:2:" in p and "listen.port" in p and "65535" in p


def test_inline_secret_is_refused(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("api_key_env: TEST_MOONSHOT_KEY", "api_key: sk-live-123"))
    assert "upstreams.moonshot" in p and "secrets never go in YAML" in p
    assert "sk-live-123" not in p


def test_missing_key_env_is_named(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS, env={})
    assert "upstreams.moonshot.api_key_env" in p and "TEST_MOONSHOT_KEY is not set" in p


def test_key_file_missing(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("api_key_env: TEST_MOONSHOT_KEY", "api_key_file: nokey.txt"))
    assert "upstreams.moonshot.api_key_file" in p and "nokey.txt" in p


def test_key_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("sk-from-file\n")
    config = GOOD_UPSTREAMS.replace("api_key_env: TEST_MOONSHOT_KEY", "api_key_file: key.txt")
    assert load_config(write(tmp_path, config), env={}).api_keys["moonshot"] == "sk-from-file"


def test_openai_upstream_needs_base_url(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("    base_url: https://api.moonshot.ai/v1\n", ""))
    assert "upstreams.moonshot" in p and "needs base_url" in p


def test_bad_url(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("https://api.moonshot.ai/v1", "api.moonshot.ai"))
    assert "upstreams.moonshot.base_url" in p and "http" in p


def test_unknown_simulator_profile(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS.replace("profile: instant", "profile: warp"))
    assert "upstreams.sim.profile" in p and "warp" in p and "moonshot-standard" in p
    assert p.startswith(f"{tmp_path / 'gateway.yaml'}:")  # file:line, like every other problem


def test_the_profile_check_comes_from_the_adapter(tmp_path: Path) -> None:
    """The config module cannot see the simulator: the profile name is the adapter's to check."""
    path = write(tmp_path, GOOD_UPSTREAMS.replace("profile: instant", "profile: warp"))
    assert load_config(path, env=ENV).settings.upstreams["sim"].profile == "warp"
    with pytest.raises(ConfigError) as info:
        load_checked_config(path, env=ENV)
    [p] = info.value.problems
    assert "unknown simulator profile 'warp'" in p


def test_timeouts_must_be_consistent(tmp_path: Path) -> None:
    config = GOOD_UPSTREAMS.replace(
        "    api_key_env: TEST_MOONSHOT_KEY\n",
        "    api_key_env: TEST_MOONSHOT_KEY\n    timeouts: {first_byte_s: 99, total_s: 10}\n",
    )
    [p] = problems(tmp_path, config)
    assert "upstreams.moonshot.timeouts" in p and "total_s" in p


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS + "  broken: [unclosed\n")
    assert "gateway.yaml:" in p and "invalid YAML" in p


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    [p] = problems(tmp_path, "workers: 1\nworkers: 2\n" + GOOD_UPSTREAMS)
    assert "duplicate key 'workers'" in p


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(path, env=ENV)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_policies_dir(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("policies_dir: nowhere\n" + GOOD_UPSTREAMS)
    with pytest.raises(ConfigError, match=r"policies_dir: expected a folder"):
        load_config(path, env=ENV)


# ---------------------------------------------------------------- policies


def test_policy_unknown_upstream(tmp_path: Path) -> None:
    policy = GOOD_POLICY.replace("sim/kimi-k2-thinking", "vllm/kimi-k2-thinking")
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": policy})
    assert "acme.yaml:" in p and "models.kimi-k2-thinking.candidates[1]" in p and "unknown upstream 'vllm'" in p


def test_policy_unknown_model_at_upstream(tmp_path: Path) -> None:
    policy = GOOD_POLICY.replace("sim/kimi-k2-thinking", "sim/kimi-k3")
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": policy})
    assert "candidates[1]" in p and "has no model 'kimi-k3'" in p


def test_policy_candidate_shape(tmp_path: Path) -> None:
    policy = GOOD_POLICY.replace("sim/kimi-k2-thinking", "kimi-k2-thinking")
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": policy})
    assert "models.kimi-k2-thinking.candidates" in p and "upstream/model" in p


def test_policy_plain_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    policy = GOOD_POLICY.replace("sha256:" + "a" * 64, "sk-live-secret-key")
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": policy})
    assert "keys" in p and "sha256:" in p and "sk-live-secret-key" not in p


def test_duplicate_key_across_tenants(tmp_path: Path) -> None:
    other = GOOD_POLICY.replace("tenant: acme", "tenant: globex")
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": GOOD_POLICY, "globex.yaml": other})
    assert "globex.yaml:" in p and "keys[0]" in p and "acme.yaml" in p


def test_duplicate_tenant(tmp_path: Path) -> None:
    other = GOOD_POLICY.replace("a" * 64, "b" * 64)
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": GOOD_POLICY, "acme2.yaml": other})
    assert "acme2.yaml:" in p and "tenant" in p and "already defined" in p


def test_policy_missing_required_key(tmp_path: Path) -> None:
    policy = "tenant: acme\nmodels: {}\n"
    found = problems(tmp_path, GOOD_UPSTREAMS, {"acme.yaml": policy})
    assert any("keys: required key is missing" in p for p in found)


def test_no_policy_files(tmp_path: Path) -> None:
    [p] = problems(tmp_path, GOOD_UPSTREAMS, {})
    assert "no policy files" in p


def test_all_problems_are_listed_at_once(tmp_path: Path) -> None:
    bad = GOOD_UPSTREAMS.replace("kind: openai", "kind: nope").replace("profile: instant", "profile: warp")
    found = problems(tmp_path, bad)
    assert len(found) >= 1
    assert any("upstreams.moonshot.kind" in p for p in found)


def test_config_check_refuses_a_ledger_url_the_stores_would_refuse(tmp_path: Path) -> None:
    """One parser: a '#' left unescaped in a PostgreSQL password is caught by ``config check`` with the
    file and line, not only when the gateway opens the ledger."""
    found = problems(tmp_path, 'ledger: {url: "postgresql://gw:se#cret@db/spend"}\n' + GOOD_UPSTREAMS)
    assert any("gateway.yaml:2" in p and "ledger" in p and "%23" in p for p in found), found
    found = problems(tmp_path, 'ledger: {url: "sqlite://ledger.db"}\n' + GOOD_UPSTREAMS)
    assert any("gateway.yaml:2" in p and "sqlite:///relative.db" in p for p in found), found
