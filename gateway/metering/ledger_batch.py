"""Batch planning: what one transaction must do so that a batch of ledger entries has the effect of
writing them one by one, in order. No database is involved: the backends only execute the plan, and
the ordering rules are tested without one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.metering.ledger_rows import Entry, LedgerRow, OpenReservation, entry_json

# the ledger's one logger name, whichever of its modules speaks: operators filter on it
log = logging.getLogger("gateway.metering.ledger")


@dataclass(slots=True)
class Batch:
    """What one transaction must do, in this order, to have the effect of the entries in sequence.

    Rows are inserted, then the stored reservations of recorded rows are deleted, then the reservations
    that no later row in the batch settles are upserted (of several for one request, the last: a
    failover reserves again). A reservation and its row in the same batch therefore leave nothing
    open, and a (pathological) reservation made *after* its row stays open, exactly as if each entry
    had been written on its own.
    """

    rows: list[LedgerRow]
    settled: list[str]
    reservations: list[OpenReservation]
    # rows replayed from a dead process's journal: an id stored already is the expected case, not news
    replay: bool = False


def plan_batch(entries: Sequence[Entry], stored_open: set[str] | None = None, *, replay: bool = False) -> Batch:
    """The :class:`Batch` for ``entries``. ``stored_open`` (the request ids whose open reservation an
    earlier batch stored) limits the deletions to reservations that exist: most requests reserve and
    settle within one batch, or reserve nothing, and their deletion would be a wasted index probe."""
    rows: list[LedgerRow] = []
    reservations: list[OpenReservation] = []
    settled_after: set[str] = set()
    reserved_after: set[str] = set()  # a request re-reserved after a failover: its latest row wins
    for entry in reversed(entries):
        if isinstance(entry, LedgerRow):
            settled_after.add(entry.request_id)
            rows.append(entry)
        elif entry.request_id not in settled_after and entry.request_id not in reserved_after:
            reserved_after.add(entry.request_id)
            reservations.append(entry)
    rows.reverse()
    reservations.reverse()
    settled = dict.fromkeys(r.request_id for r in rows)
    return Batch(rows, [i for i in settled if stored_open is None or i in stored_open], reservations, replay)


def split_existing(
    rows: Sequence[LedgerRow], existing: dict[str, bool], *, replay: bool = False
) -> tuple[list[LedgerRow], list[str]]:
    """Rows to insert and stored rows to replace, given the batch's ids already in the ledger
    (``existing[id]`` is True when the stored row is a reconciled estimate a real row may replace).

    A request id already recorded for real keeps its first row; the later one is logged, not stored,
    because a unique-constraint error would otherwise fail the whole batch. In a ``replay`` that is
    what the crash between journal and database looks like, so it is skipped silently.
    """
    insert: list[LedgerRow] = []
    replace: list[str] = []
    seen: set[str] = set()
    for row in rows:
        rid = row.request_id
        if rid in seen or (rid in existing and not existing[rid]):
            if replay:
                continue
            log.warning("ledger: request %s is already recorded; keeping the first, dropping %s", rid, entry_json(row))
            continue
        seen.add(rid)
        if existing.get(rid):
            log.info("ledger: request %s settled after it was reconciled as interrupted; replacing the estimate", rid)
            replace.append(rid)
        insert.append(row)
    return insert, replace
