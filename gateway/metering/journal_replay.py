"""Start-up recovery: the journals of dead processes become ledger rows, each exactly once.

A segment is dead when nobody holds its ``flock`` (the kernel drops a process's locks when it dies, by
``kill -9`` too); the recovering process takes the lock itself, so two processes starting together
never replay one segment twice, and a live worker's or replica's segment is never touched. For each
dead segment: finished requests get their exact row, requests that started and never finished an
:func:`~gateway.metering.journal_records.interrupted_row`; all go to :meth:`Ledger.replay`, which
skips ids the database already holds (the crash fell between journal and database) and settles their
open reservations. Only then is the segment deleted: a crash during recovery replays it again.

Segments of one process are read together, in order: a request whose start was carried into a newer
segment at rotation may have its finish there, or in the older one that was not deleted yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.metering.journal import SUFFIX, ledger_tag, try_lock
from gateway.metering.journal_records import Recovered, interrupted_row, read_journal
from gateway.metering.ledger import Ledger
from gateway.metering.prices import Price

log = logging.getLogger("gateway.metering.ledger")

REASON = "the gateway stopped before this request settled"
_SEGMENT = re.compile(r"^(?P<base>.+)\.(?P<seq>\d+)" + re.escape(SUFFIX) + "$")


@dataclass(slots=True)
class Replayed:
    """What one recovery did, for the start-up log and tests."""

    segments: int = 0
    finished: int = 0
    interrupted: int = 0
    bad_lines: int = 0


def _take(path: Path) -> int | None:
    """An open, locked descriptor of a dead segment, or None (alive, or replayed meanwhile)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    if not try_lock(fd) or os.fstat(fd).st_nlink == 0:  # held by a live process, or deleted by a faster one
        os.close(fd)
        return None
    return fd


def _read(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _dead_processes(directory: Path, tag: str) -> dict[str, list[tuple[int, Path]]]:
    """Dead segments of ledger ``tag`` by process, oldest first, each locked by us; stale temporary
    files removed."""
    groups: dict[str, list[tuple[int, int, Path]]] = {}
    if not directory.is_dir():
        return {}
    for path in sorted(directory.iterdir()):
        name = path.name
        if not name.startswith((tag + "-", f".{tag}-")):
            continue
        if name.startswith(".") and name.endswith(".tmp"):  # a process died while creating a segment
            fd = _take(path)
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                os.close(fd)
            continue
        match = _SEGMENT.match(name)
        if match is None:
            continue
        fd = _take(path)
        if fd is not None:
            groups.setdefault(match["base"], []).append((int(match["seq"]), fd, path))
    return {base: [(fd, path) for _, fd, path in sorted(found)] for base, found in groups.items()}


async def replay_journals(
    directory: str | Path, ledger: Ledger, price_of: Callable[[str, float], Price | None]
) -> Replayed:
    """Replay every dead journal segment in ``directory`` into ``ledger``; returns the counts."""
    folder = Path(directory)
    done = Replayed()
    dead = await asyncio.to_thread(_dead_processes, folder, ledger_tag(ledger))
    for segments in dead.values():
        try:
            recovered = Recovered()
            for fd, _ in segments:
                read_journal(await asyncio.to_thread(_read, fd), recovered)
            unfinished = recovered.unfinished()
            rows = [*recovered.finished.values(), *(interrupted_row(s, price_of, REASON) for s in unfinished)]
            rows.sort(key=lambda r: (r.ts, r.request_id))
            await ledger.replay(rows)
            for _, path in segments:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            done.segments += len(segments)
            done.finished += len(recovered.finished)
            done.interrupted += len(unfinished)
            done.bad_lines += recovered.bad_lines
        finally:
            for fd, _ in segments:
                os.close(fd)
    if done.segments:
        log.warning(
            "ledger journal: replayed %d segment(s) of stopped processes: %d finished rows, %d interrupted"
            " requests estimated, %d unreadable line(s) skipped",
            done.segments,
            done.finished,
            done.interrupted,
            done.bad_lines,
        )
    return done
