"""The answer back to the client: an upstream reply relayed whole or as SSE events, metered.

Before anything goes to the client, :func:`read_whole` (non-stream) and :func:`read_first` (the first
events of a stream) check that a 200 is an answer, so that one that is not can still fail over. Once
the relays start, nothing fails over (bytes may already have reached the client). Both read the
usage the upstream reported, apply the
tenant's transforms and the client-facing envelope, correct the rate-limit admission before the last
bytes leave (a client's next request is admitted against the real count) and observe the request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import errors
from gateway.asgi import CT_SSE, NO_CACHE, DisconnectWatch, Send, send_bytes
from gateway.exchange import Exchange, Runtime
from gateway.metering.journal import PROGRESS_EVERY_READS
from gateway.metering.money import usd_text
from gateway.metering.stream import StreamTap
from gateway.observability import UPSTREAM_FAILURES, log, series
from gateway.transforms.chain import StreamChain, apply_parsed
from gateway.transforms.envelope import body_envelope, stream_envelope, wants_normalized
from gateway.upstreams.base import UpstreamFailure, UpstreamReply
from gateway.upstreams.errors import log_text
from gateway.upstreams.sse import DONE, SSERelay, error_event
from gateway.upstreams.sse_check import first_invalid
from gateway.upstreams.usage import usage_of_body, usage_of_response

INVALID = "invalid_response"  # the failure kind, and the ledger outcome, of a 200 that is not an answer
_DONE_EVENT = b"data: [DONE]\n\n"
_FINISHED = (b'"finish_reason":"', b'"finish_reason": "')  # a non-null finish_reason, as upstreams spell it


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


async def correct_rate(rt: Runtime, ex: Exchange) -> None:
    """Replace the admitted token bound by the tokens used, once. The relays call it before the
    answer's last bytes, so that a client's next request (sent the moment this one ends) is admitted
    against the corrected count; the pipeline's ``finally`` calls it for requests that ended otherwise."""
    if ex.rate is None:
        return
    admission, ex.rate = ex.rate, None
    usage = ex.metered.usage
    await rt.limits.correct(admission, usage.prompt_tokens + usage.completion_tokens if usage is not None else 0)


Whole = tuple[bytes, dict[str, Any] | None]
"""A non-stream answer: its bytes, and the parsed body when the relay needs one (else None)."""


async def read_whole(ex: Exchange, reply: UpstreamReply, sent_at: float) -> Whole | None:
    """The whole non-stream answer and its usage, before anything goes to the client; ``None`` when
    it is not a chat completion at all (a proxy's HTML page, a body cut short, JSON of another
    shape): the pipeline then fails over or answers 502, and the row says the answer was not one. A
    read that breaks is the client's 502/504 (the upstream may have billed the prompt).

    A body the relay parses anyway (transforms, builtin tool fees, the normalized envelope: nearly
    every request) is parsed here, once, and handed on, so that a body that is not JSON is caught
    before the client gets it at no extra cost. One relayed as raw bytes is judged by its braces,
    its ``choices`` key and its usage, without a parse."""
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
    if payload[:1] != b"{" and payload.lstrip()[:1] != b"{":
        return None
    if b'"choices"' not in payload:  # JSON of another shape (a keep-alive, an error object sent as a 200)
        return None
    parsed: dict[str, Any] | None = None
    if ex.transforms or ex.builtin_tools or wants_normalized(ex.envelope):
        found = _loads(payload)
        if not isinstance(found, dict) or not isinstance(found.get("choices"), list):
            return None
        parsed = found
        m.usage = usage_of_response(parsed)
        if ex.builtin_tools:
            _count_builtin_calls(parsed, m.tool_calls)
    else:
        m.usage = usage_of_body(payload)  # usage is the last key of every provider's answer: no full parse
        if m.usage is None and not isinstance(_loads(payload), dict):
            return None
    if m.usage is None:
        m.estimate_reason = "the upstream reported no usage"
    return payload, parsed


async def relay_whole(rt: Runtime, ex: Exchange, whole: Whole, send: Send, watch: DisconnectWatch) -> None:
    """The answer :func:`read_whole` accepted, through the tenant's transforms and envelope, with
    its exact cost in a header."""
    m = ex.metered
    payload, parsed = whole
    if parsed is not None:
        if ex.transforms:
            payload = apply_parsed(ex.transforms, parsed)
        elif (envelope := body_envelope(ex.model, ex.envelope)) is not None:
            payload = envelope.whole_parsed(payload, parsed)
    ex.status = m.status = 200
    m.ttft_ms = (time.perf_counter() - ex.started) * 1000
    cost = await rt.meter.compute(m)
    headers = _response_headers(ex)
    headers.append((b"x-gateway-cost-usd", usd_text(cost.nanos).encode()))  # exact to the nanodollar
    watch.finish()
    m.latency_ms = (time.perf_counter() - ex.started) * 1000
    rt.meter.seal(m)  # the exact row is in the journal before the answer leaves
    await correct_rate(rt, ex)
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


class NotAnAnswer(Exception):
    """A 200 stream found to be no chat completion stream before anything reached the client."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(slots=True)
class Primed:
    """A stream whose first whole events were read and checked: the relay goes on from here."""

    relay: SSERelay
    first: bytes
    chunks: AsyncIterator[bytes]  # the one iterator over the reply's body: the rest of the stream


async def read_first(ex: Exchange, reply: UpstreamReply) -> Primed:
    """The stream's first whole events, checked before the client gets any byte: a stream that is no
    answer, or that breaks or ends before its first event, can still fail over. Raises
    :class:`NotAnAnswer` or :class:`UpstreamFailure`."""
    relay = SSERelay()
    chunks = aiter(reply.chunks())
    async for chunk in chunks:
        if not (block := relay.feed(chunk)):
            continue
        if (bad := first_invalid(block)) is not None:
            log.warning("request %s: the upstream's stream starts with %s: %s", ex.request_id, bad[1], log_text(block))
            raise NotAnAnswer(f"a stream with {bad[1]} before its first event")
        return Primed(relay, block, chunks)
    raise NotAnAnswer("a stream that ended before its first event")


def _finished(blocks: list[bytes]) -> bool:
    """Whether the relayed events include a finish_reason (only asked of a stream without [DONE])."""
    return any(mark in block for block in blocks for mark in _FINISHED)


async def relay_stream(
    rt: Runtime,
    ex: Exchange,
    primed: Primed,
    send: Send,
    watch: DisconnectWatch,
    sent_at: float,
    client_wants_usage: bool,
) -> None:
    """Relay SSE events as they arrive, each block checked before it leaves (:func:`first_invalid`,
    a few byte counts). Once bytes went out nothing fails over: a broken upstream, or one that sends
    what is no chat completion chunk or stops before its answer finished, ends the stream with an
    error event, which the Messages and Responses front ends turn into their own; the row says
    ``invalid_response`` for the latter, estimated from the tokens relayed so far and the prompt."""
    m = ex.metered
    ex.status = m.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [CT_SSE, NO_CACHE, *_response_headers(ex)]})
    relay = primed.relay
    tap = m.tap = StreamTap(client_wants_usage)
    chain = StreamChain(ex.transforms) if ex.transforms else None
    # relayed as bytes: the envelope edits only the bytes that need it
    envelope = stream_envelope(ex.model, ex.body, ex.envelope) if chain is None else None
    first_byte_at: float | None = None
    # the journal's progress marks: with the first upstream read relayed, then every
    # PROGRESS_EVERY_READS; events are counted only then, over the blocks the tap kept meanwhile
    reads = events = counted = 0
    next_mark = 1
    invalid: str | None = None  # what the upstream sent that is no part of a chat completion stream

    async def seal() -> None:
        """Usage, cost and the sealed row, before the client can see the stream end."""
        if m.row is not None:
            return
        m.usage = tap.usage
        if m.usage is None:
            if invalid is not None:
                m.estimate_reason = (
                    f"the upstream sent {invalid} mid-stream, before it reported usage; estimated from the "
                    "prompt and the tokens relayed so far, which it may bill"
                )
            elif m.outcome != "ok":
                m.estimate_reason = "the upstream stream broke before it reported usage"
            else:
                m.estimate_reason = "the upstream reported no usage"
        ex.upstream_time = time.perf_counter() - sent_at
        await rt.meter.compute(m)  # may estimate in a thread; a client leaving meanwhile is a cancel
        watch.finish()
        m.latency_ms = (time.perf_counter() - ex.started) * 1000
        rt.meter.seal(m)  # the exact row is in the journal before the stream's end leaves

    async def emit(out: bytes) -> None:
        nonlocal first_byte_at, reads, events, counted, next_mark
        if chain is not None and not (out := chain.feed(out)):
            return
        if envelope is not None:
            out = envelope.feed(out)
        if DONE in out[-32:]:  # a client stops reading at [DONE] (the last event): its last byte
            await seal()
        reads += 1
        # no mark for a stream sealed already (whole in one read): counting a long block is not free
        if reads >= next_mark and m.row is None:
            next_mark = reads + PROGRESS_EVERY_READS
            blocks = tap.blocks
            events += sum(block.count(b"data:") for block in blocks[counted:])
            counted = len(blocks)
            rt.meter.progress(m, events)
        if first_byte_at is None:
            first_byte_at = time.perf_counter()
            m.ttft_ms = (first_byte_at - ex.started) * 1000
        await send({"type": "http.response.body", "body": out, "more_body": True})

    try:
        if out := tap.process(primed.first):  # checked by read_first
            await emit(out)
        last = b""
        async for chunk in primed.chunks:
            block = relay.feed(chunk)
            if not block:
                continue
            if (bad := first_invalid(block)) is not None:
                last, invalid = block[: bad[0]], bad[1]  # the whole events before it still go out
                log.warning("request %s: the upstream's stream has %s: %s", ex.request_id, invalid, log_text(block))
                break
            # one write per upstream read (the tap finishes a usage tail before the block leaves): a
            # second send would cost a syscall and a TCP segment
            if out := tap.process(block):
                await emit(out)
        else:
            last = relay.finish()
            if last and (bad := first_invalid(last)) is not None:
                last, invalid = last[: bad[0]], bad[1]
            elif not relay.saw_done:
                if _finished([*tap.blocks, last]):
                    last += _DONE_EVENT  # the answer is whole; the client's SDK waits for the [DONE] left out
                else:
                    invalid = "a stream that ended before its answer was complete"
        tail = tap.process(last)
        if chain is not None:
            tail = chain.feed(tail) + chain.finish()
        elif envelope is not None:
            tail = envelope.feed(tail)
        if invalid is not None:
            assert ex.candidate is not None
            UPSTREAM_FAILURES.labels(ex.candidate.upstream, INVALID).inc()
            ex.status, m.outcome = 502, INVALID
            message = f"Upstream '{ex.candidate.upstream}' sent {invalid} in the middle of its answer."
            tail += error_event(message, "upstream_error", "upstream_invalid_response")
    except UpstreamFailure as failure:
        assert ex.candidate is not None  # a reply exists only once a candidate was called
        UPSTREAM_FAILURES.labels(ex.candidate.upstream, failure.kind).inc()
        log.warning("request %s: %s", ex.request_id, failure.message)
        ex.status = 504 if failure.is_timeout else 502
        m.outcome = "timeout" if failure.is_timeout else "cut"
        tail = relay.abort(failure.message, "timeout_error" if failure.is_timeout else "upstream_error")
        if chain is not None:
            tail = chain.finish() + tail
    await seal()
    await correct_rate(rt, ex)
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    _observe(ex, first_byte_at)
