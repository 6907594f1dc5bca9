"""Build the upstream adapters a config names, and check the keys only they understand (simulated
ones, and the simulator behind them, are imported only when used)."""

from __future__ import annotations

import os

from gateway.config import LoadedConfig, UpstreamConfig, load_config
from gateway.upstreams.base import Upstream
from gateway.yamlfile import YamlDoc


def check_upstream(doc: YamlDoc, name: str, up: UpstreamConfig) -> list[str]:
    """The adapter's own check of one upstream section (today: a simulated upstream's profile)."""
    if up.kind == "simulated":
        from gateway.upstreams.simulated import config_problems

        return config_problems(doc, name, up)
    return []


def load_checked_config(
    path: str | os.PathLike[str], env: dict[str, str] | None = None, *, resolve_keys: bool = True
) -> LoadedConfig:
    """:func:`gateway.config.load_config` with the adapters' checks: what every entry point loads.

    The config module is the foundation and cannot import the adapters, so the check travels down
    as an argument; one list of ``file:line`` problems still covers both.
    """
    return load_config(path, env, resolve_keys=resolve_keys, check_upstream=check_upstream)


def build_upstreams(config: LoadedConfig) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, up in config.settings.upstreams.items():
        if up.kind == "openai":
            from gateway.upstreams.openai_compat import OpenAICompatUpstream

            out[name] = OpenAICompatUpstream(name, up, config.api_keys.get(name), config.key_pools.get(name))
        elif up.kind == "litellm":
            from gateway.upstreams.litellm_upstream import LiteLLMUpstream

            out[name] = LiteLLMUpstream(name, up, config.api_keys.get(name))
        else:
            from gateway.upstreams.simulated import SimulatedUpstream

            out[name] = SimulatedUpstream(name, up)
    return out
