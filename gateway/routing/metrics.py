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
