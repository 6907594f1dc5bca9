"""The simulated upstream's protocol logic, free of any transport.

`Simulator.handle(body)` turns one chat/completions request body into a `SimReply`.  The same object
drives the HTTP server (`server.py`) and in-process use (a gateway adapter or a test), so both behave
identically.  This module handles a request and spends its time; what the model says is planned in
`planning.py`, and the reply, its counters and the concurrency slots are in `reply.py`.

Concurrency accounting, and the contract for transports
-------------------------------------------------------
`handle` is synchronous and cheap: it validates, plans the answer and renders the bytes.  The time a
real upstream spends (queueing for a batch slot, prefill, decode) happens when the transport consumes
the reply, and the reply itself does the accounting:

* stream (``reply.events`` is set): the iterator takes a concurrency slot when first pulled (queueing
  when ``profile.max_concurrency`` is reached: ``stats.waiting``), sleeps TTFT and per-chunk decode time,
  and frees the slot just before it yields ``data: [DONE]`` (``stats.completed``).  Closed or cancelled
  before that, it counts ``stats.cancelled``.  Transports must iterate it under
  ``contextlib.aclosing`` so a client that goes away closes it promptly.  A ``cut_after_events`` fault
  makes it raise `SimulatedDisconnect` instead of finishing: the transport must then abort the
  connection, never end the response cleanly.
* everything else: ``await reply.wait()`` before sending.  For a successful non-stream reply it takes
  the slot for TTFT + decode time (``delay_s``), then counts ``completed``; cancelled while waiting it
  counts ``cancelled``.  For errors and drops it only sleeps the injected stall.  Then send
  ``status``/``headers``/``body``, or, when ``reply.drop`` is set, close the connection without a
  response.

``reply.may_block`` tells a transport whether consuming the reply can take time at all; when it is
False (the ``instant`` profile without stall faults) there is nothing to race against a disconnect.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson

from .cache import PrefixCache
from .errors import RequestError, default_message, error_body
from .faults import Fault, FaultQueue
from .garbage import HTML_PAGE, garbage_body, garbage_stream, garbage_type
from .keys import KeyQuotas
from .planning import plan_reply
from .profiles import Profile
from .render import render_body, render_stream
from .reply import Gate, SimReply, SimStats, SimulatedDisconnect
from .request import ChatRequest, parse_request, parse_sim
from .text import approx_tokens

__all__ = ["SimReply", "SimStats", "SimulatedDisconnect", "Simulator"]

RECENT_REQUESTS = 256
CACHE_ENTRIES = 100_000
STALL_MID_AFTER = 2  # events (role chunk + first delta) before a stall_mid_s pause

JSON_HEADERS: list[tuple[str, str]] = [("content-type", "application/json")]
SSE_HEADERS: list[tuple[str, str]] = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


class Simulator:
    """A simulated Kimi K2 Thinking upstream (Moonshot API or vLLM), transport-free."""

    def __init__(
        self,
        profile: Profile,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        request_log: str | os.PathLike[str] | None = None,
    ) -> None:
        self.profile = profile
        # the upstream's own account of what it answered, one JSON line per answer (see _log_answer)
        self._log_fd = (
            os.open(request_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if request_log is not None
            else -1
        )
        self.seed = seed
        self.clock = clock
        self.stats = SimStats()
        self.recent: collections.deque[bytes] = collections.deque(maxlen=RECENT_REQUESTS)
        self.recent_headers: collections.deque[dict[str, str]] = collections.deque(maxlen=RECENT_REQUESTS)
        self.faults = FaultQueue()
        self.cache = PrefixCache(
            ttl_s=profile.cache_ttl_s,
            min_tokens=profile.cache_min_tokens,
            block_tokens=profile.cache_block_tokens,
            max_entries=CACHE_ENTRIES,
            clock=clock,
        )
        # per API key: tier limits (429 beyond them), revocations, and the key's own prompt cache (a
        # provider's cache is scoped per account or project key)
        self.keys = KeyQuotas(clock)
        self._key_caches: dict[str, PrefixCache] = {}
        self._gate = Gate(profile.max_concurrency, self.stats)
        self._last_plan: Any = None
        self._counter = 0
        self._vllm = profile.dialect == "vllm"
        self._auth = frozenset(f"Bearer {key}" for key in profile.api_keys)

    # -- control -------------------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault for the next `fault.count` matching requests (-1: until cleared)."""
        self.faults.add(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def reset(self) -> None:
        """Forget counters, faults, the prefix cache and recorded requests.

        The live gauges (in_flight, waiting, kv_tokens) are kept: replies still running will release
        what they hold.
        """
        live = (self.stats.in_flight, self.stats.waiting, self.stats.kv_tokens)
        for name, value in SimStats().as_dict().items():
            setattr(self.stats, name, value)
        self.stats.in_flight, self.stats.waiting, self.stats.kv_tokens = live
        self.faults.clear()
        self.cache.clear()
        self._key_caches.clear()
        self.keys.reset()
        self.recent.clear()
        self.recent_headers.clear()

    # -- requests ------------------------------------------------------------------------------------

    def handle(self, body: bytes, *, headers: Headers | None = None) -> SimReply:
        """Answer one chat/completions request body.  Never raises: bad input gets an error reply.

        `headers` (optional) are recorded next to the body in `recent_headers` and checked against
        `profile.api_keys`.
        """
        self.stats.requests += 1
        hdrs = _lower_headers(headers)
        self.recent.append(body)
        self.recent_headers.append(hdrs)
        fault: Fault | None = None
        try:
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RequestError(400, "Invalid request: the body is not valid JSON") from None
            if not isinstance(req, dict):
                raise RequestError(400, "Invalid request: the body must be a JSON object")
            if self._auth and hdrs.get("authorization") not in self._auth:
                raise RequestError(401, "Invalid Authentication")
            sim = parse_sim(req.get("sim"))
            fault = sim.fault or (self.faults.take(req.get("model"), _bearer(hdrs)) if self.faults else None)
            if fault is not None:
                self.stats.faults_applied += 1
                if fault.drop:
                    return self._drop(fault)
                if fault.garbage == "html":
                    return SimReply(status=200, headers=[("content-type", "text/html")], body=HTML_PAGE)
                if fault.status is not None:
                    return self._error(
                        fault.status,
                        fault.message or default_message(fault.status, fault.retry_after),
                        fault.error_type,
                        fault,
                    )
            chat = parse_request(req, self.profile, sim)
            if not self.keys.active:
                reply = self._answer(chat, fault, self.cache)
            else:
                reply = self._answer_on_key(chat, fault, _bearer(hdrs), len(body))
            if self._log_fd >= 0 and self._last_plan is not None:
                self._log_answer(req, reply, fault)
            return reply
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.error_type, fault)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
            # input shapes the validators did not foresee must still get a 400, not crash a server
            return self._error(400, f"Invalid request: {type(exc).__name__}: {exc}", None, fault)

    def _log_answer(self, req: dict[str, Any], reply: SimReply, fault: Fault | None) -> None:
        """One line for an answer the simulator planned (and, as a real upstream would, bills): the
        request's ``user``, whether it streams, and the usage the answer reports. Written before the
        reply is sent, so a gateway killed mid-answer cannot make the line vanish; what a test
        reconciles a ledger against."""
        plan, self._last_plan = self._last_plan, None
        entry = {
            "n": self._counter,
            "user": req.get("user"),
            "model": req.get("model"),
            "stream": reply.events is not None,
            "prompt_tokens": plan.prompt_tokens,
            "cached_tokens": plan.cached_tokens,
            "completion_tokens": plan.completion_tokens,
            "fault": fault is not None,
        }
        os.write(self._log_fd, orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))

    def _error(self, status: int, message: str, error_type: str | None, fault: Fault | None) -> SimReply:
        self.stats.errors += 1
        headers = JSON_HEADERS
        if fault is not None and fault.retry_after is not None:
            headers = [*JSON_HEADERS, ("retry-after", f"{fault.retry_after:g}")]
        if status == 401 and self._vllm:
            body = b'{"error":"Unauthorized"}'  # vLLM's --api-key middleware answers this
        else:
            body = error_body(self.profile.dialect, status, message, error_type)
        stall = (fault.stall_s or 0.0) if fault is not None else 0.0
        return SimReply(
            status=status,
            headers=headers,
            body=body,
            delay_s=stall,
            may_block=stall > 0,
            _waiter=_sleeper(stall) if stall > 0 else None,
        )

    def _drop(self, fault: Fault) -> SimReply:
        self.stats.aborted += 1
        stall = fault.stall_s or 0.0
        return SimReply(
            status=0,
            headers=[],
            drop=True,
            delay_s=stall,
            may_block=stall > 0,
            _waiter=_sleeper(stall) if stall > 0 else None,
        )

    def _key_cache(self, key: str) -> PrefixCache:
        cache = self._key_caches.get(key)
        if cache is None:
            cache = self._key_caches[key] = PrefixCache(
                ttl_s=self.profile.cache_ttl_s,
                min_tokens=self.profile.cache_min_tokens,
                block_tokens=self.profile.cache_block_tokens,
                max_entries=CACHE_ENTRIES,
                clock=self.clock,
            )
        return cache

    def _answer_on_key(self, chat: ChatRequest, fault: Fault | None, key: str, size: int) -> SimReply:
        """Answer within the key's tier limits (a 429 or 401 beyond them), from the key's own cache."""
        tokens = approx_tokens(b" " * size) + (chat.max_tokens or self.profile.default_max_tokens)
        admission = self.keys.admit(key, tokens)
        if admission.status != 200:
            reply = self._error(admission.status, admission.message, None, None)
            reply.headers = [*reply.headers, *admission.headers]
            return reply
        try:
            reply = self._answer(chat, fault, self._key_cache(key))
        except BaseException:
            self.keys.release(key)
            raise
        reply.headers = [*reply.headers, *admission.headers]
        _release_when_done(reply, lambda: self.keys.release(key))
        return reply

    def _answer(self, chat: ChatRequest, fault: Fault | None, cache: PrefixCache) -> SimReply:
        if not chat.stream and fault is not None and fault.cut_after_events is not None:
            return self._drop(fault)  # a non-stream body cannot be cut halfway: the connection just dies
        # counted once planned: a request refused while planning (context too long) takes no id
        plan = plan_reply(chat, self.profile, cache, number=self._counter + 1, seed=self.seed)
        self._counter += 1
        self._last_plan = plan
        stats = self.stats
        stats.prompt_tokens += plan.prompt_tokens
        stats.cached_tokens += plan.cached_tokens
        stats.completion_tokens += plan.completion_tokens
        profile = self.profile
        hold = plan.prompt_tokens + plan.completion_tokens
        stall = (fault.stall_s or 0.0) if fault is not None else 0.0
        stall_mid = (fault.stall_mid_s or 0.0) if fault is not None else 0.0
        may_block = profile.timed or stall > 0 or stall_mid > 0
        if chat.stream:
            events, tokens = render_stream(plan, profile.dialect, profile.parsers)
            headers = SSE_HEADERS
            if fault is not None and fault.garbage is not None:
                events, tokens = garbage_stream(fault.garbage, events, tokens, fault.garbage_after_events)
                headers = [("content-type", garbage_type(fault.garbage, True)), ("cache-control", "no-cache")]
            spt = profile.seconds_per_token / max(1, len(plan.choices))
            gaps = _gaps(tokens, spt) if spt > 0 else None
            cut = fault.cut_after_events if fault is not None else None
            iterator = self._stream(events, gaps, hold, profile.ttft_s + stall, stall_mid, cut)
            return SimReply(status=200, headers=headers, events=iterator, may_block=may_block)
        decode = profile.seconds_per_token * plan.completion_tokens / max(1, len(plan.choices))
        delay = profile.ttft_s + decode + stall + stall_mid
        body = render_body(plan, profile.dialect, profile.parsers)
        headers = JSON_HEADERS
        if fault is not None and fault.garbage is not None:
            body = garbage_body(fault.garbage, body)
            headers = [("content-type", garbage_type(fault.garbage, False))]

        async def generate() -> None:
            await self._occupy(hold, delay)

        return SimReply(status=200, headers=headers, body=body, delay_s=delay, may_block=may_block, _waiter=generate)

    async def _occupy(self, hold: int, delay: float) -> None:
        """A non-stream reply's time on the "GPU": queue for a slot, prefill + decode, free it."""
        gate = self._gate
        acquired = False
        try:
            await gate.acquire(hold)
            acquired = True
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self.stats.cancelled += 1
            raise
        finally:
            if acquired:
                gate.release(hold)
        self.stats.completed += 1

    async def _stream(
        self,
        events: list[bytes],
        gaps: list[float] | None,
        hold: int,
        first_delay: float,
        stall_mid: float,
        cut: int | None,
    ) -> AsyncIterator[bytes]:
        """Yield the SSE events with the profile's timing; see the module docstring."""
        stats = self.stats
        gate = self._gate
        acquired = finished = cutting = False
        last = len(events) - 1
        try:
            await gate.acquire(hold)
            acquired = True
            if first_delay > 0:
                await asyncio.sleep(first_delay)
            if gaps is None and cut is None and not stall_mid:
                for i in range(last):  # the instant profile: no timing, no faults
                    yield events[i]
            else:
                loop = asyncio.get_running_loop()
                due = loop.time()
                for i in range(last + 1):
                    if i == cut:
                        cutting = True
                        raise SimulatedDisconnect(f"simulator: stream cut after {cut} events (injected fault)")
                    if i == last:
                        break
                    if stall_mid and i == STALL_MID_AFTER:
                        due += stall_mid
                    if gaps is not None:
                        due += gaps[i]
                    pause = due - loop.time()
                    if pause > 0:
                        await asyncio.sleep(pause)
                    yield events[i]
            # the answer is complete: account for it before [DONE] so a consumer that stops right
            # after [DONE] (without pulling StopAsyncIteration) still counts as completed
            finished = True
            acquired = False
            gate.release(hold)
            stats.completed += 1
            yield events[last]
        finally:
            if not finished:
                if acquired:
                    gate.release(hold)
                if cutting:
                    stats.aborted += 1
                else:
                    stats.cancelled += 1


def _gaps(tokens: list[int], seconds_per_token: float) -> list[float]:
    """Decode pause before each event; the first token-bearing event is covered by TTFT."""
    gaps = [count * seconds_per_token for count in tokens]
    for i, count in enumerate(tokens):
        if count:
            gaps[i] = 0.0
            break
    return gaps


def _release_when_done(reply: SimReply, release: Callable[[], None]) -> None:
    """Call ``release`` once the reply's time is spent: its stream ended (or was closed), its wait
    finished, or at once for a reply that takes no time."""
    events = reply.events
    if events is not None:

        async def released() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            finally:
                release()
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()

        reply.events = released()
        return
    waiter = reply._waiter
    if waiter is None:
        release()
        return

    async def wait() -> None:
        try:
            await waiter()
        finally:
            release()

    reply._waiter = wait


def _bearer(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def _sleeper(delay: float) -> Callable[[], Awaitable[None]]:
    async def sleep() -> None:
        await asyncio.sleep(delay)

    return sleep


def _lower_headers(headers: Headers | None) -> dict[str, str]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k).lower(): str(v) for k, v in items}
