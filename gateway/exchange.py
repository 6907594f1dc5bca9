"""The request-scoped types every step reads: :class:`Exchange` (one request as it moves through the
steps) and :class:`Runtime` (what the process holds for all requests).

They live here, not in ``pipeline.py``, so that the stages (reasoning, tools, capture, the front
ends) can take them as arguments without importing the module that composes those stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.capture.store import CaptureStore
from gateway.metering.meter import Meter, Metered
from gateway.observability import UNKNOWN
from gateway.policy.store import Candidate, PolicySet, Tenant
from gateway.ratelimit import Admission, RateLimiter
from gateway.routing.keys import Lease
from gateway.routing.retired import Retired
from gateway.routing.router import Router
from gateway.state.base import KeyValueState
from gateway.state.memory import MemoryKeyValueState, MemoryRateLimitState
from gateway.transforms.base import ResponseTransform
from gateway.upstreams.base import Upstream


@dataclass(slots=True)
class Exchange:
    """What the pipeline knows about one request as it moves through the steps."""

    request_id: str
    tenant: Tenant
    key_id: str
    body: dict[str, Any]
    raw: bytes
    started: float
    metered: Metered
    stream: bool = False
    model: str = UNKNOWN
    candidate: Candidate | None = None
    route_reason: str = ""
    max_latency_ms: float | None = None  # x-gateway-max-latency-ms: tightens the route's SLO
    status: int = 0
    upstream_time: float = 0.0
    dirty: bool = False  # the body was changed: serialize it again before sending
    builtin_tools: bool = False  # the request declares provider builtins ($web_search): per-call fees
    # response transforms for this request (reasoning modes, tool-call repair...); empty = byte relay
    transforms: list[ResponseTransform] = field(default_factory=list)
    rate: Admission | None = None  # the rate limits that admitted it (headers, token correction)
    open_row: bool = False  # the ledger holds an open-reservation row for it (crash reconciliation)
    # whether the pipeline gives the answer the client-facing envelope (virtual model name, OpenAI
    # usage): the tenant's choice, except for a front end that renders the whole answer itself
    # from the chat one (Responses), where it would be work nobody reads
    envelope: str = "normalized"
    key_lease: Lease | None = None  # the upstream pool key this attempt holds (released at clean-up)

    @property
    def upstream_label(self) -> str:
        return self.candidate.label if self.candidate else UNKNOWN


class Runtime:
    """What the pipeline reads per request: policies (swapped whole on reload), upstreams, the meter."""

    def __init__(
        self,
        policies: PolicySet,
        upstreams: dict[str, Upstream],
        meter: Meter,
        kv: KeyValueState | None = None,
        router: Router | None = None,
        limits: RateLimiter | None = None,
    ) -> None:
        self.policies = policies
        self.upstreams = upstreams
        self.meter = meter
        # shared small entries (prefix affinity, reasoning store, upstream stats): memory or Redis
        self.kv: KeyValueState = kv if kv is not None else MemoryKeyValueState()
        self.limits = limits if limits is not None else RateLimiter(MemoryRateLimitState())
        self.capture: CaptureStore | None = None  # diagnostic capture rows, for tenants that turn it on
        # ranks candidates per request; learns speeds, cache hits and health from every answer
        self.router = router if router is not None else Router({}, meter.prices, self.kv)
        # candidates an upstream answered 404 for (retired model ids): skipped, probed after a backoff
        self.dead: Retired = self.router.dead
