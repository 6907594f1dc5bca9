"""Expected cost and latency of one candidate for one request.

cost    = uncached prompt x miss price + expected cached x hit price + expected output x output price
latency = EWMA time to first token + uncached prompt / prefill speed (+ queueing at a loaded vLLM)
          + expected output / EWMA tokens per s
Expected output is ``max_tokens`` capped by the tenant's running average of completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from gateway.metering.prices import Price
from gateway.policy.store import Candidate
from gateway.routing.stats import CandidateStat


@dataclass(slots=True)
class Option:
    """One candidate as the router sees it for this request."""

    candidate: Candidate
    index: int  # position in the policy's candidate list (breaks ties)
    cost: Decimal | None = None  # USD; None = not computed (the fast path)
    ttft_s: float = 0.0
    total_s: float = 0.0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    meets_slo: bool = True
    held_tokens: int = 0  # the longest prefix this upstream served recently (before the hit rate)
    queue_s: float = 0.0  # expected wait in a loaded vLLM's queue, part of ttft_s
    excluded: str = ""  # why the candidate is not tried (dead, breaker open)
    key: str | None = None  # the pool key the attempt went out with (routing/keys.py)

    @property
    def label(self) -> str:
        return self.candidate.label


def estimate(
    option: Option,
    price: Price | None,
    stat: CandidateStat,
    prompt_tokens: int,
    output_tokens: int,
    held_tokens: int,
    queue_s: float,
    slo_ttft_ms: float | None,
    slo_total_ms: float | None,
) -> None:
    """Fill ``option`` with its expected cost, latency and cached tokens."""
    cached = min(prompt_tokens, int(held_tokens * stat.hit_rate))
    option.held_tokens = held_tokens
    option.prompt_tokens = prompt_tokens
    option.output_tokens = output_tokens
    option.cached_tokens = cached
    option.queue_s = queue_s
    if price is not None:
        option.cost = (prompt_tokens - cached) * price.miss + cached * price.hit + output_tokens * price.out
    option.ttft_s = stat.ttft_s + queue_s + (prompt_tokens - cached) / stat.prefill_tps
    option.total_s = option.ttft_s + (output_tokens / stat.tokens_per_s if stat.tokens_per_s > 0 else 0.0)
    option.meets_slo = (slo_ttft_ms is None or option.ttft_s * 1000 <= slo_ttft_ms) and (
        slo_total_ms is None or option.total_s * 1000 <= slo_total_ms
    )
