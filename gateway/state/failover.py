"""What budgets and rate limits do while the shared store (Redis) does not answer.

Each concern has its own mode (``state.fail`` in the config):

* ``closed`` (default): a request that needs the store is refused with HTTP 503 ``state_unavailable``
  before anything is sent upstream, so no cap can be overrun.
* ``open``: the request is served and accounted in this process's memory; what was counted locally
  is written into the store once it answers again (reconciled), so the shared counters end up with
  every request.

Either way, settlements and token corrections never fail a request: when the store is down they
are queued and replayed (in concurrent batches) by a background task. A reservation whose call timed
out may still be carried out by a Redis that was only slow, so it is released (settled at zero) by a
replay too. A rate-limit hit cannot be taken back that way: a timed-out hit may be counted once
more, which the window forgets within two minutes. After a failure the store is not asked again for
``cooldown_s``, so an outage costs each request nothing rather than a timeout. The ledger does not
go through here: it never depends on the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Literal

from gateway.errors import GatewayError
from gateway.observability import STATE_UNAVAILABLE
from gateway.state.base import (
    BudgetState,
    Limit,
    RateCount,
    RateLimit,
    RateLimitState,
    Refusal,
    StateUnavailable,
)
from gateway.state.memory import MemoryBudgetState, MemoryRateLimitState

log = logging.getLogger("kimi_gateway.state")

FailMode = Literal["closed", "open"]
MAX_PENDING = 100_000
REPLAY_BATCH = 64


def unavailable(concern: str) -> GatewayError:
    return GatewayError(
        503,
        f"The gateway cannot check {concern} right now: its shared state store (Redis) is not answering, "
        f"and {concern} are configured to fail closed, so the request was not sent upstream. Retry shortly.",
        type="service_unavailable",
        code="state_unavailable",
        headers=[(b"retry-after", b"1")],
    )


class _Link:
    """Availability of the store as this process sees it, plus the replay queue for what it missed."""

    def __init__(self, concern: str, cooldown_s: float) -> None:
        self.concern = concern
        self.cooldown_s = cooldown_s
        self.down_until = 0.0
        self.down = False
        self._unavailable = STATE_UNAVAILABLE.labels(concern)
        self.pending: deque[Callable[[], Awaitable[None]]] = deque()
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def available(self) -> bool:
        if time.monotonic() >= self.down_until:
            return True
        self._unavailable.inc()
        return False

    def failed(self, exc: StateUnavailable) -> None:
        self._unavailable.inc()
        self.down_until = time.monotonic() + self.cooldown_s
        if not self.down:
            self.down = True
            log.warning("%s: shared state unavailable (%s)", self.concern, exc)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.warning("%s: shared state answers again", self.concern)

    def queue(self, replay: Callable[[], Awaitable[None]]) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                log.error("%s: %d updates for the shared state dropped (queue full)", self.concern, self.dropped)
        self.pending.append(replay)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        """Replay in batches of concurrent calls (the updates commute: settlements and once-only
        additions per request id, counter increments), keeping whatever failed for the next round."""
        done = 0
        while self.pending:
            await asyncio.sleep(max(0.05, self.down_until - time.monotonic()))
            while self.pending:
                batch = [self.pending.popleft() for _ in range(min(REPLAY_BATCH, len(self.pending)))]
                results = await asyncio.gather(*(replay() for replay in batch), return_exceptions=True)
                failed = [r for r, res in zip(batch, results, strict=True) if isinstance(res, StateUnavailable)]
                for res in results:
                    if isinstance(res, BaseException) and not isinstance(res, StateUnavailable):
                        log.error("%s: an update for the shared state failed and is dropped: %r", self.concern, res)
                done += len(batch) - len(failed)
                if failed:
                    self.pending.extendleft(reversed(failed))
                    error = next(r for r in results if isinstance(r, StateUnavailable))
                    self.failed(error)
                    break
        self.recovered()
        log.warning("%s: %d updates reconciled into the shared state", self.concern, done)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        while self.pending:  # one last bounded attempt
            try:
                await self.pending[0]()
            except Exception:
                log.warning("%s: %d updates could not reach the shared state", self.concern, len(self.pending))
                return
            self.pending.popleft()


class FailoverBudgetState(BudgetState):
    def __init__(self, shared: BudgetState, mode: FailMode, cooldown_s: float = 1.0) -> None:
        self.shared = shared
        self.local = MemoryBudgetState()
        self.mode = mode
        self.link = _Link("budgets", cooldown_s)
        self._local: dict[str, list[Limit]] = {}  # reservations held in memory during an outage

    async def reserve(self, request_id: str, limits: list[Limit], amount: int) -> Refusal | None:
        if self.link.available():
            try:
                refusal = await self.shared.reserve(request_id, limits, amount)
            except StateUnavailable as exc:
                self.link.failed(exc)
                if exc.maybe_ran:  # a timed-out script may still run once Redis wakes up: release it
                    self.link.queue(partial(self.shared.settle, request_id, 0))
            else:
                self.link.recovered()
                return refusal
        if self.mode == "closed":
            raise unavailable("budgets")
        refusal = await self.local.reserve(request_id, limits, amount)
        if refusal is None:
            self._local[request_id] = limits
        return refusal

    async def settle(self, request_id: str, actual: int) -> None:
        limits = self._local.pop(request_id, None)
        if limits is not None:
            await self.local.settle(request_id, actual)
            self.link.queue(partial(self.shared.add_spent_once, request_id, limits, actual))
            return
        await self._write(lambda: self.shared.settle(request_id, actual))

    async def used(self, key: str) -> int:
        if self.link.available():
            try:
                return await self.shared.used(key)
            except StateUnavailable as exc:
                self.link.failed(exc)
        if self.mode == "closed":
            raise unavailable("budgets")
        return await self.local.used(key)

    async def _write(self, write: Callable[[], Awaitable[None]]) -> None:
        """A write that must reach the shared state eventually: now, or replayed once it answers."""
        if self.link.available():
            try:
                await write()
                return
            except StateUnavailable as exc:
                self.link.failed(exc)
        self.link.queue(write)

    async def add_spent(self, key: str, amount: int, ttl_s: int) -> None:
        await self._write(lambda: self.shared.add_spent(key, amount, ttl_s))

    async def seed(self, key: str, amount: int, ttl_s: int) -> None:
        await self.local.add_spent(key, amount, ttl_s)  # what open mode starts from during an outage
        await self._write(lambda: self.shared.seed(key, amount, ttl_s))

    async def open_reservations(self) -> int:
        return await self.shared.open_reservations() + len(self._local)

    async def close(self) -> None:
        await self.link.close()
        await self.shared.close()


class FailoverRateLimitState(RateLimitState):
    def __init__(self, shared: RateLimitState, mode: FailMode, cooldown_s: float = 1.0) -> None:
        self.shared = shared
        self.local = MemoryRateLimitState()
        self.mode = mode
        self.link = _Link("rate limits", cooldown_s)

    async def hit(self, limits: list[RateLimit], now: float) -> tuple[bool, list[RateCount]]:
        if self.link.available():
            try:
                result = await self.shared.hit(limits, now)
            except StateUnavailable as exc:
                self.link.failed(exc)
            else:
                self.link.recovered()
                return result
        if self.mode == "closed":
            raise unavailable("rate limits")
        admitted, counts = await self.local.hit(limits, now)
        if admitted:
            for count in counts:
                lim = count.limit
                self.link.queue(partial(self.shared.adjust, lim.key, lim.window_s, count.window, lim.amount))
        return admitted, counts

    async def adjust(self, key: str, window_s: int, window: int, delta: int) -> None:
        if self.link.available():
            try:
                await self.shared.adjust(key, window_s, window, delta)
                return
            except StateUnavailable as exc:
                self.link.failed(exc)
        self.link.queue(lambda: self.shared.adjust(key, window_s, window, delta))

    async def close(self) -> None:
        await self.link.close()
        await self.shared.close()
