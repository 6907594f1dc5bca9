"""Apps in a policy are sets of the tenant's key hashes: ``policy check`` names the file and line of
an app key that is malformed, not one of the tenant's keys, or in two apps, and of a capped app that
is not declared; a valid file gives every key the app that owns it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_config
from gateway.policy.store import load_policies
from tests.conftest import write_gateway

UPSTREAMS = "  sim: {kind: simulated, profile: instant, models: [kimi-k2-thinking]}\n"
A, B, C = ("sha256:" + ch * 64 for ch in "abc")


def policy(apps: str, caps: str = "{web: {daily_usd: 5}}") -> str:
    return f"""\
tenant: apps
keys: ["{A}", "{B}", "{C}"]
apps:
{apps}
models:
  k2: {{candidates: [sim/kimi-k2-thinking]}}
budget:
  daily_usd: 50
  apps: {caps}
"""


GOOD_APPS = f'  web: {{keys: ["{A}"]}}\n  batch: {{keys: ["{B}"], description: nightly jobs}}'


def check(tmp_path: Path, text: str) -> tuple[int, str, Path]:
    config = write_gateway(tmp_path, UPSTREAMS, text)
    result = CliRunner().invoke(app, ["policy", "check", "--config", str(config)])
    return result.exit_code, result.output, config.parent / "gateway-policies" / "tenant.yaml"


def test_valid_apps_pass_and_each_key_carries_its_app(tmp_path: Path) -> None:
    code, out, _ = check(tmp_path, policy(GOOD_APPS))
    assert code == 0, out
    policies = load_policies(load_config(tmp_path / "gateway.yaml"))
    apps = {entry.digest[:1]: entry.app for entry in policies.keys.values()}
    assert apps == {"a": "web", "b": "batch", "c": None}  # a key in no app is capped by the tenant alone


def test_a_key_in_two_apps_is_refused_at_its_line(tmp_path: Path) -> None:
    code, out, path = check(tmp_path, policy(f'  web: {{keys: ["{A}"]}}\n  batch:\n    keys: ["{B}", "{A}"]'))
    assert code == 2
    assert f"{path}:6: apps.batch.keys[1]: sha256:aaaaaaaaaaaaa... already belongs to app 'web'" in out


def test_an_app_key_that_is_not_the_tenants_is_refused(tmp_path: Path) -> None:
    stranger = "sha256:" + "d" * 64
    code, out, path = check(tmp_path, policy(f'  web:\n    keys:\n      - "{stranger}"'))
    assert code == 2
    assert f"{path}:6: apps.web.keys[0]: sha256:ddddddddddddd... is not one of this tenant's keys" in out


def test_a_malformed_app_key_hash_is_refused(tmp_path: Path) -> None:
    code, out, path = check(tmp_path, policy('  web: {keys: ["sk-live-secret"]}'))
    assert code == 2
    assert f"{path}:4: apps.web.keys:" in out and "must be 'sha256:' followed by 64 lowercase hex digits" in out
    assert "sk-live-secret" not in out  # a key pasted by mistake is not echoed


def test_caps_on_an_undeclared_app_are_refused(tmp_path: Path) -> None:
    code, out, path = check(tmp_path, policy(GOOD_APPS, caps="\n    checkout: {daily_usd: 5}"))
    assert code == 2
    assert f"{path}:11: budget.apps.checkout: no app 'checkout' under 'apps' (declared: batch, web)" in out
