"""What one request turns into, and the concurrency slots replies hold while they take time.

Split from the engine so that a transport (the HTTP server, the gateway's in-process adapter) can
see the reply contract and the counters it reads without the request handling and planning behind
them: `SimReply` is what `Simulator.handle` returns (the engine's docstring says how a transport
consumes it), `SimStats` the counters `/metrics` and `/_sim/stats` show, `Gate` the FIFO slots that
make `waiting` and `in_flight` real.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field


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


class Gate:
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
