"""The ledger journal: a per-process append-only file that makes every request's row survive ``kill -9``.

The batch writer (:mod:`gateway.metering.ledger`) keeps rows in memory for up to a flush interval, and
a request still in flight has no row at all: a process that dies loses both. The journal closes that
gap without putting the database on the request path:

* A request writes one line before it is sent upstream (a *start*: everything its row needs but the
  answer) and one when it settles (a *finish*: the exact row), the finish *before* the last byte of the
  answer goes to the client. A stream also writes a *progress* line with its first event and then
  every :data:`PROGRESS_EVERY_READS` upstream reads, so an interrupted stream is billed for what it
  relayed. Line
  formats: :mod:`gateway.metering.journal_records`.
* Each line is one ``os.write`` on a descriptor opened ``O_APPEND``: in the kernel's page cache when
  the call returns, so it survives the death of the process (not of the machine). A write of a few
  hundred bytes to the page cache takes a couple of microseconds; it is done on the event loop on
  purpose, because "written before the answer is" is the whole guarantee, and a thread hand-off would
  cost more than the write.
* A background thread ``fdatasync``\\ s the file every ``fsync_ms`` when something was written: after a
  power loss at most the last ``fsync_ms`` of lines are gone. The event loop never waits for it.
* Each process has its own segment files, ``<dir>/<ledger>-<host>-<pid>-<random>.<n>.journal``
  (``<ledger>`` a hash of the ledger's location, so only its own ledger replays them), each held with
  an exclusive ``flock`` while the process lives. The kernel drops the lock when the process dies,
  however it dies; :mod:`gateway.metering.journal_replay` replays exactly the segments nobody holds,
  so workers and replicas sharing a directory never replay each other's journal (a local file system
  is assumed: ``flock`` over NFS is not reliable).
* Rotation keeps the files small: past :data:`ROTATE_BYTES` a new segment starts with the lines of
  the requests still in flight (or finished and not yet handed to the ledger); the old one is deleted
  once the ledger has stored and made durable everything recorded before the switch.
* A clean shutdown deletes the journal after the ledger wrote everything; if the database stayed
  unreachable the journal is kept, and the next start replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import threading
from pathlib import Path

from gateway.metering.journal_records import Started, finish_line, progress_line, start_line
from gateway.metering.ledger import Ledger
from gateway.metering.ledger_rows import LedgerRow

log = logging.getLogger("gateway.metering.ledger")

SUFFIX = ".journal"
ROTATE_BYTES = 4 * 1024 * 1024  # ~7000 requests; replaying a whole segment at start-up takes well under a second
PROGRESS_EVERY_READS = 16
"""A stream's progress line is written with its first relayed upstream read, then every 16: an
interrupted stream's estimate misses at most the events of the last 16 reads (usually 16 tokens),
however slow the stream. Counting reads, not time, keeps the per-event cost to an integer compare."""


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def ledger_tag(ledger: Ledger) -> str:
    """The first part of every segment name: which ledger its rows belong to. A directory shared by
    gateways on different ledgers (a default path, a test folder) must not replay one's rows into
    another's database."""
    return hashlib.sha256(ledger.where.encode()).hexdigest()[:12]


class Journal:
    """One process's journal in ``directory``. Use from one event loop (the writes are plain calls)."""

    def __init__(
        self, directory: str | Path, ledger: Ledger, *, fsync_ms: int, rotate_bytes: int = ROTATE_BYTES
    ) -> None:
        if fsync_ms < 1:
            raise ValueError("fsync_ms must be >= 1")
        self.directory = Path(directory)
        self.ledger = ledger
        self.fsync_s = fsync_ms / 1000
        self.rotate_bytes = rotate_bytes
        self._base = f"{ledger_tag(ledger)}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        # request id -> its lines a new segment must repeat: [start] or [start, progress], then [finish]
        self._live: dict[str, list[bytes]] = {}
        # start lines not written yet: the loop iteration's starts go out in one write (see started)
        self._pending: list[bytes] = []
        self._dirty = False
        self._sync_lock = threading.Lock()  # the sync thread vs closing a descriptor; never taken on the loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rotation: asyncio.Task[None] | None = None
        self._retiring: list[tuple[int, Path | None]] = []  # old segments waiting for the ledger
        self._failed = False
        self.write_errors = 0

    @property
    def path(self) -> Path | None:
        """The segment being written."""
        return self._path

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def open(self) -> None:
        """Create the first segment and start the sync thread (call after replaying dead journals)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd, self._path = self._new_segment()
        self._sync_dir()
        self._thread = threading.Thread(target=self._sync_loop, name="ledger-journal-sync", daemon=True)
        self._thread.start()

    def _new_segment(self) -> tuple[int, Path]:
        """A new segment, locked before it gets its final name, so a replaying process can never take
        a live one for dead in the instant between creating and locking it."""
        self._seq += 1
        name = f"{self._base}.{self._seq}{SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if not try_lock(fd):  # nobody else knows the name yet
            os.close(fd)
            raise RuntimeError(f"could not lock the new journal segment {tmp}")
        path = self.directory / name
        os.rename(tmp, path)
        return fd, path

    def _sync_dir(self) -> None:
        """Make the segment's directory entry durable too (a power loss must not lose the file itself)."""
        with contextlib.suppress(OSError):
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # ---- the request path

    def _write(self, line: bytes) -> None:
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:  # a full disk must not fail the request; the ledger still gets the row
            self.write_errors += 1
            if not self._failed:
                self._failed = True
                log.error("ledger journal: writing %s failed (%r); rows are not crash-safe meanwhile", self._path, exc)
            return
        if self._failed:
            self._failed = False
            log.info("ledger journal: writing %s works again", self._path)
        self._size += len(line)
        self._dirty = True

    def started(self, s: Started) -> None:
        """The request is about to be sent upstream (again, after a failover: the last start wins).

        The start lines of one loop iteration are written together, by a callback that runs at the
        start of the next iteration, before that iteration's I/O is read: no upstream answer to these
        requests can have been read, so no response to their clients has begun, before their lines are
        in the file. A progress or row line written first carries the pending ones with it."""
        line = start_line(s)
        self._live[s.request_id] = [line]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (tools, tests): nothing to group with
            self._write(line)
            return
        if not self._pending:
            loop.call_soon(self._flush_pending)
        self._pending.append(line)

    def _flush_pending(self) -> None:
        if self._pending:
            lines = b"".join(self._pending)
            self._pending.clear()
            self._write(lines)

    def _with_pending(self, line: bytes) -> bytes:
        if not self._pending:
            return line
        lines = b"".join(self._pending) + line
        self._pending.clear()
        return lines

    def progress(self, request_id: str, events: int) -> None:
        """A stream has handed ``events`` SSE events to the client."""
        lines = self._live.get(request_id)
        if lines is None:
            return
        line = progress_line(request_id, events)
        del lines[1:]
        lines.append(line)
        self._write(self._with_pending(line))

    def finished(self, row: LedgerRow) -> None:
        """The exact row, before the answer's last byte goes out."""
        line = finish_line(row)
        self._live[row.request_id] = [line]
        self._write(self._with_pending(line))
        if self._size >= self.rotate_bytes and self._rotation is None:
            self._rotation = asyncio.get_running_loop().create_task(self._rotate(), name="ledger-journal-rotate")

    def recorded(self, request_id: str) -> None:
        """The row is in the ledger's queue: the next rotation waits for the ledger instead."""
        self._live.pop(request_id, None)

    # ---- rotation and durability

    def rotate_soon(self) -> asyncio.Task[None]:
        """Start a rotation now (tests; a rotation in progress is returned instead)."""
        if self._rotation is None:
            self._rotation = asyncio.get_running_loop().create_task(self._rotate(), name="ledger-journal-rotate")
        return self._rotation

    async def _rotate(self) -> None:
        try:
            fd, path = await asyncio.to_thread(self._new_segment)
            old = (self._fd, self._path)
            carried = b"".join(line for lines in self._live.values() for line in lines)
            self._pending.clear()  # the pending start lines are among the carried ones
            # no await from here to the switch: no line can land in the old segment after the copy
            self._retiring.append(old)
            self._fd, self._path, self._size = fd, path, 0
            if carried:
                self._write(carried)
            await asyncio.to_thread(self._sync_dir)
            await self.ledger.flush()  # every row recorded before the switch is stored ...
            delay = 0.05
            while not await self.ledger.make_durable():  # ... and survives a power loss
                await asyncio.sleep(delay)  # a reader holds the database's log: try again shortly
                delay = min(delay * 2, 2.0)
            self._retiring.remove(old)
            await asyncio.to_thread(self._retire, *old)
        except Exception:  # keep serving: the old segment stays and is replayed (idempotently) after a crash
            log.exception("ledger journal: rotation failed")
        finally:
            self._rotation = None

    def _retire(self, fd: int, path: Path | None) -> None:
        with self._sync_lock:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os.close(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_s):
            self._sync_once()

    def _sync_once(self) -> None:
        with self._sync_lock:
            if not self._dirty or self._fd < 0:
                return
            self._dirty = False
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                log.error("ledger journal: fsync of %s failed: %r", self._path, exc)

    async def close(self, *, stored_everything: bool) -> None:
        """Stop the sync thread and close the segment, deleting it when the ledger stored everything
        (a clean shutdown); otherwise it is kept, locked no more, for the next start to replay."""
        rotation = self._rotation
        if rotation is not None:
            rotation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rotation
        self._flush_pending()
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._fd < 0:
            return
        segments = [*self._retiring, (self._fd, self._path)]
        self._retiring, self._fd = [], -1
        for fd, path in segments:
            if stored_everything:
                await asyncio.to_thread(self._retire, fd, path)
            else:
                with contextlib.suppress(OSError):
                    os.fdatasync(fd)
                os.close(fd)
                log.warning("ledger journal: %s is kept for the next start to replay", path)

    def sync_now(self) -> None:
        """fsync what was written (tests, and the last act before a deliberate stop)."""
        self._flush_pending()
        self._dirty = True
        self._sync_once()
