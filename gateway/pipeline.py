"""The one place that orders the steps of a chat/completions request.

policy → candidate → price → shaping → budget reservation → upstream call → relay → settlement.
Each step is a small function in its own module; this file composes them and owns nothing else.
Stream and non-stream share the steps: a non-stream answer is relayed as one body, a stream as its
SSE events. Settlement runs exactly once on every path out.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import orjson

from gateway import errors
from gateway.asgi import CT_SSE, NO_CACHE, DisconnectWatch, Send, send_bytes
from gateway.capture.record import capture_exchange
from gateway.errors import GatewayError
from gateway.exchange import Exchange, Runtime
from gateway.metering.money import usd_text
from gateway.metering.stream import StreamTap
from gateway.metering.tokens import requested_max_tokens, upper_bound_tokens
from gateway.observability import UPSTREAM_FAILURES, log, series
from gateway.policy.store import Candidate
from gateway.reasoning.inbound import prepare_reasoning
from gateway.routing.budget_fit import prefer_affordable
from gateway.routing.expected import Option
from gateway.routing.metrics import DEAD_CANDIDATES, FAILOVERS
from gateway.routing.router import RETIRED, Plan, remaining_fraction
from gateway.tools.inbound import prepare_tools
from gateway.transforms.chain import StreamChain, apply_whole
from gateway.transforms.envelope import add_envelope, body_envelope, stream_envelope
from gateway.upstreams.base import UpstreamFailure, UpstreamReply
from gateway.upstreams.errors import upstream_error
from gateway.upstreams.shaping import shape
from gateway.upstreams.sse import SSERelay
from gateway.upstreams.usage import usage_of_body, usage_of_response


async def choose_candidate(rt: Runtime, ex: Exchange) -> Plan:
    """The ranked plan of candidates for this request (the strategy's order, dead ones and open
    breakers left out); raises when none is left."""
    route = ex.tenant.routes.get(ex.model)
    if route is None:
        raise errors.model_not_found(ex.model)
    fraction = await remaining_fraction(rt.meter.budgets, ex.tenant, ex.metered.app, ex.metered.ts)
    plan = await rt.router.plan(
        ex.tenant, route, ex.body, len(ex.raw), max_latency_ms=ex.max_latency_ms, budget_fraction=fraction
    )
    if plan.options:
        ex.route_reason = plan.reason
        return plan
    raise GatewayError(
        404,
        f"Every upstream for model '{ex.model}' answered that it does not serve it "
        f"({', '.join(c.label for c in route.candidates)}); the gateway's configuration needs updating.",
        type="invalid_request_error",
        param="model",
        code="model_unavailable",
    )


def ask_for_stream_usage(ex: Exchange) -> bool:
    """Make sure the upstream reports stream usage; returns whether the client asked for it itself."""
    options = ex.body.get("stream_options")
    wants = isinstance(options, dict) and options.get("include_usage") is True
    if not wants:
        ex.body["stream_options"] = (
            {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        )
        ex.dirty = True
    return wants


def shape_request(ex: Exchange, candidate: Candidate) -> bytes:
    """Bytes for the upstream: the client's own bytes unless something must change.

    Changes are made in place (the model name, stream usage, a budget's max_tokens), so key order
    and every unknown field stay as the client sent them; provider prompt caches see the same bytes
    turn after turn.
    """
    if ex.model != candidate.upstream_model:
        ex.body["model"] = candidate.upstream_model
        ex.dirty = True
    return orjson.dumps(ex.body) if ex.dirty else ex.raw


def _response_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-request-id", ex.request_id.encode()),
        (b"x-gateway-upstream", ex.upstream_label.encode()),
        (b"x-gateway-route-reason", ex.route_reason.encode()),
    ]
    return headers + ex.rate.headers if ex.rate is not None else headers


def _observe(ex: Exchange, first_byte_at: float | None = None) -> None:
    now = time.perf_counter()
    s = series(ex.tenant.name, ex.model, ex.upstream_label, ex.stream)
    s.status(ex.status).inc()
    s.duration.observe(now - ex.started)
    if first_byte_at is not None:
        s.ttft.observe(first_byte_at - ex.started)
    if ex.status < 500 and ex.upstream_time:
        s.overhead.observe(max(0.0, now - ex.started - ex.upstream_time))


async def _reserve(rt: Runtime, ex: Exchange) -> None:
    """Hold the worst-case cost on every budget that caps this request (429 when it does not fit)."""
    m = ex.metered
    budget = ex.tenant.budget
    if budget is None or m.price is None:
        if ex.open_row:  # a failover to an unpriced candidate: the open row must not keep the old amount
            rt.meter.opened(m, upper_bound_tokens(ex.raw))
        return
    asked = requested_max_tokens(ex.body)
    max_tokens = asked or ex.tenant.default_max_tokens
    bound = upper_bound_tokens(ex.raw)
    reservation = await rt.meter.budgets.reserve(
        request_id=ex.request_id,
        tenant=ex.tenant.name,
        budget=budget,
        app=m.app,
        price=m.price,
        prompt_tokens=bound,
        max_tokens=max_tokens,
        now=m.ts,
    )
    m.reservation = reservation
    if reservation is not None or ex.open_row:
        # one open-reservation row per request, upserted at every attempt: after a failover it names
        # the candidate and the amount actually held, so a crash is reconciled at what was at stake
        rt.meter.opened(m, bound)
        ex.open_row = True
    if reservation is None:
        return
    if reservation.downgraded or asked is None:
        # the upstream must not generate more than the reservation covers
        key = "max_completion_tokens" if "max_completion_tokens" in ex.body else "max_tokens"
        ex.body[key] = reservation.max_tokens
        ex.dirty = True
        if reservation.downgraded:
            ex.route_reason += f"; budget: max_tokens lowered to {reservation.max_tokens}"


class CandidateFailed(Exception):
    """A call that failed before any byte reached the client, in a way the next candidate may not."""

    def __init__(self, error: GatewayError, kind: str) -> None:
        self.error = error
        self.kind = kind


async def _call(rt: Runtime, ex: Exchange, candidate: Candidate, body: bytes) -> UpstreamReply:
    upstream = rt.upstreams[candidate.upstream]
    m = ex.metered
    try:
        reply = await upstream.send(body, stream=ex.stream)
    except UpstreamFailure as failure:
        UPSTREAM_FAILURES.labels(candidate.upstream, failure.kind).inc()
        if failure.is_timeout:
            m.outcome, m.reached_upstream = "timeout", True
            m.estimate_reason = "upstream timed out before usage arrived; the prompt may be billed"
            raise CandidateFailed(errors.gateway_timeout(failure.message), failure.kind) from None
        m.outcome = "upstream_error"
        raise CandidateFailed(
            errors.bad_gateway(failure.message, code=f"upstream_{failure.kind}"), failure.kind
        ) from None
    if reply.status >= 400:
        try:
            payload = await reply.read()
        except UpstreamFailure:
            payload = b""
        finally:
            await reply.aclose()
        UPSTREAM_FAILURES.labels(candidate.upstream, str(reply.status)).inc()
        m.outcome = "upstream_error"
        error = upstream_error(candidate, reply.status, payload, reply.retry_after)
        if reply.status == 404 and error.code == "upstream_model_not_found":
            rt.dead.add(candidate.label)
            DEAD_CANDIDATES.labels(candidate.label).inc()
            log.warning(
                "upstream %s answered 404 for model %s (retired id?): candidate %s is skipped until the "
                "configuration changes",
                candidate.upstream,
                candidate.upstream_model,
                candidate.label,
            )
            raise CandidateFailed(error, RETIRED)  # the next candidate may serve it: nothing was sent yet
        if reply.status == 429 or reply.status >= 500:
            raise CandidateFailed(error, str(reply.status))
        raise error
    m.reached_upstream = True
    return reply


async def _attempt(rt: Runtime, ex: Exchange, plan: Plan, option: Option, first: bool) -> bytes:
    """Point the request at ``option``: price, shaping, budget reservation; returns the bytes to send."""
    candidate = option.candidate
    m = ex.metered
    ex.candidate = candidate
    m.upstream, m.upstream_model, m.label = candidate.upstream, candidate.upstream_model, candidate.label
    ex.route_reason = plan.reason_for(option)
    m.price = rt.meter.price(candidate.label, m.ts)
    m.outcome, m.reached_upstream, m.estimate_reason = "ok", False, None
    prepare_tools(ex, rt.upstreams[candidate.upstream])  # dialects in; tool-call repair out
    await prepare_reasoning(rt, ex)  # reasoning back into tool-call turns, in this upstream's field
    add_envelope(ex.transforms, ex.model, ex.envelope)  # last: the client-facing envelope
    rules = rt.router.traits_of(candidate.upstream).shaping.get(candidate.model)
    if rules is not None and shape(ex.body, rules, ex.tenant.default_max_tokens):
        ex.dirty = True
    if not first and m.reservation is not None:  # the next candidate has its own price: reserve again
        await rt.meter.budgets.settle(m.reservation, Decimal(0))
        m.reservation = None
    await _reserve(rt, ex)
    m.route_reason = ex.route_reason
    return shape_request(ex, candidate)


async def chat(rt: Runtime, ex: Exchange, send: Send, watch: DisconnectWatch) -> None:
    """Serve one chat/completions request end to end; raises GatewayError before any byte is sent.

    The plan is tried in order: a candidate that fails before answering (connect error, 5xx, 429,
    first-byte timeout, a 404 for a retired model id) hands the request to the next one; nothing has
    reached the client yet. The last candidate's failure is the client's answer.
    """
    m = ex.metered
    try:
        plan = await choose_candidate(rt, ex)
        if ex.tenant.budget is not None and len(plan.options) > 1:
            asked = requested_max_tokens(ex.body) or ex.tenant.default_max_tokens
            bound = upper_bound_tokens(ex.raw)
            await prefer_affordable(rt.meter.budgets, rt.meter.prices, ex.tenant, m.app, plan, bound, asked, m.ts)
        client_wants_usage = ask_for_stream_usage(ex) if ex.stream else False
        if ex.tenant.rate_limits is not None:  # before the budget: a refused request reserves nothing
            bound = upper_bound_tokens(ex.raw) + (requested_max_tokens(ex.body) or ex.tenant.default_max_tokens)
            ex.rate = await rt.limits.admit(ex.tenant.name, ex.tenant.rate_limits, ex.key_id, bound)
        # a later candidate starts from the body as it was before the first one's shaping
        original = list(ex.body.items()) if len(plan.options) > 1 else None
        for n, option in enumerate(plan.options):
            if n and original is not None:
                ex.body.clear()
                ex.body.update(original)
                ex.transforms.clear()  # the next upstream gets its own transforms
            body = await _attempt(rt, ex, plan, option, first=n == 0)
            sent_at = time.perf_counter()
            rt.router.dispatched(option)
            try:
                reply = await _call(rt, ex, option.candidate, body)
            except CandidateFailed as failed:
                if failed.kind != RETIRED:  # a retired id is dead already; it says nothing about health
                    rt.router.failed(option, failed.kind)
                plan.failed[option.label] = failed.kind
                if n + 1 == len(plan.options):
                    raise failed.error from None
                FAILOVERS.labels(option.label, failed.kind).inc()
                log.info(
                    "request %s: %s failed (%s); trying the next candidate", ex.request_id, option.label, failed.kind
                )
                continue
            first_at = time.perf_counter()
            try:
                if ex.stream:
                    await _relay_stream(rt, ex, reply, send, watch, sent_at, client_wants_usage)
                else:
                    await _relay_whole(rt, ex, reply, send, watch, sent_at)
            finally:
                await reply.aclose(abort=watch.disconnected)
            if m.outcome == "ok":
                done = time.perf_counter()
                ttft, gen = (first_at - sent_at, done - first_at) if ex.stream else (None, done - sent_at)
                await rt.router.served(ex.tenant, plan, option, ttft, gen, m.usage)
            return
    except GatewayError as error:
        m.status = error.status
        if m.outcome == "ok":
            m.outcome = "rejected"
        raise
    except asyncio.CancelledError:
        if watch.disconnected:
            m.status, m.outcome = 499, "client_cancelled"
            if m.usage is None:
                m.estimate_reason = "client disconnected before the upstream reported usage"
        raise
    finally:
        m.latency_ms = (time.perf_counter() - ex.started) * 1000
        await rt.meter.settle(m)
        capture_exchange(rt, ex)
        await _correct_rate(rt, ex)


async def _correct_rate(rt: Runtime, ex: Exchange) -> None:
    """Replace the admitted token bound by the tokens used, once. The relays call it before the
    answer's last bytes, so that a client's next request (sent the moment this one ends) is admitted
    against the corrected count; the pipeline's ``finally`` calls it for requests that ended otherwise."""
    if ex.rate is None:
        return
    admission, ex.rate = ex.rate, None
    usage = ex.metered.usage
    await rt.limits.correct(admission, usage.prompt_tokens + usage.completion_tokens if usage is not None else 0)


async def _relay_whole(
    rt: Runtime, ex: Exchange, reply: UpstreamReply, send: Send, watch: DisconnectWatch, sent_at: float
) -> None:
    m = ex.metered
    try:
        payload = await reply.read()
    except UpstreamFailure as failure:
        m.estimate_reason = f"{failure.message}; the upstream may have billed the prompt"
        if failure.is_timeout:
            m.outcome = "timeout"
            raise errors.gateway_timeout(failure.message) from None
        m.outcome = "cut"
        raise errors.bad_gateway(failure.message, code=f"upstream_{failure.kind}") from None
    ex.upstream_time = time.perf_counter() - sent_at
    if ex.builtin_tools:
        parsed = _loads(payload)
        if isinstance(parsed, dict):
            m.usage = usage_of_response(parsed)
            _count_builtin_calls(parsed, m.tool_calls)
    else:
        m.usage = usage_of_body(payload)
    if m.usage is None:
        m.estimate_reason = "the upstream reported no usage"
    if ex.transforms:
        payload = apply_whole(ex.transforms, payload)
    elif (envelope := body_envelope(ex.model, ex.envelope)) is not None:
        payload = envelope.whole(payload)
    ex.status = m.status = 200
    m.ttft_ms = (time.perf_counter() - ex.started) * 1000
    cost = await rt.meter.compute(m)
    headers = _response_headers(ex)
    headers.append((b"x-gateway-cost-usd", usd_text(cost.nanos).encode()))  # exact to the nanodollar
    watch.finish()
    await _correct_rate(rt, ex)
    await send_bytes(send, 200, payload, headers)
    _observe(ex)


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _count_builtin_calls(parsed: dict[str, Any], into: dict[str, int]) -> None:
    """Per-call tool fees (Moonshot's ``$web_search``) are billed for builtin calls in the answer."""
    for choice in parsed.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls or ():
            name = (call.get("function") or {}).get("name") if isinstance(call, dict) else None
            if isinstance(name, str) and name.startswith("$"):
                into[name] = into.get(name, 0) + 1


async def _relay_stream(
    rt: Runtime,
    ex: Exchange,
    reply: UpstreamReply,
    send: Send,
    watch: DisconnectWatch,
    sent_at: float,
    client_wants_usage: bool,
) -> None:
    """Relay SSE events as they arrive; a broken upstream ends the stream with an error event."""
    m = ex.metered
    ex.status = m.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [CT_SSE, NO_CACHE, *_response_headers(ex)]})
    relay = SSERelay()
    tap = m.tap = StreamTap(client_wants_usage)
    chain = StreamChain(ex.transforms) if ex.transforms else None
    # relayed as bytes: the envelope edits only the bytes that need it
    envelope = stream_envelope(ex.model, ex.body, ex.envelope) if chain is None else None
    first_byte_at: float | None = None

    async def emit(out: bytes) -> None:
        nonlocal first_byte_at
        if chain is not None and not (out := chain.feed(out)):
            return
        if envelope is not None:
            out = envelope.feed(out)
        if first_byte_at is None:
            first_byte_at = time.perf_counter()
            m.ttft_ms = (first_byte_at - ex.started) * 1000
        await send({"type": "http.response.body", "body": out, "more_body": True})

    try:
        async for chunk in reply.chunks():
            block = relay.feed(chunk)
            if not block:
                continue
            # one write per upstream read (the tap finishes a usage tail before the block leaves): a
            # second send would cost a syscall and a TCP segment
            if out := tap.process(block):
                await emit(out)
        tail = tap.process(relay.finish())
        if chain is not None:
            tail = chain.feed(tail) + chain.finish()
        elif envelope is not None:
            tail = envelope.feed(tail)
        if not relay.saw_done:
            m.outcome = "cut"
    except UpstreamFailure as failure:
        assert ex.candidate is not None  # a reply exists only once a candidate was called
        UPSTREAM_FAILURES.labels(ex.candidate.upstream, failure.kind).inc()
        log.warning("request %s: %s", ex.request_id, failure.message)
        ex.status = 504 if failure.is_timeout else 502
        m.outcome = "timeout" if failure.is_timeout else "cut"
        tail = relay.abort(failure.message, "timeout_error" if failure.is_timeout else "upstream_error")
        if chain is not None:
            tail = chain.finish() + tail
    m.usage = tap.usage
    if m.usage is None:
        m.estimate_reason = (
            "the upstream stream broke before it reported usage"
            if m.outcome != "ok"
            else "the upstream reported no usage"
        )
    ex.upstream_time = time.perf_counter() - sent_at
    watch.finish()
    await _correct_rate(rt, ex)
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    _observe(ex, first_byte_at)
