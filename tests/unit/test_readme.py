"""The READMEs say only what the code does: their metrics are the ones the gateway exports (and every
exported metric is documented), and their policy and config examples pass the same validation as the
real files. Users copy these examples; a renamed key must not leave one that the server refuses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, LedgerConfig, RoutingConfig, StateConfig, UpstreamConfig
from gateway.policy.model import PolicyDefaults, TenantPolicy
from tests.unit.test_grafana_dashboard import SUFFIXES, exported_sample_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
POLICIES_README = (ROOT / "policies" / "README.md").read_text(encoding="utf-8")
# a placeholder hash as the READMEs write it ("sha256:0f1e...", "sha256:<hash of one key>"); each
# "sha256:XXXX..." stands for its own key (an app example needs two), the others for the first
PLACEHOLDER_HASH = re.compile(r"sha256:(?:([0-9a-f]{4})\.\.\.|\.\.\.|<[^>]*>)")
VALID_HASH = "sha256:" + "0f1e" * 16


def _valid(found: re.Match[str]) -> str:
    return "sha256:" + (found.group(1) or "0f1e") * 16


# a config key is mentioned as `key`, `key: value`, a YAML line `key: ...` or in a flow mapping {a, key}
MENTIONED = r"`{0}\b|\b{0}:|[{{,]\s*{0}\b"


def yaml_blocks(text: str) -> list[Any]:
    """Every ```yaml block of a README, parsed, with placeholder key hashes made valid."""
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    return [yaml.safe_load(PLACEHOLDER_HASH.sub(_valid, block)) for block in blocks]


def documented_metrics(text: str) -> set[str]:
    return set(re.findall(r"`(gateway_[a-z_]+)", text))


def exported_families() -> set[str]:
    from gateway.observability import REGISTRY

    exported_sample_names()  # imports every module that registers a metric
    return {
        family.name + SUFFIXES.get(family.type, ("",))[0].removesuffix("_bucket")
        for family in REGISTRY.collect()
        if family.name.startswith("gateway_")
    }


def test_readme_metrics_are_exported() -> None:
    exported = exported_sample_names() | exported_families()  # a histogram is named without a suffix
    for text in (README, POLICIES_README):
        unknown = sorted(documented_metrics(text) - exported)
        assert not unknown, f"a README names metrics the gateway does not export: {unknown}"


def test_every_exported_metric_is_in_the_readme_table() -> None:
    missing = sorted(exported_families() - documented_metrics(README))
    assert not missing, f"README.md does not document these metrics: {missing}"


def test_policy_readme_examples_validate() -> None:
    tenant, defaults = (b for b in yaml_blocks(POLICIES_README) if isinstance(b, dict))
    TenantPolicy.model_validate(tenant)
    PolicyDefaults.model_validate(defaults)
    # every top-level key of the tenant file is in the example
    assert set(tenant) == set(TenantPolicy.model_fields)


@pytest.mark.parametrize("section", ["budget", "rate_limits", "reasoning", "capture", "models"])
def test_readme_policy_snippets_validate(section: str) -> None:
    snippets = [b for b in yaml_blocks(README) if isinstance(b, dict) and section in b and "upstreams" not in b]
    assert snippets, f"README.md has no policy example with {section!r}"
    for snippet in snippets:
        tenant = {"tenant": "readme", "keys": [VALID_HASH], "models": {"m": {"candidates": ["u/m"]}}, **snippet}
        TenantPolicy.model_validate(tenant)


def test_readme_config_snippets_validate() -> None:
    configs = [b for b in yaml_blocks(README) if isinstance(b, dict) and ("upstreams" in b or "state" in b)]
    assert len(configs) >= 3
    for block in configs:
        if "upstreams" in block:
            GatewayConfig.model_validate(block)
        else:
            StateConfig.model_validate(block["state"])


@pytest.mark.parametrize("model", [GatewayConfig, UpstreamConfig, LedgerConfig, RoutingConfig, StateConfig])
def test_every_config_key_is_in_the_readme(model: type[Any]) -> None:
    missing = sorted(key for key in model.model_fields if not re.search(MENTIONED.format(re.escape(key)), README))
    assert not missing, f"README.md does not mention these {model.__name__} keys: {missing}"
