"""What the router assumes of an upstream before live traffic has taught it anything.

A configured ``prior`` wins; a simulated upstream is assumed to be as fast as its profile; anything
else gets the defaults of :class:`gateway.config.Prior` (a cautious guess for a hosted API).

It sits with the upstreams, not in ``routing/``: a prior is a fact about an upstream read from its
config, and the policy loader (``policy/store.py``, a layer below routing) checks SLOs against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import Prior, UpstreamConfig

# an "instant" profile has zero delays; keep speeds finite so expected times stay comparable
_FASTEST_TPS = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Speed:
    ttft_s: float  # time to first token of a fully cached (or tiny) prompt
    tokens_per_s: float
    prefill_tps: float = math.inf  # uncached prompt tokens per second (inf: prefill is free)


def prior_of(up: UpstreamConfig) -> Speed:
    if up.prior is not None:
        return Speed(up.prior.ttft_ms / 1000, up.prior.tokens_per_s, up.prior.prefill_tokens_per_s)
    if up.kind == "simulated":
        from gateway.upstreams.simulated import profile_of  # the simulator is loaded only when configured

        profile = profile_of(up)
        tps = profile.tokens_per_s
        return Speed(profile.ttft_s, tps if tps > 0 else _FASTEST_TPS)
    default = Prior()
    return Speed(default.ttft_ms / 1000, default.tokens_per_s, default.prefill_tokens_per_s)
