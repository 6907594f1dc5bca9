"""Prometheus metrics and logging.

Label values come only from configuration (tenant, virtual model, upstream names) or from small
fixed sets (status codes, failure kinds), never from raw request input, so cardinality stays
bounded whatever clients send.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
UNKNOWN = "(unknown)"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter(
    "gateway_requests",
    "Requests answered, by tenant, virtual model, upstream and HTTP status.",
    ("tenant", "model", "upstream", "status"),
    registry=REGISTRY,
)
DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from the request's arrival to the end of its response.",
    ("tenant", "model", "upstream", "stream"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    "gateway_ttft_seconds",
    "Time from the request's arrival to the first streamed byte sent to the client.",
    ("tenant", "model", "upstream"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "Time spent inside the gateway itself for a request, upstream time excluded.",
    ("stream",),
    buckets=_OVERHEAD_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "gateway_upstream_failures",
    "Upstream calls that failed below HTTP or with an error status, by kind.",
    ("upstream", "kind"),
    registry=REGISTRY,
)

TOKENS = Counter(
    "gateway_tokens",
    "Tokens metered, by kind: prompt (cached included), cached, completion (reasoning included), reasoning.",
    ("tenant", "model", "upstream", "kind"),
    registry=REGISTRY,
)
SPEND = Counter(
    "gateway_spend_usd",
    "Spend in USD as settled in the ledger (the ledger holds the exact Decimal amounts).",
    ("tenant", "model", "upstream"),
    registry=REGISTRY,
)
CACHE_SAVINGS = Counter(
    "gateway_cache_savings_usd",
    "What cache hits saved in USD against the cache-miss price.",
    ("tenant", "model", "upstream"),
    registry=REGISTRY,
)
STATE_UNAVAILABLE = Counter(
    "gateway_state_unavailable",
    "Calls to the shared state store (Redis) that failed or were skipped while it was down, by concern "
    "(budgets, rate limits); the concern's fail mode decided what the request got.",
    ("concern",),
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "gateway_rate_limited",
    "Requests refused with 429 by a rate limit, by tenant, the limit that refused them (scope: tenant "
    "or key, never the key itself) and its unit (requests, tokens).",
    ("tenant", "scope", "unit"),
    registry=REGISTRY,
)
BUDGET_REMAINING = Gauge(
    "gateway_budget_remaining_usd",
    "Remaining tenant budget in USD per window (daily, monthly), refreshed within a second of requests settling.",
    ("tenant", "window"),
    registry=REGISTRY,
    # with several workers each holds the value it last computed: the latest write is the truth
    multiprocess_mode="mostrecent",
)
REASONING_RESTORED = Counter(
    "gateway_reasoning_restored",
    "Assistant tool-call messages sent upstream, by where their reasoning came from: client (sent back by "
    "the client), store (kept by the gateway), placeholder (neither: K2 gets a blank and loses the thread "
    "of that turn), none (neither, on an upstream that does not need it).",
    ("tenant", "source"),
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class Series:
    """The metric children of one (tenant, model, upstream, stream) combination.

    ``labels()`` builds a key and takes a lock on every call; label values come from configuration,
    so the combinations are few and their children can be looked up once and reused. The updates go
    to prometheus-client's children as they happen: adding them up in plain numbers until a scrape
    saved 3.5 µs a request (11.4 µs with ``--workers``), 1-4 % of its CPU, under the 10 % line at
    which a hand-written replacement of the library earns its place (bench/RESULTS.md §7).
    """

    key: tuple[str, str, str]
    requests: dict[int, Any]  # by HTTP status, filled as statuses occur
    duration: Any
    ttft: Any
    overhead: Any
    prompt: Any
    cached: Any
    completion: Any
    reasoning: Any
    spend: Any
    savings: Any

    def status(self, status: int) -> Any:
        child = self.requests.get(status)
        if child is None:
            child = self.requests[status] = REQUESTS.labels(*self.key, str(status))
        return child


@functools.lru_cache(maxsize=4096)
def series(tenant: str, model: str, upstream: str, stream: bool) -> Series:
    flag = "true" if stream else "false"
    return Series(
        key=(tenant, model, upstream),
        requests={},
        duration=DURATION.labels(tenant, model, upstream, flag),
        ttft=TTFT.labels(tenant, model, upstream),
        overhead=OVERHEAD.labels(flag),
        prompt=TOKENS.labels(tenant, model, upstream, "prompt"),
        cached=TOKENS.labels(tenant, model, upstream, "cached"),
        completion=TOKENS.labels(tenant, model, upstream, "completion"),
        reasoning=TOKENS.labels(tenant, model, upstream, "reasoning"),
        spend=SPEND.labels(tenant, model, upstream),
        savings=CACHE_SAVINGS.labels(tenant, model, upstream),
    )


_MULTIPROCESS: list[CollectorRegistry] = []


def metrics_payload() -> tuple[bytes, str]:
    """This process's metrics, or with several workers (``PROMETHEUS_MULTIPROC_DIR`` set by
    ``kimi-gateway serve --workers N``) every worker's, added up from their files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if not _MULTIPROCESS:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            _MULTIPROCESS.append(registry)
        return generate_latest(_MULTIPROCESS[0]), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def setup_logging(level: str) -> None:
    """One line per event on stderr; keys and request bodies are never logged."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


log = logging.getLogger("kimi_gateway")
