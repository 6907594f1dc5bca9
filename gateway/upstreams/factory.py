"""Build the upstream adapters a config names (simulated ones are imported only when used)."""

from __future__ import annotations

from gateway.config import LoadedConfig
from gateway.upstreams.base import Upstream


def build_upstreams(config: LoadedConfig) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, up in config.settings.upstreams.items():
        if up.kind == "openai":
            from gateway.upstreams.openai_compat import OpenAICompatUpstream

            out[name] = OpenAICompatUpstream(name, up, config.api_keys.get(name))
        elif up.kind == "litellm":
            from gateway.upstreams.litellm_upstream import LiteLLMUpstream

            out[name] = LiteLLMUpstream(name, up, config.api_keys.get(name))
        else:
            from gateway.upstreams.simulated import SimulatedUpstream

            out[name] = SimulatedUpstream(name, up)
    return out
