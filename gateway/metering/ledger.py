"""The spend ledger: one row per request, written in batches off the request path.

Why it is shaped this way:

* The request path must never wait on a database. :meth:`Ledger.record` and
  :meth:`Ledger.reservation_opened` only append to an in-memory deque; a background task drains it in
  batches (up to ``batch_size`` entries, or whatever arrived within ``max_delay``) and writes each batch
  in one transaction.
* Money is never dropped. The deque is unbounded: past ``backlog_warn`` entries the ledger logs a
  warning (and :attr:`Ledger.backlog` is there for a gauge) but keeps everything. A single deque, not a
  bounded queue plus an overflow list, because entries must be written in the order they were made (a
  reservation before the row that settles it) and one FIFO is the simplest thing that guarantees it.
  A failing database is retried with backoff; an entry the database refuses as *data* (the only kind of
  loss possible) is logged in full, as JSON, at ERROR and counted in :attr:`Ledger.rejected`.
* :meth:`Ledger.close` drains and writes everything before disconnecting, so a graceful shutdown loses
  nothing; if the database stays unreachable past the timeout, the unwritten entries go to the log.
* Open reservations are persisted so that after a crash :meth:`Ledger.reconcile_open_reservations`
  turns each one into an estimated row (the money was probably spent upstream) instead of forgetting it.

Backends (:mod:`gateway.metering.ledger_sqlite`, :mod:`gateway.metering.ledger_postgres`) provide the
SQL, and :mod:`gateway.metering.ledger_factory` picks one by URL; everything about batching, ordering
and failure handling lives here, once. The entries are in :mod:`gateway.metering.ledger_rows`, the plan
of a batch in :mod:`gateway.metering.ledger_batch`, the report query in
:mod:`gateway.metering.ledger_query`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

from gateway.metering.ledger_batch import Batch, plan_batch
from gateway.metering.ledger_query import check_group_by
from gateway.metering.ledger_rows import BadEntry, Entry, LedgerRow, OpenReservation, entry_json, reconciled_row

log = logging.getLogger("gateway.metering.ledger")


class Ledger(ABC):
    """Append-only spend records plus open reservations; see the module docstring for the design.

    Use from one event loop: ``record``/``reservation_opened`` are plain (non-async) appends.
    """

    def __init__(
        self,
        *,
        batch_size: int = 512,
        max_delay: float = 0.05,
        backlog_warn: int = 10_000,
        close_timeout: float = 30.0,
        retry_max_delay: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.backlog_warn = backlog_warn
        self.close_timeout = close_timeout
        self.retry_max_delay = retry_max_delay
        self._pending: deque[Entry] = deque()
        self._inflight: list[Entry] = []
        self._enqueued = 0
        self._written = 0  # entries stored, or rejected and logged
        self._rejected = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._state = "new"  # new -> open -> closing -> closed
        self._backlog_warned = False
        self._stored_open: set[str] = set()  # open reservations this process stored and has not settled
        self.left_unwritten = False  # close() gave up on entries (the journal is then kept for replay)

    # ---- what a backend provides

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the data lives, for logs (never includes a password)."""

    @abstractmethod
    async def _connect(self) -> None:
        """Connect and apply pending migrations."""

    @abstractmethod
    async def _disconnect(self) -> None: ...

    @abstractmethod
    async def _write(self, batch: Batch) -> None:
        """Apply ``batch`` in one transaction (see :class:`Batch` for the order)."""

    @abstractmethod
    def _is_data_error(self, exc: BaseException) -> bool:
        """True when the database refused the *data* (retrying cannot help); False for outages."""

    @abstractmethod
    async def _reconcile(
        self, opened_before: float | None, make_row: Callable[[OpenReservation], LedgerRow]
    ) -> list[LedgerRow]:
        """In one transaction: take the open reservations (opened before the cutoff), store
        ``make_row`` of each unless the request already has a row, delete them; return stored rows."""

    @abstractmethod
    async def _spend(
        self, group_by: list[str], since: float | None, until: float | None, tenant: str | None
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def window_spend(self, tenant: str, app: str | None, since: float) -> Decimal:
        """Total cost of ``tenant`` (only its ``app`` if given, all apps if None) from ``since`` on,
        for seeding budget counters at start-up."""

    @abstractmethod
    async def get(self, request_id: str) -> LedgerRow | None: ...

    @abstractmethod
    async def open_reservations(self) -> list[OpenReservation]:
        """Reservations written and not yet settled, oldest first."""

    @abstractmethod
    async def applied_migrations(self) -> list[int]: ...

    async def make_durable(self) -> bool:
        """True once every stored entry survives a power loss (the journal deletes a segment only
        then). A committed PostgreSQL transaction already does; SQLite overrides this."""
        return True

    # ---- life cycle

    async def open(self) -> None:
        """Connect, migrate, start the writer. Entries recorded before this are kept and written."""
        if self._state != "new":
            raise RuntimeError(f"ledger is {self._state}; open() is allowed once")
        await self._connect()
        self._state = "open"
        self._task = asyncio.create_task(self._run(), name=f"ledger-writer {self.where}")
        if self._pending:
            self._wake.set()

    async def close(self) -> None:
        """Write everything recorded so far, stop the writer, disconnect. Idempotent.

        Waits at most ``close_timeout`` seconds for an unreachable database; whatever is
        still unwritten then is logged as JSON at ERROR, one entry per line, so it can be replayed.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            self._log_unwritten(list(self._pending), "the ledger was closed without being opened")
            return
        self._state = "closing"
        self._wake.set()
        self._hurry.set()
        task = self._task
        assert task is not None
        try:
            await asyncio.wait_for(asyncio.shield(task), self.close_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.left_unwritten = bool(self._inflight or self._pending)
            self._log_unwritten(self._inflight + list(self._pending), "the database stayed unreachable at close")
            self._pending.clear()
            self._inflight = []
        finally:
            self._state = "closed"
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(RuntimeError("the ledger closed before these entries were written"))
            self._waiters.clear()
            await self._disconnect()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- the request path (non-blocking)

    def record(self, row: LedgerRow) -> None:
        """Queue a settled request's row; its open reservation is deleted in the same transaction."""
        self._enqueue(row)

    def reservation_opened(self, res: OpenReservation) -> None:
        """Queue a reservation made before forwarding, so a crash leaves a trace of the spend."""
        self._enqueue(res)

    def _enqueue(self, entry: Entry) -> None:
        if self._state == "closed":
            self._rejected += 1
            log.error("ledger: an entry arrived after close(); it is NOT stored: %s", entry_json(entry))
            return
        self._pending.append(entry)
        self._enqueued += 1
        n = len(self._pending)
        if n >= self.batch_size:
            self._hurry.set()
        self._wake.set()
        if n > self.backlog_warn and not self._backlog_warned:
            self._backlog_warned = True
            log.warning(
                "ledger backlog is %d entries (warning threshold %d): %s is not keeping up; nothing is dropped,"
                " but memory grows until it does",
                n,
                self.backlog_warn,
                self.where,
            )

    @property
    def backlog(self) -> int:
        """Entries recorded but not yet written (a gauge: it should hover near zero)."""
        return self._enqueued - self._written

    @property
    def rejected(self) -> int:
        """Entries the database refused as invalid or that arrived after close (each was logged)."""
        return self._rejected

    async def flush(self) -> None:
        """Return once every entry recorded before the call is written (or rejected and logged)."""
        target = self._enqueued
        if self._written >= target:
            return
        if self._state == "closed":
            raise RuntimeError("the ledger is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._hurry.set()
        self._wake.set()
        await fut

    # ---- queries

    async def spend(
        self,
        *,
        group_by: Sequence[str],
        since: float | None = None,
        until: float | None = None,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Spend per group: one dict per group with the group names as keys plus :data:`METRICS`
        (money as Decimal), ordered by the groups. ``since`` is inclusive, ``until`` exclusive.
        With no groups, one row of totals (or none when nothing matches)."""
        groups = check_group_by(group_by)
        rows = await self._spend(groups, since, until, tenant)
        return [r for r in rows if r["requests"]]

    async def replay(self, rows: Sequence[LedgerRow]) -> None:
        """Store rows recovered from a dead process's journal, now (not through the queue): each row
        is inserted unless its request id is stored already (the crash fell between journal and
        database), replaces a reconciled estimate, and settles the request's open reservation.
        Idempotent, so a replay interrupted by another crash is simply done again."""
        for start in range(0, len(rows), self.batch_size):
            await self._store(list(rows[start : start + self.batch_size]), replay=True)

    async def reconcile_open_reservations(
        self,
        *,
        reason: str = "gateway stopped before the request settled",
        estimate: Callable[[OpenReservation], Decimal] | None = None,
        opened_before: float | None = None,
    ) -> list[LedgerRow]:
        """Turn reservations left open by a dead gateway into estimated rows; returns the new rows.

        Call at start-up, before serving. The cost is ``estimate(res)``, by default the amount the
        reservation held (an upper bound, which is what finance wants from a guess). With several
        replicas on one database pass ``opened_before`` (e.g. now minus the longest request time) so
        a replica starting up does not take over requests still running elsewhere; should it happen
        anyway, the real row replaces the estimate when it arrives. Each reservation is reconciled
        once even when replicas run this at the same moment.
        """
        guess = estimate or (lambda res: res.amount_usd)
        rows = await self._reconcile(opened_before, lambda res: reconciled_row(res, guess(res), reason))
        if rows:
            log.warning("ledger: reconciled %d open reservations into estimated rows (%s)", len(rows), reason)
        return rows

    # ---- the writer

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._pending:
                if self._state == "closing":
                    return
                self._wake.clear()
                continue
            if not self._hurry.is_set() and len(self._pending) < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self.max_delay)
            while self._pending:
                n = min(len(self._pending), self.batch_size)
                self._inflight = [self._pending.popleft() for _ in range(n)]
                try:
                    await self._store(self._inflight)
                except Exception:  # a bug, not an outage: keep the writer alive and the entries in the log
                    log.exception("ledger writer failed unexpectedly")
                    self._log_unwritten(self._inflight, "the ledger writer failed unexpectedly")
                self._inflight = []
                self._written += n
                self._wake_waiters()
                if len(self._pending) < self.batch_size and not self._waiters and self._state != "closing":
                    # What arrived during the write waits for the next interval: under steady load this
                    # keeps one transaction per interval instead of one per write's duration. Only a full
                    # batch, a flush() still waiting or a close goes on at once; a full batch that set
                    # ``_hurry`` must not (it kept the writer in one-row transactions under load).
                    break
            self._hurry.clear()
            if self._backlog_warned and self.backlog <= self.backlog_warn // 2:
                self._backlog_warned = False
                log.info("ledger backlog is back to %d entries", self.backlog)

    async def _store(self, entries: list[Entry], *, replay: bool = False) -> None:
        """Write ``entries``; retry outages forever (close() bounds that), split a batch the database
        refuses as data until the bad entry is isolated, then log and skip that one entry. A
        ``replay`` batch settles every reservation its rows name and takes stored ids quietly."""
        delay = 0.05
        while True:
            try:
                batch = plan_batch(entries, None if replay else self._stored_open, replay=replay)
                await self._write(batch)
                self._stored_open.difference_update(batch.settled)
                self._stored_open.update(r.request_id for r in batch.reservations)
                return
            except Exception as exc:
                if isinstance(exc, BadEntry) or self._is_data_error(exc):
                    if len(entries) == 1:
                        self._rejected += 1
                        log.error("ledger: %s refused %r; NOT stored: %s", self.where, exc, entry_json(entries[0]))
                        return
                    mid = len(entries) // 2
                    await self._store(entries[:mid], replay=replay)
                    await self._store(entries[mid:], replay=replay)
                    return
                log.error(
                    "ledger: writing %d entries to %s failed (%r); retrying in %.2f s",
                    len(entries),
                    self.where,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_delay)

    def _wake_waiters(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if target <= self._written:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    def _log_unwritten(self, entries: list[Entry], why: str) -> None:
        if not entries:
            return
        self._rejected += len(entries)
        log.error("ledger: %d entries are NOT stored because %s; they follow, one JSON per line", len(entries), why)
        for entry in entries:
            log.error("ledger unwritten: %s", entry_json(entry))
