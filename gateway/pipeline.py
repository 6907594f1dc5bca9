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
from gateway.relay import (
    INVALID,
    NotAnAnswer,
    Primed,
    Whole,
    correct_rate,
    read_first,
    read_whole,
    relay_stream,
    relay_whole,
)
from gateway.routing.budget_fit import prefer_affordable
from gateway.routing.expected import Option
from gateway.routing.keys import NoKey, Pool, held_by_key, key_tokens
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


KEYS_EXHAUSTED = "keys_exhausted"  # no key of the upstream's pool had room: says nothing about its health
_KEY_REFUSALS = ("429", "401", "403")  # answers about one pool key: the next key of the pool may serve


class CandidateFailed(Exception):
    """A call that failed before any byte reached the client, in a way the next candidate may not."""

    def __init__(self, error: GatewayError, kind: str, retry_after: str | None = None) -> None:
        self.error = error
        self.kind = kind
        self.retry_after = retry_after


async def _call(rt: Runtime, ex: Exchange, candidate: Candidate, body: bytes, key: str | None = None) -> UpstreamReply:
    upstream = rt.upstreams[candidate.upstream]
    m = ex.metered
    try:
        reply = await upstream.send(body, stream=ex.stream, key=key)
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
        if reply.status == 429 or reply.status >= 500 or (key is not None and reply.status in (401, 403)):
            raise CandidateFailed(error, str(reply.status), reply.retry_after)
        raise error
    m.reached_upstream = True
    kind = reply.content_type
    if kind and ("event-stream" not in kind if ex.stream else "json" not in kind):
        await reply.aclose()
        asked = "a stream" if ex.stream else "a JSON"
        raise _not_an_answer(ex, candidate, f"a {kind.split(';')[0].strip()} body to {asked} request")
    return reply


async def _whole(ex: Exchange, reply: UpstreamReply, candidate: Candidate, sent_at: float) -> Whole:
    """The non-stream answer, read before anything goes to the client (so a body that is no answer
    can still fail over); the reply is closed when it is not relayed."""
    try:
        whole = await read_whole(ex, reply, sent_at)
    except BaseException:  # a broken read or a client gone: drop the connection
        await reply.aclose(abort=True)
        raise
    if whole is None:
        await reply.aclose()
        raise _not_an_answer(ex, candidate, "a body that is not a JSON chat completion")
    return whole


async def _first(ex: Exchange, reply: UpstreamReply, candidate: Candidate) -> Primed:
    """The stream's first events, read and checked before anything goes to the client, so a stream
    that is no answer, or breaks before its first event, can still fail over; the reply is closed
    when it is not relayed."""
    try:
        return await read_first(ex, reply)
    except NotAnAnswer as failed:
        await reply.aclose(abort=True)
        raise _not_an_answer(ex, candidate, failed.what) from None
    except UpstreamFailure as failure:
        await reply.aclose(abort=True)
        UPSTREAM_FAILURES.labels(candidate.upstream, failure.kind).inc()
        m = ex.metered
        m.estimate_reason = f"{failure.message} before the first event; the upstream may have billed the prompt"
        if failure.is_timeout:
            m.outcome = "timeout"
            raise CandidateFailed(errors.gateway_timeout(failure.message), failure.kind) from None
        m.outcome = "cut"
        raise CandidateFailed(
            errors.bad_gateway(failure.message, code=f"upstream_{failure.kind}"), failure.kind
        ) from None
    except BaseException:  # a client gone: drop the connection
        await reply.aclose(abort=True)
        raise


async def _call_pooled(rt: Runtime, ex: Exchange, plan: Plan, option: Option, pool: Pool, body: bytes) -> UpstreamReply:
    """Send over a key of the upstream's pool: one that fits its quota (the one holding this
    conversation's prefix first); a 429 or a refused key moves the request to the pool's next key,
    and only a pool with no key left fails the candidate (``KEYS_EXHAUSTED``: a 429 if it is the last)."""
    keys = rt.router.keys
    assert keys is not None
    m = ex.metered
    held = held_by_key(plan.held, option.label)
    max_tokens = requested_max_tokens(ex.body) or ex.tenant.default_max_tokens
    tokens = upper_bound_tokens(ex.raw) + max_tokens
    per_key = key_tokens(len(ex.raw), max_tokens, held, held_by_key(plan.held_bytes, option.label))
    base = ex.route_reason
    notes: list[str] = []
    failed: set[str] = set()
    statuses: set[int] = set()
    while True:
        lease_id = f"{ex.request_id}:{option.index}:{len(failed)}"
        lease = await keys.take(pool, held, tokens, lease_id, frozenset(failed), max_tokens, per_key)
        if isinstance(lease, NoKey):
            ex.route_reason = m.route_reason = base + "".join(f"; {n}" for n in notes) + f"; {lease.reason}"
            if lease.revoked or (statuses and statuses <= {401, 403} and len(failed) == len(pool.keys)):
                # every key refused: the operator must fix the pool (the same answer as one bad key)
                error = upstream_error(option.candidate, 401, b"", None)
                raise CandidateFailed(error, KEYS_EXHAUSTED)
            raise CandidateFailed(_no_key_error(option.candidate, lease), KEYS_EXHAUSTED)
        ex.key_lease, option.key, option.held_tokens = lease, lease.key.label, lease.held
        m.upstream_key = lease.key.label
        ex.route_reason = m.route_reason = base + "".join(f"; {n}" for n in notes) + f"; {lease.reason}"
        try:
            reply = await _call(rt, ex, option.candidate, body, lease.key.label)
        except CandidateFailed as failure:
            if failure.kind not in _KEY_REFUSALS:
                raise
            statuses.add(int(failure.kind))
            notes.append(await keys.refused(lease, int(failure.kind), failure.retry_after))
            await _release_key(rt, ex)
            failed.add(lease.key.label)
            continue
        await keys.observed(lease, reply.rate)
        return reply


def _no_key_error(candidate: Candidate, no_key: NoKey) -> GatewayError:
    wait = no_key.wait_s
    headers = [(b"retry-after", str(max(1, int(wait + 0.999))).encode())] if wait is not None else []
    return GatewayError(
        429,
        f"upstream '{candidate.upstream}' has no API key with room for this request now ({no_key.reason}).",
        type="rate_limit_error",
        code="upstream_keys_exhausted",
        headers=headers,
    )


async def _release_key(rt: Runtime, ex: Exchange) -> None:
    """Free the pool key the request holds (its in-flight slot), once."""
    lease, ex.key_lease = ex.key_lease, None
    if lease is not None and rt.router.keys is not None:
        await rt.router.keys.release(lease, ex.metered.usage)


def _not_an_answer(ex: Exchange, candidate: Candidate, what: str) -> CandidateFailed:
    """An upstream that said 200 and sent something else: never a success, and metered as an
    estimate (it may have generated, and billed, the answer it failed to send)."""
    UPSTREAM_FAILURES.labels(candidate.upstream, INVALID).inc()
    m = ex.metered
    m.outcome = INVALID
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
    m.upstream_key = None
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
    first-byte timeout, a 404 for a retired model id, a 200 that is no answer, a stream that breaks or
    ends before its first event) hands the request to the next one; nothing has reached the client
    yet. The last candidate's failure is the client's answer.
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
            rt.meter.started(m, len(received))  # the crash record, before anything may be billed
            sent_at = time.perf_counter()
            rt.router.dispatched(option)
            pool = rt.router.keys.pool(option.candidate.upstream) if rt.router.keys is not None else None
            try:
                if pool is None:
                    reply = await _call(rt, ex, option.candidate, body)
                else:
                    reply = await _call_pooled(rt, ex, plan, option, pool, body)
                if ex.stream:
                    primed, whole = await _first(ex, reply, option.candidate), None
                else:
                    primed, whole = None, await _whole(ex, reply, option.candidate, sent_at)
            except CandidateFailed as failed:
                if ex.key_lease is not None:
                    await _release_key(rt, ex)
                # a retired id is dead already, and a pool out of quota is busy: neither says anything
                # about the upstream's health
                if failed.kind not in (RETIRED, KEYS_EXHAUSTED):
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
                if primed is not None:
                    await relay_stream(rt, ex, primed, send, watch, sent_at, client_wants_usage)
                else:
                    assert whole is not None
                    await relay_whole(rt, ex, whole, send, watch)
            finally:
                await reply.aclose(abort=watch.disconnected)
            if m.outcome == "ok":
                done = time.perf_counter()
                ttft, gen = (first_at - sent_at, done - first_at) if ex.stream else (None, done - sent_at)
                await rt.router.served(ex.tenant, plan, option, ttft, gen, m.usage)
                rt.dead.served(option.label)  # a probe of a retired candidate that answered
            elif m.outcome == INVALID:  # garbage mid-stream: the candidate's health hears of it
                rt.router.failed(option, INVALID)
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
        if ex.key_lease is not None:
            await _release_key(rt, ex)
    except Exception:
        log.exception("request %s: releasing the upstream key failed", ex.request_id)
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
