"""Where capture rows live, and the writer that keeps database time off the request path.

Capture is diagnostic, not money: the request path only appends to a bounded queue; a background
task writes batches. When the database is down the queue fills up to ``max_backlog`` rows and older
rows are dropped (counted and logged) instead of growing memory, and a row that cannot be written
after a few retries is dropped the same way. Retention is enforced by deleting expired rows when the
store opens and then every ``purge_interval_s`` (daily by default).

The backends (:mod:`gateway.capture.sqlite`, :mod:`gateway.capture.postgres`) provide the SQL, and
:mod:`gateway.capture.factory` picks one by URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("gateway.capture")

DAY_S = 86400.0


@dataclass(slots=True)
class CaptureRow:
    request_id: str
    ts: float  # unix seconds
    expires_at: float  # unix seconds: the row is deleted after this
    tenant: str
    mode: str  # metadata | full
    record: dict[str, Any]  # already redacted

    def record_json(self) -> str:
        return orjson.dumps(self.record, default=str).decode()


class CaptureStore(ABC):
    def __init__(
        self,
        *,
        batch_size: int = 200,
        max_delay: float = 0.2,
        max_backlog: int = 10_000,
        purge_interval_s: float = DAY_S,
        retries: int = 5,
    ) -> None:
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.purge_interval_s = purge_interval_s
        self.retries = retries
        self._queue: deque[CaptureRow] = deque(maxlen=max_backlog)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0
        self.written = 0

    # ---- what a backend provides

    @property
    @abstractmethod
    def where(self) -> str: ...

    @abstractmethod
    async def _connect(self) -> None:
        """Connect and create the table when missing."""

    @abstractmethod
    async def _disconnect(self) -> None: ...

    @abstractmethod
    async def _write(self, rows: list[CaptureRow]) -> None:
        """Insert (or replace) rows in one transaction."""

    @abstractmethod
    async def get(self, request_id: str) -> CaptureRow | None: ...

    @abstractmethod
    async def _purge(self, now: float) -> int:
        """Delete rows whose ``expires_at`` is before ``now``; the number deleted."""

    # ---- life cycle

    async def open(self) -> None:
        await self._connect()
        await self.purge()
        self._task = asyncio.create_task(self._run(), name=f"capture-writer {self.where}")
        self._purger = asyncio.create_task(self._purge_daily(), name=f"capture-retention {self.where}")

    async def close(self) -> None:
        self._closing = True
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, 10)
            except TimeoutError:
                log.error("capture: %d rows not written at shutdown (%s unreachable)", len(self._queue), self.where)
        await self._disconnect()

    async def purge(self, now: float | None = None) -> int:
        """Enforce retention now; returns how many rows were deleted."""
        deleted = await self._purge(time.time() if now is None else now)
        if deleted:
            log.info("capture: deleted %d rows past their retention from %s", deleted, self.where)
        return deleted

    async def _purge_daily(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval_s)
            try:
                await self.purge()
            except Exception:
                log.exception("capture: retention purge failed; retrying at the next interval")

    # ---- the request path

    def record(self, row: CaptureRow) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("capture: backlog full (%d rows); dropping the oldest", self._queue.maxlen)
        self._queue.append(row)
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Return when everything recorded so far is written (or dropped)."""
        self._wake.set()
        await self._idle.wait()

    # ---- the writer

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                self._idle.set()
                if self._closing:
                    return
                continue
            if not self._closing and len(self._queue) < self.batch_size:
                await asyncio.sleep(self.max_delay)
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                await self._store(batch)
            self._idle.set()
            if self._closing:
                return

    async def _store(self, batch: list[CaptureRow]) -> None:
        delay = 0.1
        for attempt in range(self.retries):
            try:
                await self._write(batch)
                self.written += len(batch)
                return
            except Exception as exc:
                if attempt == self.retries - 1:
                    self.dropped += len(batch)
                    log.error("capture: dropping %d rows, %s refused them: %r", len(batch), self.where, exc)
                    return
                await asyncio.sleep(delay)
                delay *= 2
