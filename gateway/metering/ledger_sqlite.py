"""The embedded ledger: one SQLite file in WAL mode, through aiosqlite so every query runs in
aiosqlite's thread and never on the event loop.

Money is stored as INTEGER nanodollars (the columns and encoders are in
:mod:`gateway.metering.ledger_sqlite_columns`; the schema and its migrations, shared with capture, in
:mod:`gateway.storage.sqlite`). Each batch is one ``BEGIN IMMEDIATE`` transaction: taking the write
lock up front (with a busy timeout) lets several processes share the file without the deadlock-prone
lock upgrade of a deferred transaction. Reports read through a second connection, so a long report
never holds up the writer (WAL lets readers and the writer proceed together); ``:memory:`` has a
single connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.metering.ledger import Ledger
from gateway.metering.ledger_batch import Batch, split_existing
from gateway.metering.ledger_query import build_spend_query
from gateway.metering.ledger_rows import LedgerRow, OpenReservation, encode_all
from gateway.metering.ledger_sqlite_columns import (
    DELETE_RESERVATIONS,
    DELETE_ROWS,
    INSERT_NEW_ROW,
    INSERT_ROW,
    RES_COLUMNS,
    SELECT_RES,
    SELECT_ROW,
    UPSERT_RES,
    decode_res,
    decode_row,
    encode_res,
    insert_rows,
)
from gateway.metering.money import from_nanos
from gateway.storage.sqlite import BUSY_TIMEOUT_MS, json_param, migrate, values_statements

WRITER_NICE = 5
"""How much lower than the event loop the ledger's SQLite threads run (Linux nice, per thread).

Each aiosqlite connection has a thread, which writes batches while requests are in flight; on a
busy core the scheduler shared it evenly with the event loop, so a batch written mid-request held
that request up (p99 at one connection: 1.2 ms against 0.8 ms without ledger writes). At nice 5 a
runnable event loop gets the core first, and the thread still has about a quarter of it when both
want it, several times what writing every row at the gateway's full throughput takes. Raising
one's own nice needs no privilege. Linux only (elsewhere the threads run as they are)."""


class _BackgroundConnection(sqlite3.Connection):
    """A sqlite3 connection that lowers its thread's priority when created (aiosqlite creates it in
    the thread that will run all its statements)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Linux only: there the nice value is per thread and PRIO_PROCESS takes a thread id; elsewhere
        # the same call would name a process whose pid happens to equal this thread's id
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # not allowed (a seccomp profile, say): run as is
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class _AlreadyRecorded(Exception):
    """A row of the batch has a request id the ledger holds already (rolls the fast path back)."""


class SqliteLedger(Ledger):
    """The ledger in one SQLite file (or ``:memory:``)."""

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(**options)
        self.path = str(path)
        self.memory = self.path == ":memory:"
        self._conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Guards the write connection: a transaction spans several awaits, and on :memory: reports
        # share that connection, so nothing else may run a statement inside someone's transaction.
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"sqlite:///{self.path}"

    async def _open_connection(self, *, reader: bool) -> aiosqlite.Connection:
        # we issue BEGIN/COMMIT ourselves; the connection is created in its own thread, which then
        # yields the CPU to the request path (see _BackgroundConnection)
        conn = await aiosqlite.connect(self.path, isolation_level=None, factory=_BackgroundConnection)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self.memory:
                await self._enable_wal(conn)
            await conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable up to the last checkpoint
            if reader:
                await conn.execute("PRAGMA query_only = 1")
        except BaseException:
            await conn.close()
            raise
        return conn

    @staticmethod
    async def _enable_wal(conn: aiosqlite.Connection) -> None:
        """Switch the file to WAL (persistent, so usually already done). Changing the journal mode can
        fail with "database is locked" *without* waiting on the busy timeout when another process opens
        the same new file at that moment, so retry here, for as long as the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                ((mode,),) = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"SQLite refused WAL mode (journal_mode is {mode!r})")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _connect(self) -> None:
        if not self.memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = await self._open_connection(reader=False)
        try:
            await self._migrate()
            self._reader = self._conn if self.memory else await self._open_connection(reader=True)
        except BaseException:
            await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        reader, conn = self._reader, self._conn
        self._reader = self._conn = None
        if reader is not None and reader is not conn:
            await reader.close()
        if conn is not None:
            await conn.close()

    async def _migrate(self) -> None:
        async with self._transaction() as conn:
            await migrate(conn, self.where)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = self._conn
        if conn is None:
            raise RuntimeError("the ledger is not open")
        async with self._lock:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.execute("ROLLBACK")
                raise

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._reader is None:
            raise RuntimeError("the ledger is not open")
        if self.memory:
            async with self._lock:
                yield self._reader
        else:
            yield self._reader

    def _is_data_error(self, exc: BaseException) -> bool:
        # OperationalError (locked, disk full, I/O) is an outage and is retried; these are not.
        return isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError))

    async def _existing(self, conn: aiosqlite.Connection, ids: Sequence[str]) -> dict[str, bool]:
        """Which of ``ids`` are recorded, and whether each is a replaceable reconciled estimate."""
        rows = await conn.execute_fetchall(
            "SELECT request_id, (outcome IN ('crashed', 'interrupted') AND estimated) FROM ledger"
            " WHERE request_id IN (SELECT value FROM json_each(?))",
            [json_param(ids)],
        )
        return {rid: bool(replaceable) for rid, replaceable in rows}

    async def _write(self, batch: Batch) -> None:
        reservations = encode_all(encode_res, batch.reservations)
        try:
            async with self._transaction() as conn:
                await self._apply(conn, batch, reservations, careful=False)
        except _AlreadyRecorded:  # rolled back: do it again, looking at each stored id
            async with self._transaction() as conn:
                await self._apply(conn, batch, reservations, careful=True)

    async def _apply(
        self, conn: aiosqlite.Connection, batch: Batch, reservations: list[tuple[Any, ...]], *, careful: bool
    ) -> None:
        """The batch's statements. Nearly always no request id of the batch is stored yet, so the rows
        go in with ``ON CONFLICT DO NOTHING`` and a count of the changes proves it; only when some row
        was skipped (a reconciled estimate to replace, a duplicate to log) is the batch redone with a
        lookup of each id (``careful``)."""
        if batch.rows and careful:
            existing = await self._existing(conn, [r.request_id for r in batch.rows])
            insert, replace = split_existing(batch.rows, existing, replay=batch.replay)
            if replace:
                await conn.execute(DELETE_ROWS, [json_param(replace)])
            await insert_rows(conn, INSERT_ROW, insert)
        elif batch.rows:
            before = conn.total_changes
            await insert_rows(conn, INSERT_NEW_ROW, batch.rows)
            if conn.total_changes - before != len(batch.rows):
                raise _AlreadyRecorded
        if batch.settled:
            await conn.execute(DELETE_RESERVATIONS, [json_param(batch.settled)])
        for sql, params in values_statements(UPSERT_RES, reservations):
            await conn.execute(sql, params)

    async def make_durable(self) -> bool:
        """Checkpoint the WAL into the database file. With ``synchronous = NORMAL`` a commit is safe
        from a process crash but not from a power loss until a checkpoint syncs it; a checkpoint that
        copied every frame has synced the log and the file, which is what the journal waits for
        before deleting a segment. False when a reader still holds part of the log (try again)."""
        if self.memory:
            return True
        conn = self._conn
        if conn is None:
            raise RuntimeError("the ledger is not open")
        async with self._lock:
            ((busy, frames, done),) = await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        return not busy and frames == done

    async def _reconcile(
        self, opened_before: float | None, make_row: Callable[[OpenReservation], LedgerRow]
    ) -> list[LedgerRow]:
        where, params = ("WHERE ts < ?", [float(opened_before)]) if opened_before is not None else ("", [])
        async with self._transaction() as conn:  # BEGIN IMMEDIATE: no one else changes them meanwhile
            found = await conn.execute_fetchall(
                f"SELECT {', '.join('o.' + c for c in RES_COLUMNS)},"
                " EXISTS (SELECT 1 FROM ledger l WHERE l.request_id = o.request_id)"
                f" FROM open_reservations o {where} ORDER BY o.ts, o.request_id",
                params,
            )
            rows = [make_row(decode_res(v[:-1])) for v in found if not v[-1]]
            await insert_rows(conn, INSERT_ROW, rows)
            await conn.execute(f"DELETE FROM open_reservations {where}", params)
        return rows

    async def _spend(
        self, group_by: list[str], since: float | None, until: float | None, tenant: str | None
    ) -> list[dict[str, Any]]:
        sql, params = build_spend_query(
            group_by,
            since=since,
            until=until,
            tenant=tenant,
            cost_col="cost_nanos",
            savings_col="cache_savings_nanos",
            placeholder=lambda _: "?",
            collate="",
        )
        async with self._reading() as conn:
            fetched = await conn.execute_fetchall(sql, params)
        names = [*group_by, "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
                 "cost_usd", "cache_savings_usd", "estimated_requests"]  # fmt: skip
        out = []
        for values in fetched:
            row = dict(zip(names, values, strict=True))
            row["cost_usd"] = from_nanos(row["cost_usd"])
            row["cache_savings_usd"] = from_nanos(row["cache_savings_usd"])
            out.append(row)
        return out

    async def window_spend(self, tenant: str, app: str | None, since: float) -> Decimal:
        sql = "SELECT COALESCE(SUM(cost_nanos), 0) FROM ledger WHERE tenant = ? AND ts >= ?"
        params: list[Any] = [tenant, float(since)]
        if app is not None:
            sql += " AND app = ?"
            params.append(app)
        async with self._reading() as conn:
            ((total,),) = await conn.execute_fetchall(sql, params)
        return from_nanos(total)

    async def get(self, request_id: str) -> LedgerRow | None:
        async with self._reading() as conn:
            found = await conn.execute_fetchall(SELECT_ROW + " WHERE request_id = ?", [request_id])
        return decode_row(next(iter(found))) if found else None

    async def open_reservations(self) -> list[OpenReservation]:
        async with self._reading() as conn:
            found = await conn.execute_fetchall(SELECT_RES + " ORDER BY ts, request_id")
        return [decode_res(v) for v in found]

    async def applied_migrations(self) -> list[int]:
        async with self._reading() as conn:
            return [v for (v,) in await conn.execute_fetchall("SELECT version FROM schema_migrations ORDER BY version")]
