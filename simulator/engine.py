"""The simulated upstream's protocol logic, free of any transport.

`Simulator.handle(body)` turns one chat/completions request body into a `SimReply`.  The same object
drives the HTTP server (`server.py`) and in-process use (a gateway adapter or a test), so both behave
identically.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from .cache import PrefixCache, prefix_chain
from .errors import RequestError, default_message, error_body
from .faults import Fault, FaultQueue
from .profiles import Profile
from .render import ChoicePlan, Plan, ToolCall, render_body, render_stream
from .request import ChatRequest, SimOptions, check_context, parse_request, parse_sim
from .text import AFTER_TOOLS, ANSWER, REASONING, Pool, approx_tokens, arguments_for, truncate_to_tokens

RECENT_REQUESTS = 256
CACHE_ENTRIES = 100_000
DEFAULT_TOOL_CALLS = 2
STALL_MID_AFTER = 2  # events (role chunk + first delta) before a stall_mid_s pause

JSON_HEADERS: list[tuple[str, str]] = [("content-type", "application/json")]
SSE_HEADERS: list[tuple[str, str]] = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


class SimulatedDisconnect(ConnectionResetError):
    """Raised by a stream iterator when a cut fault fires: abort the connection, do not end it."""


@dataclass
class SimStats:
    """Counters of one simulator; `in_flight`, `waiting` and `kv_tokens` are live gauges."""

    requests: int = 0  # bodies handled
    completed: int = 0  # successful replies fully produced (stream reached [DONE])
    cancelled: int = 0  # replies abandoned by the consumer (client disconnect) before the end
    aborted: int = 0  # connections dropped or streams cut by a fault
    errors: int = 0  # error replies (validation and injected statuses)
    faults_applied: int = 0  # requests a fault applied to
    in_flight: int = 0  # replies holding a concurrency slot (vllm:num_requests_running)
    waiting: int = 0  # replies queued for a slot (vllm:num_requests_waiting)
    kv_tokens: int = 0  # prompt + completion tokens of in-flight replies
    prompt_tokens: int = 0  # totals over planned replies (prefix-cache queries)
    cached_tokens: int = 0  # (prefix-cache hits)
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class SimReply:
    """One reply; see the module docstring for how a transport consumes it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None = None
    events: AsyncIterator[bytes] | None = None
    delay_s: float = 0.0
    drop: bool = False
    may_block: bool = False
    _waiter: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    async def wait(self) -> None:
        """Spend the reply's time (slot + TTFT + decode, or the injected stall) before sending.

        Idempotent: only the first call waits.  Stream replies spend their time inside `events`.
        """
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            await waiter()


class _Gate:
    """FIFO concurrency limit that reports running/waiting counts into SimStats.

    Not an asyncio.Semaphore: the simulator may be created outside any loop and used from several
    (pytest creates one per test), and handing a freed slot straight to the oldest waiter keeps the
    queue strictly FIFO, as vLLM's scheduler is.
    """

    def __init__(self, limit: int, stats: SimStats) -> None:
        self.limit = limit
        self.stats = stats
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, tokens: int) -> None:
        stats = self.stats
        if self.limit and (stats.in_flight >= self.limit or self._waiters):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            stats.waiting += 1
            try:
                await fut  # release() hands its slot over: in_flight stays counted for us
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release_slot()  # the slot arrived as we were cancelled: pass it on
                else:
                    self._waiters.remove(fut)
                raise
            finally:
                stats.waiting -= 1
        else:
            stats.in_flight += 1
        stats.kv_tokens += tokens

    def release(self, tokens: int) -> None:
        self.stats.kv_tokens -= tokens
        self._release_slot()

    def _release_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.stats.in_flight -= 1


class Simulator:
    """A simulated Kimi K2 Thinking upstream (Moonshot API or vLLM), transport-free."""

    def __init__(self, profile: Profile, *, seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
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
        self._gate = _Gate(profile.max_concurrency, self.stats)
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
            fault = sim.fault or (self.faults.take(req.get("model")) if self.faults else None)
            if fault is not None:
                self.stats.faults_applied += 1
                if fault.drop:
                    return self._drop(fault)
                if fault.status is not None:
                    return self._error(
                        fault.status,
                        fault.message or default_message(fault.status, fault.retry_after),
                        fault.error_type,
                        fault,
                    )
            return self._answer(parse_request(req, self.profile, sim), fault)
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.error_type, fault)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
            # input shapes the validators did not foresee must still get a 400, not crash a server
            return self._error(400, f"Invalid request: {type(exc).__name__}: {exc}", None, fault)

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

    def _answer(self, chat: ChatRequest, fault: Fault | None) -> SimReply:
        if not chat.stream and fault is not None and fault.cut_after_events is not None:
            return self._drop(fault)  # a non-stream body cannot be cut halfway: the connection just dies
        plan = self._plan(chat)
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
            spt = profile.seconds_per_token / max(1, len(plan.choices))
            gaps = _gaps(tokens, spt) if spt > 0 else None
            cut = fault.cut_after_events if fault is not None else None
            iterator = self._stream(events, gaps, hold, profile.ttft_s + stall, stall_mid, cut)
            return SimReply(status=200, headers=SSE_HEADERS, events=iterator, may_block=may_block)
        decode = profile.seconds_per_token * plan.completion_tokens / max(1, len(plan.choices))
        delay = profile.ttft_s + decode + stall + stall_mid
        body = render_body(plan, profile.dialect, profile.parsers)

        async def generate() -> None:
            await self._occupy(hold, delay)

        return SimReply(
            status=200, headers=JSON_HEADERS, body=body, delay_s=delay, may_block=may_block, _waiter=generate
        )

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

    # -- planning ------------------------------------------------------------------------------------

    def _plan(self, chat: ChatRequest) -> Plan:
        profile = self.profile
        dumps = orjson.dumps
        sort = orjson.OPT_SORT_KEYS
        elements = [dumps(m, option=sort) for m in chat.messages]
        if chat.tools:
            elements.insert(0, dumps(chat.tools, option=sort))
        hashes, cumulative = prefix_chain(chat.model, elements)
        prompt_tokens = cumulative[-1]
        budget = check_context(profile, prompt_tokens, chat.max_tokens)
        cached = self.cache.lookup_and_store(hashes, cumulative)
        self._counter += 1
        sim = chat.sim
        calls = self._tool_calls(chat, sim)
        last_role = chat.messages[-1].get("role")
        reasoning_n = (
            (sim.reasoning_chunks if sim.reasoning_chunks is not None else profile.reasoning_chunks)
            if chat.thinking
            else 0
        )
        content_n = 0 if calls else (sim.content_chunks if sim.content_chunks is not None else profile.content_chunks)
        pool = AFTER_TOOLS if last_role == "tool" else ANSWER
        choices = [_choice(reasoning_n, content_n, pool, calls, budget, self.seed + 5 * j) for j in range(chat.n)]
        return Plan(
            id=f"chatcmpl-sim{self._counter:010x}",
            created=int(time.time()),
            model=chat.model,
            choices=choices,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            include_usage=chat.include_usage,
            show_reasoning=chat.show_reasoning,
            skip_special_tokens=chat.skip_special_tokens,
        )

    def _tool_calls(self, chat: ChatRequest, sim: SimOptions) -> list[ToolCall]:
        """Which tools the simulated model calls.

        With tools and a user message last, the model calls the first min(2, len(tools)) tools (two
        tools: parallel calls); after tool results it answers in text.  ``sim.tool_calls`` overrides
        the count; tool_choice "none" prevents calls, "required"/named force at least one.
        """
        tools = chat.tools
        if not tools:
            return []
        if sim.tool_calls is not None:
            count = sim.tool_calls
        elif chat.forced_tool is not None:  # "required" or a named tool: at least one call
            count = 1 if chat.forced_tool else min(DEFAULT_TOOL_CALLS, len(tools))
        elif chat.tool_choice == "none" or not self._wants_tools(chat.messages):
            count = 0
        else:
            count = min(DEFAULT_TOOL_CALLS, len(tools))
        chosen = [t for t in tools if t["function"].get("name") == chat.forced_tool] if chat.forced_tool else tools
        prefix = "functions." if self._vllm else ""
        # K2 numbers its calls across the conversation (functions.NAME:IDX), so ids stay unique per loop
        start = sum(len(m.get("tool_calls") or ()) for m in chat.messages if m.get("role") == "assistant")
        calls = []
        for i in range(count):
            tool = chosen[i % len(chosen)]
            function = tool["function"]
            name = str(function.get("name"))
            kind = tool.get("type", "function")
            if kind == "builtin_function":
                args: dict[str, Any] = {
                    "search_result": {"search_id": f"sim-search-{self._counter}-{i}"},
                    "usage": {"total_tokens": 1024},
                }
            else:
                args = arguments_for(function.get("parameters"), i)
            arguments = orjson.dumps(args).decode()
            calls.append(
                ToolCall(
                    id=f"{prefix}{name}:{start + i}",
                    name=name,
                    arguments=arguments,
                    type=kind,
                    tokens=approx_tokens(name.encode()) + approx_tokens(arguments.encode()) + 2,
                )
            )
        return calls

    def _wants_tools(self, messages: list[dict[str, Any]]) -> bool:
        """A user message last starts a round of tool calls; tool results last continue the loop
        while fewer than the profile's ``tool_rounds`` rounds came back since the last user message."""
        last = messages[-1].get("role")
        if last == "user":
            return True
        if last != "tool":
            return False
        rounds = 0
        for msg in reversed(messages):
            role = msg.get("role")
            if role == "user":
                break
            if role == "assistant" and msg.get("tool_calls"):
                rounds += 1
        return rounds < self.profile.tool_rounds


def _fit(pieces: list[str], tokens: list[int], remaining: int) -> tuple[int, bool]:
    """Trim pieces in place to the output budget; return (remaining, was_cut)."""
    for i, count in enumerate(tokens):
        if count <= remaining:
            remaining -= count
            continue
        partial = truncate_to_tokens(pieces[i], remaining)
        del pieces[i:], tokens[i:]
        if partial:
            pieces.append(partial)
            tokens.append(remaining)
        return 0, True
    return remaining, False


def _choice(
    reasoning_n: int, content_n: int, pool: Pool, calls: list[ToolCall], budget: int, offset: int
) -> ChoicePlan:
    """Plan one choice within the output budget (reasoning counts against max_tokens, as on K2)."""
    reasoning, reasoning_tokens = REASONING.take(reasoning_n, offset) if reasoning_n else ([], [])
    remaining, cut = _fit(reasoning, reasoning_tokens, budget)
    choice = ChoicePlan(reasoning=reasoning, reasoning_tokens=reasoning_tokens)
    if cut:
        choice.finish_reason = "length"
    elif calls:
        need = sum(c.tokens for c in calls)
        if need > remaining:
            choice.finish_reason = "length"  # the calls did not fit: the turn ends without them
        else:
            choice.tool_calls = list(calls)
            choice.finish_reason = "tool_calls"
            remaining -= need
    else:
        content, content_tokens = pool.take(content_n, offset) if content_n else ([], [])
        remaining, cut = _fit(content, content_tokens, remaining)
        choice.content, choice.content_tokens = content, content_tokens
        choice.finish_reason = "length" if cut else "stop"
    choice.completion_tokens = budget - remaining
    return choice


def _gaps(tokens: list[int], seconds_per_token: float) -> list[float]:
    """Decode pause before each event; the first token-bearing event is covered by TTFT."""
    gaps = [count * seconds_per_token for count in tokens]
    for i, count in enumerate(tokens):
        if count:
            gaps[i] = 0.0
            break
    return gaps


def _sleeper(delay: float) -> Callable[[], Awaitable[None]]:
    async def sleep() -> None:
        await asyncio.sleep(delay)

    return sleep


def _lower_headers(headers: Headers | None) -> dict[str, str]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k).lower(): str(v) for k, v in items}
