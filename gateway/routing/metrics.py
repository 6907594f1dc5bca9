"""Routing metrics (labels are configured names only: tenants, virtual models, upstream/model labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from gateway.observability import REGISTRY

FAILOVERS = Counter(
    "gateway_failovers",
    "Calls that failed before any byte reached the client and moved on to the next candidate.",
    ("candidate", "kind"),
    registry=REGISTRY,
)
BREAKER_OPENED = Counter(
    "gateway_breaker_opened",
    "Times a candidate's circuit breaker opened after consecutive failures.",
    ("candidate",),
    registry=REGISTRY,
)
DEAD_CANDIDATES = Counter(
    "gateway_dead_candidates",
    "Candidates retired after their upstream answered 404 for the model.",
    ("candidate",),
    registry=REGISTRY,
)
CANDIDATE_RETIRED = Gauge(
    "gateway_candidate_retired",
    "1 while a candidate is skipped after its upstream answered 404 for the model (until a probe succeeds).",
    ("candidate",),
    registry=REGISTRY,
)
VLLM_QUEUE = Gauge(
    "gateway_vllm_waiting_requests",
    "vllm:num_requests_waiting as last scraped from a self-hosted upstream.",
    ("upstream",),
    registry=REGISTRY,
)
# key pools: labels are the configured key labels, never the keys
KEY_REQUESTS = Counter(
    "gateway_upstream_key_requests",
    "Requests sent over each key of an upstream's key pool.",
    ("upstream", "key"),
    registry=REGISTRY,
)
KEY_TOKENS = Counter(
    "gateway_upstream_key_tokens",
    "Tokens the provider reported per pool key (kind: prompt, cached, completion).",
    ("upstream", "key", "kind"),
    registry=REGISTRY,
)
KEY_RATE_LIMITED = Counter(
    "gateway_upstream_key_rate_limited",
    "429 answers per pool key (the request moved to another key of the same upstream when one had room).",
    ("upstream", "key"),
    registry=REGISTRY,
)
KEY_COOLDOWNS = Counter(
    "gateway_upstream_key_cooldowns",
    "Times a pool key was rested (reason: 429, or provider_headers when the provider said its quota is spent).",
    ("upstream", "key", "reason"),
    registry=REGISTRY,
)
KEY_REVOKED = Counter(
    "gateway_upstream_key_revoked",
    "Pool keys taken out after the provider refused them (401/403): alert on any increase.",
    ("upstream", "key"),
    registry=REGISTRY,
)
KEYS_EXHAUSTED = Counter(
    "gateway_upstream_keys_exhausted",
    "Requests that found no key of an upstream's pool with room (the upstream counted as unavailable).",
    ("upstream",),
    registry=REGISTRY,
)
