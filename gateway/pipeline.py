"""The one place that orders the steps of a chat/completions request.

policy → candidate → request shaping → upstream call → relay. Each step is a small function in its
own module; this file composes them and owns nothing else. Stream and non-stream share the steps:
a non-stream answer is relayed as one body, a stream as its SSE events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import errors
from gateway.api.http import CT_SSE, NO_CACHE, DisconnectWatch, Send, send_bytes
from gateway.errors import GatewayError
from gateway.observability import DURATION, OVERHEAD, REQUESTS, TTFT, UNKNOWN, UPSTREAM_FAILURES, log
from gateway.policy.store import Candidate, PolicySet, Tenant
from gateway.upstreams.base import Upstream, UpstreamFailure, UpstreamReply
from gateway.upstreams.errors import upstream_error
from gateway.upstreams.sse import SSERelay


@dataclass(slots=True)
class Exchange:
    """What the pipeline knows about one request as it moves through the steps."""

    request_id: str
    tenant: Tenant
    key_id: str
    body: dict[str, Any]
    raw: bytes
    started: float
    stream: bool = False
    model: str = UNKNOWN
    candidate: Candidate | None = None
    route_reason: str = ""
    status: int = 0
    upstream_time: float = 0.0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def upstream_label(self) -> str:
        return self.candidate.label if self.candidate else UNKNOWN


class Runtime:
    """What the pipeline reads per request: policies (swapped whole on reload) and upstream clients."""

    def __init__(self, policies: PolicySet, upstreams: dict[str, Upstream]) -> None:
        self.policies = policies
        self.upstreams = upstreams
        # Candidates an upstream answered 404 for (retired model ids): skipped until the config changes.
        self.dead: set[str] = set()


def choose_candidate(rt: Runtime, ex: Exchange) -> Candidate:
    """The first candidate not known to be dead (the routing strategies refine this order)."""
    route = ex.tenant.routes.get(ex.model)
    if route is None:
        raise errors.model_not_found(ex.model)
    for candidate in route.candidates:
        if candidate.label not in rt.dead:
            ex.route_reason = (
                "pinned: first candidate"
                if candidate is route.candidates[0]
                else ("pinned: first live candidate (earlier ones answered 404 for their model)")
            )
            return candidate
    raise GatewayError(
        404,
        f"Every upstream for model '{ex.model}' answered that it does not serve it "
        f"({', '.join(c.label for c in route.candidates)}); the gateway's configuration needs updating.",
        type="invalid_request_error",
        param="model",
        code="model_unavailable",
    )


def shape_request(ex: Exchange, candidate: Candidate) -> bytes:
    """Bytes for the upstream: the client's own bytes unless something must change.

    Only the model name is rewritten, in place, so key order and every unknown field stay as the
    client sent them; provider prompt caches see the same bytes turn after turn.
    """
    if ex.model == candidate.upstream_model:
        return ex.raw
    ex.body["model"] = candidate.upstream_model
    return orjson.dumps(ex.body)


def _response_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-request-id", ex.request_id.encode()),
        (b"x-gateway-upstream", ex.upstream_label.encode()),
        (b"x-gateway-route-reason", ex.route_reason.encode()),
    ]


def _observe(ex: Exchange, first_byte_at: float | None = None) -> None:
    now = time.perf_counter()
    tenant, upstream = ex.tenant.name, ex.upstream_label
    REQUESTS.labels(tenant, ex.model, upstream, str(ex.status)).inc()
    DURATION.labels(tenant, ex.model, upstream, "true" if ex.stream else "false").observe(now - ex.started)
    if first_byte_at is not None:
        TTFT.labels(tenant, ex.model, upstream).observe(first_byte_at - ex.started)
    if ex.status < 500 and ex.upstream_time:
        OVERHEAD.labels("true" if ex.stream else "false").observe(max(0.0, now - ex.started - ex.upstream_time))


async def _call(rt: Runtime, ex: Exchange, candidate: Candidate, body: bytes) -> UpstreamReply:
    upstream = rt.upstreams[candidate.upstream]
    try:
        reply = await upstream.send(body, stream=ex.stream)
    except UpstreamFailure as failure:
        UPSTREAM_FAILURES.labels(candidate.upstream, failure.kind).inc()
        if failure.is_timeout:
            raise errors.gateway_timeout(failure.message) from None
        raise errors.bad_gateway(failure.message, code=f"upstream_{failure.kind}") from None
    if reply.status >= 400:
        try:
            payload = await reply.read()
        except UpstreamFailure:
            payload = b""
        finally:
            await reply.aclose()
        UPSTREAM_FAILURES.labels(candidate.upstream, str(reply.status)).inc()
        error = upstream_error(candidate, reply.status, payload, reply.retry_after)
        if reply.status == 404 and error.code == "upstream_model_not_found":
            rt.dead.add(candidate.label)
            log.warning(
                "upstream %s answered 404 for model %s (retired id?): candidate %s is skipped until the "
                "configuration changes",
                candidate.upstream,
                candidate.upstream_model,
                candidate.label,
            )
        raise error
    return reply


async def chat(rt: Runtime, ex: Exchange, send: Send, watch: DisconnectWatch) -> None:
    """Serve one chat/completions request end to end; raises GatewayError before any byte is sent."""
    candidate = choose_candidate(rt, ex)
    ex.candidate = candidate
    body = shape_request(ex, candidate)
    sent_at = time.perf_counter()
    reply = await _call(rt, ex, candidate, body)
    try:
        if ex.stream:
            await _relay_stream(ex, reply, send, watch, sent_at)
        else:
            payload = await _read_whole(reply)
            ex.upstream_time = time.perf_counter() - sent_at
            ex.status = 200
            watch.finish()
            await send_bytes(send, 200, payload, _response_headers(ex))
            _observe(ex)
    finally:
        await reply.aclose(abort=watch.disconnected)


async def _read_whole(reply: UpstreamReply) -> bytes:
    try:
        return await reply.read()
    except UpstreamFailure as failure:
        if failure.is_timeout:
            raise errors.gateway_timeout(failure.message) from None
        raise errors.bad_gateway(failure.message, code=f"upstream_{failure.kind}") from None


async def _relay_stream(ex: Exchange, reply: UpstreamReply, send: Send, watch: DisconnectWatch, sent_at: float) -> None:
    """Relay SSE events as they arrive; a broken upstream ends the stream with an error event."""
    ex.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [CT_SSE, NO_CACHE, *_response_headers(ex)]})
    relay = SSERelay()
    first_byte_at: float | None = None
    try:
        async for chunk in reply.chunks():
            out = relay.feed(chunk)
            if out:
                if first_byte_at is None:
                    first_byte_at = time.perf_counter()
                await send({"type": "http.response.body", "body": out, "more_body": True})
        tail = relay.finish()
    except UpstreamFailure as failure:
        UPSTREAM_FAILURES.labels(ex.upstream_label.split("/", 1)[0], failure.kind).inc()
        log.warning("request %s: %s", ex.request_id, failure.message)
        ex.status = 504 if failure.is_timeout else 502
        tail = relay.abort(failure.message, "timeout_error" if failure.is_timeout else "upstream_error")
    ex.upstream_time = time.perf_counter() - sent_at
    watch.finish()
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    _observe(ex, first_byte_at)
