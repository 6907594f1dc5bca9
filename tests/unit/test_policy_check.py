"""``kimi-gateway policy check``: one precise message (file:line: key.path: what) per kind of mistake."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from gateway.cli import app
from tests.conftest import K2_PRICES, write_gateway, write_prices

UPSTREAMS = """\
  moonshot: {kind: simulated, profile: moonshot-standard, models: [kimi-k2-thinking, kimi-k2-thinking-turbo]}
  fast: {kind: simulated, profile: moonshot-turbo, models: [kimi-k2-thinking-turbo]}
"""
GOOD = f"""\
tenant: good
keys: ["sha256:{"a" * 64}"]
strategy: balanced
slo: {{ttft_ms: 3000}}
models:
  k2:
    candidates: [moonshot/kimi-k2-thinking, fast/kimi-k2-thinking-turbo]
    strategy: cost
"""


def setup(tmp_path: Path) -> tuple[Path, Path]:
    config = write_gateway(tmp_path, UPSTREAMS, GOOD)
    return config, config.parent / "gateway-policies"


def check(config: Path, folder: Path | None = None) -> tuple[int, str]:
    args = ["policy", "check", *([str(folder)] if folder else []), "--config", str(config)]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def add(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_valid_policies_pass(tmp_path: Path) -> None:
    config, _ = setup(tmp_path)
    code, out = check(config)
    assert code == 0, out
    assert "ok (1 tenants, 1 virtual models, 1 files)" in out


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    path = add(
        folder, "b.yaml", GOOD.replace("tenant: good", "tenant: b").replace("    strategy: cost", "    stratgy: cost")
    )
    path.write_text(path.read_text().replace("a" * 64, "b" * 64))
    code, out = check(config, folder)
    assert code == 2
    assert f"{path}:8: models.k2.stratgy: unknown key (allowed: candidates, strategy, slo)" in out


def test_unknown_strategy(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    (folder / "tenant.yaml").write_text(GOOD.replace("strategy: cost", "strategy: cheapest"))
    code, out = check(config)
    assert code == 2 and "models.k2.strategy: expected 'cost', 'latency', 'balanced' or 'pinned'" in out


def test_unknown_upstream_and_unknown_model(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    (folder / "tenant.yaml").write_text(
        GOOD.replace("fast/kimi-k2-thinking-turbo", "slow/kimi-k2-thinking-turbo").replace(
            "moonshot/kimi-k2-thinking,", "moonshot/kimi-k3,"
        )
    )
    code, out = check(config)
    assert code == 2
    assert "models.k2.candidates[1]: unknown upstream 'slow' in 'slow/kimi-k2-thinking-turbo'" in out
    assert "models.k2.candidates[0]: upstream 'moonshot' has no model 'kimi-k3'" in out


def test_candidate_without_a_price(tmp_path: Path) -> None:
    config, _ = setup(tmp_path)
    write_prices(tmp_path / "gateway-prices.yaml", {"moonshot/kimi-k2-thinking": K2_PRICES})
    code, out = check(config)
    assert code == 2
    assert "models.k2.candidates[1]: fast/kimi-k2-thinking-turbo has no price in force" in out


def test_impossible_slos(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    (folder / "tenant.yaml").write_text(
        GOOD.replace("strategy: cost", "strategy: cost\n    slo: {ttft_ms: 5000, total_ms: 1000}")
    )
    code, out = check(config)
    assert code == 2 and "models.k2.slo: impossible SLO: ttft_ms (5000) is larger than total_ms (1000)" in out
    # faster than every candidate's expected first token (standard 600 ms, turbo 300 ms)
    (folder / "tenant.yaml").write_text(GOOD.replace("slo: {ttft_ms: 3000}", "slo: {ttft_ms: 100}"))
    code, out = check(config)
    assert code == 2
    assert "slo: impossible SLO: ttft_ms 100 is below every candidate's expected time to first token" in out
    assert "fast/kimi-k2-thinking-turbo ~300 ms" in out


def test_duplicate_key_and_tenant_across_files(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    copy = add(folder, "z-copy.yaml", GOOD)  # read after tenant.yaml
    code, out = check(config)
    assert code == 2
    assert f"{copy}:1: tenant: tenant 'good' is already defined in" in out
    assert f"{copy}:2: keys[0]: this key hash is also listed in" in out


def test_defaults_file_is_validated_and_merged(tmp_path: Path) -> None:
    config, folder = setup(tmp_path)
    defaults = add(folder, "defaults.yaml", "strategy: fastest\n")
    code, out = check(config)
    assert code == 2 and f"{defaults}:1: strategy: expected 'cost', 'latency', 'balanced' or 'pinned'" in out
    defaults.write_text("slo: {total_ms: 2000}\n")  # merged under the tenant's ttft_ms 3000: impossible
    code, out = check(config)
    assert code == 2 and "impossible SLO: ttft_ms 3000 (merged with defaults) exceeds total_ms 2000" in out
    defaults.write_text(
        "budget_routing: [{remaining_below: 0.1, strategy: cost}, {remaining_below: 0.5, strategy: balanced}]\n"
    )
    code, out = check(config)
    assert code == 2 and "budget_routing: steps must be listed from the highest remaining_below" in out


def test_folder_without_policies(tmp_path: Path) -> None:
    config, _ = setup(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = check(config, empty)
    assert code == 2 and "no policy files" in out
