"""The one place that orders the steps of a chat/completions request.

policy → candidate → price → shaping → budget reservation → upstream call → relay → settlement.
Each step is a small function in its own module; this file composes them and owns nothing else.
Stream and non-stream share the steps: a non-stream answer is relayed as one body, a stream as its
SSE events. Settlement runs exactly once on every path out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import orjson

from gateway import errors
from gateway.access_log import log_exchange
from gateway.asgi import DisconnectWatch, Send
from gateway.capture.record import capture_exchange
from gateway.errors import GatewayError
from gateway.exchange import Exchange, Runtime
from gateway.metering.tokens import requested_max_tokens, upper_bound_tokens
from gateway.observability import UPSTREAM_FAILURES, log
from gateway.policy.store import Candidate
from gateway.reasoning.inbound import prepare_reasoning
from gateway.relay import correct_rate, read_whole, relay_stream, relay_whole
from gateway.routing.budget_fit import prefer_affordable
from gateway.routing.expected import Option
from gateway.routing.metrics import FAILOVERS
from gateway.routing.router import RETIRED, Plan, remaining_fraction
from gateway.tools.inbound import prepare_tools
from gateway.transforms.envelope import add_envelope
from gateway.upstreams.base import UpstreamFailure, UpstreamReply
from gateway.upstreams.errors import log_text, upstream_error
from gateway.upstreams.shaping import shape


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


INVALID = "invalid_response"  # the failure kind of a 200 that is not an answer


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
        level = logging.WARNING if reply.status in (401, 403) or reply.status >= 500 else logging.INFO
        log.log(
            level, "request %s: %s answered %d: %s", ex.request_id, candidate.label, reply.status, log_text(payload)
        )
        if reply.status == 404 and error.code == "upstream_model_not_found":
            wait = rt.dead.add(candidate.label)
            log.warning(
                "upstream %s answered 404 for model %s (retired id?): candidate %s is skipped, probed again in %g s",
                candidate.upstream,
                candidate.upstream_model,
                candidate.label,
                wait,
            )
            raise CandidateFailed(error, RETIRED)  # the next candidate may serve it: nothing was sent yet
        if reply.status == 429 or reply.status >= 500:
            raise CandidateFailed(error, str(reply.status))
        raise error
    m.reached_upstream = True
    if ex.stream and reply.content_type and "event-stream" not in reply.content_type:
        await reply.aclose()
        raise _not_an_answer(ex, candidate, f"a {reply.content_type.split(';')[0]} body to a stream request")
    return reply


async def _whole(ex: Exchange, reply: UpstreamReply, candidate: Candidate, sent_at: float) -> bytes:
    """The non-stream answer, read before anything goes to the client (so a body that is no answer
    can still fail over); the reply is closed when it is not relayed."""
    try:
        payload = await read_whole(ex, reply, sent_at)
    except BaseException:  # a broken read or a client gone: drop the connection
        await reply.aclose(abort=True)
        raise
    if payload is None:
        await reply.aclose()
        raise _not_an_answer(ex, candidate, "a body that is not a JSON chat completion")
    return payload


def _not_an_answer(ex: Exchange, candidate: Candidate, what: str) -> CandidateFailed:
    """An upstream that said 200 and sent something else: never a success, and metered as an
    estimate (it may have generated, and billed, the answer it failed to send)."""
    UPSTREAM_FAILURES.labels(candidate.upstream, INVALID).inc()
    m = ex.metered
    m.outcome = "upstream_error"
    m.estimate_reason = f"the upstream answered 200 with {what}; it may have billed the prompt"
    message = f"Upstream '{candidate.upstream}' answered 200 with {what}."
    return CandidateFailed(errors.bad_gateway(message, code="upstream_invalid_response"), INVALID)


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


def _start_over(ex: Exchange, received: bytes) -> None:
    """The exchange as it was before the first attempt (the same dict: the meter holds it)."""
    ex.body.clear()
    ex.body.update(orjson.loads(received))
    ex.raw, ex.dirty = received, False
    if ex.stream:
        ask_for_stream_usage(ex)
    ex.transforms.clear()  # the next upstream gets its own transforms


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
        # a later candidate starts from the client's request as received: an attempt rewrites nested
        # values in place (reasoning into the messages, in its upstream's field; tool dialects), so
        # the body is parsed again from the bytes the front end received, only when it fails over
        received = ex.raw
        for n, option in enumerate(plan.options):
            if n:
                _start_over(ex, received)
            body = await _attempt(rt, ex, plan, option, first=n == 0)
            sent_at = time.perf_counter()
            rt.router.dispatched(option)
            try:
                reply = await _call(rt, ex, option.candidate, body)
                payload = None if ex.stream else await _whole(ex, reply, option.candidate, sent_at)
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
                if payload is None:
                    await relay_stream(rt, ex, reply, send, watch, sent_at, client_wants_usage)
                else:
                    await relay_whole(rt, ex, payload, send, watch)
            finally:
                await reply.aclose(abort=watch.disconnected)
            if m.outcome == "ok":
                done = time.perf_counter()
                ttft, gen = (first_at - sent_at, done - first_at) if ex.stream else (None, done - sent_at)
                await rt.router.served(ex.tenant, plan, option, ttft, gen, m.usage)
                rt.dead.served(option.label)  # a probe of a retired candidate that answered
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
        else:  # cancelled by the gateway itself: shutdown's grace period ran out mid-answer
            m.outcome = "cut"
            m.status = m.status or 503
            if m.usage is None:
                m.estimate_reason = "the gateway shut down before the upstream reported usage"
        raise
    finally:
        m.latency_ms = (time.perf_counter() - ex.started) * 1000
        await _clean_up(rt, ex)


async def _clean_up(rt: Runtime, ex: Exchange) -> None:
    """Settlement (budget, metrics, ledger row), capture, the access-log line and the rate-limit
    correction, each run even
    when another one fails: a failure is logged once, with the request id, and never replaces the
    answer the client already has (or the error it is getting)."""
    try:
        await rt.meter.settle(ex.metered)
    except Exception:
        log.exception("request %s: settlement failed", ex.request_id)
    capture_exchange(rt, ex)  # never raises
    log_exchange(ex)  # the access-log line, after settlement filled in cost and tokens; never raises
    try:
        await correct_rate(rt, ex)
    except Exception:
        log.exception("request %s: the rate-limit correction failed", ex.request_id)
