"""Config for the tool features: ``tool_call_markers`` and ``kind: litellm`` upstreams."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.upstreams.factory import build_upstreams
from gateway.yamlfile import ConfigError
from tests.unit.test_config_errors import write


def test_litellm_and_marker_upstreams_load_without_importing_litellm(tmp_path: Path) -> None:
    config = """\
upstreams:
  claude:
    kind: litellm
    api_key_env: TEST_ANTHROPIC_KEY
    models: {claude: anthropic/claude-sonnet-4-5}
  vllm-raw:
    kind: openai
    base_url: http://127.0.0.1:8000/v1
    tool_call_markers: true
    models: [kimi-k2-thinking]
"""
    loaded = load_config(write(tmp_path, config), env={"TEST_ANTHROPIC_KEY": "sk-ant"})
    already = "litellm" in sys.modules
    upstreams = build_upstreams(loaded)
    assert upstreams["vllm-raw"].tool_call_markers is True
    assert upstreams["claude"].tool_call_markers is False
    if not already:
        assert "litellm" not in sys.modules  # imported at start-up, not when the config is read


@pytest.mark.parametrize(
    ("upstream", "needle"),
    [
        ("kind: litellm\n    profile: instant\n    models: [m]", "for kind 'simulated' only"),
        ("kind: litellm\n    models: [m]\n    tool_call_markers: maybe", "tool_call_markers"),
        ("kind: bedrock\n    models: [m]", "kind"),
    ],
)
def test_bad_tool_upstream_config_is_refused_with_its_path(tmp_path: Path, upstream: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"upstreams:\n  x:\n    {upstream}\n"), env={})
    text = "\n".join(caught.value.problems)
    assert "upstreams.x" in text and needle in text, text
